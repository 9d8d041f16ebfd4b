"""test_server_edges.py - edges of the HTTP server, black box over a real hydrad serve: request
counters of more than 256 adapters (all of them in /v1/adapters and /metrics)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import BIN, MODEL, SERVED, make_adapter

LONG = 3000  # tokens: a generation of many seconds on the CPU, so a prompt cancel is visible


def metric(text, name, labels=None):
    """The value of sample `name` (with exactly `labels`, when given) in Prometheus text, or None."""
    lab = r"(\{[^}]*\})?" if labels is None else re.escape("{" + labels + "}")
    m = re.search(r"^" + re.escape(name) + lab + r" ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(m.lastindex)) if m else None


def scrape(srv):
    t = requests.get(srv.url + "/metrics", timeout=10).text
    return {"kv": metric(t, "hydrad_kv_blocks_used"), "running": metric(t, "vllm:num_requests_running"),
            "waiting": metric(t, "vllm:num_requests_waiting"), "cancelled": metric(t, "hydrad_requests_cancelled_total"),
            "gen": metric(t, "hydrad_generation_tokens_total")}


def wait_for(srv, pred, timeout):
    """Polls /metrics until pred(sample) holds; returns (sample, seconds waited)."""
    t0 = time.time()
    while True:
        m = scrape(srv)
        if pred(m) or time.time() - t0 > timeout:
            return m, time.time() - t0
        time.sleep(0.02)


def raw_request(port, path, body, host="127.0.0.1"):
    """Opens a socket and sends one POST; returns the socket (the caller reads or closes it)."""
    data = json.dumps(body).encode()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def long_body(kind, prompt):
    b = {"model": SERVED, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    if kind == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    return b


def path_of(kind):
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


@pytest.fixture(scope="module")
def one_seq(start_server):
    # one running sequence at most: a second request waits in the queue
    return start_server("--max-seqs", "1", "--max-batch-tokens", "128")


# ---------- 4. request counters of more than 256 adapters ----------

def test_counters_past_256_adapters(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("many_counted")
    a = make_adapter(root / "a", seed=7, r=2, K=1, targets="v_proj")
    srv = start_server("--adapter-root", str(root), "--admin-key", "adm", "--max-cpu-loras", "300",
                       "--max-loras", "32", "--max-seqs", "32")
    names = [f"m{i}" for i in range(300)]
    sess = requests.Session()
    for n in names:
        r = sess.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": n, "lora_path": a},
                      headers={"Authorization": "Bearer adm"}, timeout=30)
        assert r.status_code == 200, r.text

    def one(name):
        r = requests.post(srv.url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1},
                          timeout=120)
        assert r.status_code == 200, r.text

    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(one, names))  # one request to every adapter: 300 distinct names counted
    one("m299")  # and a second one to the 300th
    listed = {x["name"]: x for x in requests.get(srv.url + "/v1/adapters", timeout=30).json()["data"]}
    want = {n: (2 if n == "m299" else 1) for n in names}
    assert {n: listed[n]["requests"] for n in names} == want
    t = requests.get(srv.url + "/metrics", timeout=30).text
    got = {n: metric(t, "hydrad_adapter_requests_total", f'adapter="{n}"') for n in names}
    assert got == {n: float(v) for n, v in want.items()}
    assert listed["m299"]["tokens"] > 0
