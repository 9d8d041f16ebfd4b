"""test_bench_smoke.py - a short run of `hydrad-bench serve` against a real `hydrad serve`:
Poisson arrivals over two adapters it generates and loads itself, then a --dataset run. Asserts a
well-formed report (markdown on stdout, vLLM-named JSON) and zero errors; never timings."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from conftest import BIN, MODEL, ROOT

BENCH = os.environ.get("HYDRAD_BENCH_BIN", os.path.join(ROOT, "bin", "hydrad-bench"))


@pytest.fixture(scope="module")
def bench_server(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_adapters")
    srv = start_server("--max-seqs", "8", "--max-batch-tokens", "256", "--adapter-root", str(root))
    return srv, root


def run_bench(*args, timeout=60):
    if not os.path.exists(BENCH):
        pytest.skip(f"{BENCH} not built")
    return subprocess.run([BENCH, "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_poisson_with_made_adapters(bench_server, tmp_path):
    srv, root = bench_server
    out = tmp_path / "r.json"
    p = run_bench("--url", srv.url, "--num-prompts", "6", "--request-rate", "20", "--input-len", "8",
                  "--output-len", "4", "--num-adapters", "2", "--make-adapters", str(root), "--adapter-r", "4",
                  "--adapter-K", "2", "--hydrad", BIN, "--base", MODEL, "--goodput", "ttft:100000 tpot:100000",
                  "--result-json", str(out), "--label", "smoke")
    assert p.returncode == 0, p.stdout + p.stderr
    for row in ("| TTFT |", "| TPOT |", "| ITL |", "| E2E |", "request throughput", "output throughput"):
        assert row in p.stdout
    assert "[hydrad-bench]" in p.stderr  # progress line
    j = json.loads(out.read_text())
    assert j["completed"] == 6 and j["failed"] == 0 and j["errors_by_kind"] == {}
    assert j["num_adapters"] == 2 and j["label"] == "smoke"
    # ignore_eos + max_tokens: every request produced exactly 4 tokens, as the server's usage says
    assert j["output_lens"] == [4] * 6 and j["total_output_tokens"] == 24
    assert all(n > 0 for n in j["input_lens"])
    for k in ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput"):
        assert isinstance(j[k], float) and math.isfinite(j[k]) and j[k] > 0, k
    for m in ("ttft", "tpot", "itl", "e2el"):
        s = [j[f"{stat}_{m}_ms"] for stat in ("mean", "median", "p50", "p90", "p99")]
        assert all(math.isfinite(v) and v >= 0 for v in s), m
        assert j[f"p50_{m}_ms"] <= j[f"p90_{m}_ms"] <= j[f"p99_{m}_ms"], m
    assert j["mean_ttft_ms"] <= j["mean_e2el_ms"]
    # goodput SLOs this loose pass every request
    assert abs(j["request_goodput"] - j["request_throughput"]) < 1e-9
    # the adapters were loaded through the admin API and served
    import requests
    names = {a["name"] for a in requests.get(srv.url + "/v1/adapters", timeout=10).json()["data"]}
    assert {"bench-0000", "bench-0001"} <= names


def test_dataset_closed_loop(bench_server, tmp_path):
    srv, _ = bench_server
    ds = tmp_path / "d.jsonl"
    ds.write_text('{"prompt": "Once upon a time", "max_tokens": 3}\n\n{"text": "The capital of France is"}\n')
    out = tmp_path / "r.json"
    p = run_bench("--url", srv.url, "--dataset", str(ds), "--num-prompts", "4", "--max-concurrency", "2",
                  "--output-len", "5", "--endpoint", "chat", "--result-json", str(out), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == ""  # --quiet
    j = json.loads(out.read_text())
    assert j["completed"] == 4 and j["failed"] == 0 and j["max_concurrency"] == 2
    assert j["output_lens"] == [3, 5, 3, 5]
    assert j["endpoint"] == "/v1/chat/completions"


def test_errors_are_counted(bench_server, tmp_path):
    srv, _ = bench_server
    out = tmp_path / "r.json"
    p = run_bench("--url", srv.url, "--model", "no-such-adapter", "--num-prompts", "2", "--output-len", "2",
                  "--result-json", str(out), "--quiet")
    assert p.returncode == 1
    j = json.loads(out.read_text())
    assert j["completed"] == 0 and j["failed"] == 2
    assert j["errors_by_kind"] == {"http_404": 2}  # unknown model: OpenAI-style 404
    assert "| error | count |" in p.stdout


def test_bad_flags():
    p = run_bench("--request-rate", "fast")
    assert p.returncode == 2 and "request-rate" in p.stderr
    h = run_bench("--help")
    assert h.returncode == 0 and "--max-concurrency" in h.stdout and "--goodput" in h.stdout
