"""test_nan_logits.py - what an HTTP client sees when the model produces NaN logits: a tiny random
model (hydrad mkmodel) is poisoned with NaN through the gguf package, then served.

- every logits row NaN (output_norm.weight all NaN): non-streamed completions and chat requests get
  500 with an OpenAI-shaped server_error body that says NaN; streamed requests end (an error event,
  then the stream closes) and the openai client raises the error; 10 sequential and 6 concurrent
  failing requests (more than --max-seqs, with a small KV cache) all fail the same way, quickly,
  and leave no running sequence, queued request or used KV block behind; /health and /metrics
  still answer and the server exits 0 on SIGTERM (conftest).
- one token's embedding row NaN (token_embd row POISON; the tiny model ties its output to the
  embedding, so that token's logit is NaN in every row): prompts holding the token fail with 500,
  while prompts without it succeed, alone, batched with failing ones and after them (on KV blocks
  the failing ones filled with NaN), with the same greedy tokens every time."""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import subprocess
import time

import gguf
import numpy as np
import openai
import pytest
import requests

from conftest import BIN, SERVED, path_of

POISON = 100                               # token id whose embedding row is NaN
HEALTHY = [[30, 40, 50], [70, 71, 72, 73, 74]]
T = 10                                     # seconds any request may take (a hang fails the test)


def tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(all_nan, one_token) model paths: tiny f16 models with mkmodel's own byte-level vocabulary
    (512 tokens, no merges: fast to read with the gguf package, independent of HY_MODEL)."""
    if not os.path.exists(BIN):
        pytest.skip(f"{BIN} not built")
    d = tmp_path_factory.mktemp("nan_models")
    paths = {}
    for kind in ("all_nan", "one_token"):
        p = str(d / f"{kind}.gguf")
        subprocess.run([BIN, "mkmodel", "--shape", "tiny", "--type", "f16", "--vocab-from", "none", "-o", p],
                       check=True, capture_output=True)
        r = gguf.GGUFReader(p, "r+")
        if kind == "all_nan":
            t = tensor(r, "output_norm.weight")
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            t.data[...] = np.nan
        else:
            assert "output.weight" not in [t.name for t in r.tensors]  # tied: the embedding is the output
            t = tensor(r, "token_embd.weight")
            assert t.data.shape[0] > POISON
            special = [int(r.fields[k].contents()) for k in r.fields if k.endswith("_token_id")]
            assert POISON not in special and all(i not in special for h in HEALTHY for i in h)
            types = r.fields["tokenizer.ggml.token_type"].contents()
            assert all(types[i] == gguf.TokenType.NORMAL for i in [POISON] + sum(HEALTHY, []) + list(range(110, 139)))
            t.data[POISON, :] = np.nan
        r.data.flush()
        del r, t
        # read back independently of the writer
        r = gguf.GGUFReader(p)
        if kind == "all_nan":
            assert np.isnan(tensor(r, "output_norm.weight").data).all()
        else:
            e = np.asarray(tensor(r, "token_embd.weight").data, dtype=np.float32)
            assert np.isnan(e[POISON]).all()
            assert np.isfinite(np.delete(e, POISON, axis=0)).all()
        paths[kind] = p
    return paths


@pytest.fixture(scope="module")
def nan_srv(start_server, models):
    # 2 sequences at once, a KV cache of 16 blocks (256 tokens, 4 of test_survives's 60-token
    # requests): a leaked slot or block stalls the later requests (they time out) instead of
    # going unnoticed
    return start_server("-m", models["all_nan"], "--max-seqs", "2", "--kv-blocks", "16", "--max-model-len", "128",
                        "--max-batch-tokens", "128", "--max-queue", "64")


@pytest.fixture(scope="module")
def tok_srv(start_server, models):
    # 4 KV blocks: two 30-token poisoned prompts fill every block with NaN keys/values
    return start_server("-m", models["one_token"], "--max-seqs", "2", "--kv-blocks", "4", "--max-model-len", "32",
                        "--max-batch-tokens", "64", "--max-queue", "64")


def body(kind, n=4, stream=False, prompt="Hello there"):
    b = {"model": SERVED, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}
    if kind == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    return b


def check_error(e):
    """An OpenAI error object for a server-side failure whose message names the NaN logits."""
    assert isinstance(e, dict) and set(e) >= {"message", "type", "param", "code"}, e
    assert e["type"] == "server_error", e
    assert "nan" in e["message"].lower() and "logit" in e["message"].lower(), e
    return e


def post_fail(srv, kind, **kw):
    """A non-streamed request that must fail: 500 with a JSON error body."""
    t0 = time.time()
    r = requests.post(srv.url + path_of(kind), json=body(kind, **kw), timeout=T)
    assert r.status_code == 500, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    check_error(r.json()["error"])
    assert "choices" not in r.json()
    return time.time() - t0


def stream_fail(srv, kind, **kw):
    """A streamed request that must fail: it either fails up front (5xx JSON) or sends an error
    event and ends; no generated text arrives either way. Returns the events seen."""
    deadline = time.time() + T
    with requests.post(srv.url + path_of(kind), json=body(kind, stream=True, **kw), stream=True,
                       timeout=(T, T)) as r:
        if r.status_code >= 500:
            check_error(r.json()["error"])
            return []
        assert r.status_code == 200, (r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = []
        for line in r.iter_lines():  # ends when the server ends the chunked body
            assert time.time() < deadline, "stream did not end"
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
    assert events, "empty stream"
    datas = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [d["error"] for d in datas if "error" in d]
    assert len(errors) == 1, events
    check_error(errors[0])
    for d in datas:
        for c in d.get("choices", []):
            assert not c.get("text") and not (c.get("delta") or {}).get("content"), d
            assert c.get("finish_reason") is None, d  # no chunk claims a normal end
    assert "error" in datas[-1], "the error must be the last data event"
    assert events.count("[DONE]") <= 1 and (events[-1] == "[DONE]" or "[DONE]" not in events)
    return events


def metrics(srv):
    r = requests.get(srv.url + "/metrics", timeout=T)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def assert_idle(srv):
    """Nothing running, queued or holding KV blocks (polled briefly: the scheduler may free a
    sequence just after its response went out)."""
    deadline = time.time() + 3
    while True:
        m = metrics(srv)
        idle = {k: m[k] for k in ("hydrad_running_sequences", "hydrad_queue_depth", "hydrad_kv_blocks_used")}
        if not any(idle.values()):
            return m
        assert time.time() < deadline, f"not idle after the failing requests: {idle}"
        time.sleep(0.05)


# ---------- every logits row NaN ----------

@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_non_streamed_500(nan_srv, kind):
    post_fail(nan_srv, kind)
    c = nan_srv.client().with_options(timeout=T)
    with pytest.raises(openai.InternalServerError) as ei:
        if kind == "chat":
            c.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        else:
            c.completions.create(model=SERVED, prompt="Hi", max_tokens=3)
    assert ei.value.status_code == 500
    check_error(ei.value.body)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streamed_ends_with_error(nan_srv, kind):
    stream_fail(nan_srv, kind)
    c = nan_srv.client().with_options(timeout=T)
    t0 = time.time()
    with pytest.raises(openai.APIError) as ei:
        if kind == "chat":
            s = c.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, stream=True)
        else:
            s = c.completions.create(model=SERVED, prompt="Hi", max_tokens=3, stream=True)
        for _ in s:
            pass
    # a time-out or dropped connection is an APIError too: it must be the server's error
    assert not isinstance(ei.value, openai.APIConnectionError), repr(ei.value)
    assert "nan" in str(ei.value.message).lower(), ei.value.message
    assert time.time() - t0 < T


def test_survives(nan_srv):
    before = metrics(nan_srv)
    n500 = 0
    # sequential, more than --max-seqs: a leaked sequence or KV block would stall a later one
    for i in range(10):
        kind = ("completion", "chat")[i % 2]
        if i % 3 == 2:
            stream_fail(nan_srv, kind, n=8, prompt="word " * 8)
        else:
            assert post_fail(nan_srv, kind, n=8, prompt="word " * 8) < T
            n500 += 1
    # n > 1 (3 sequences for 2 slots) and several prompts in one request
    r = requests.post(nan_srv.url + "/v1/completions", json={**body("completion"), "n": 3}, timeout=T)
    assert r.status_code == 500 and check_error(r.json()["error"])
    r = requests.post(nan_srv.url + "/v1/completions", json={**body("completion"), "prompt": ["a", "b", "c"]},
                      timeout=T)
    assert r.status_code == 500 and check_error(r.json()["error"])
    n500 += 2
    # concurrent, more than --max-seqs (queued ones must be admitted as the failed ones leave)
    with cf.ThreadPoolExecutor(6) as ex:
        list(ex.map(lambda i: post_fail(nan_srv, ("completion", "chat")[i % 2], prompt=f"Go {i} " * 6), range(6)))
        list(ex.map(lambda i: stream_fail(nan_srv, "completion", prompt=f"Run {i}"), range(4)))
    n500 += 6
    assert requests.get(nan_srv.url + "/health", timeout=T).status_code == 200
    after = assert_idle(nan_srv)
    k = 'hydrad_requests_total{status="500"}'
    assert after[k] - before.get(k, 0) == n500
    assert after["hydrad_generation_tokens_total"] == before["hydrad_generation_tokens_total"]
    # still failing the same way
    post_fail(nan_srv, "completion")
    stream_fail(nan_srv, "chat")
    assert nan_srv.proc.poll() is None


# ---------- one token's embedding NaN ----------

def complete(srv, prompt, n=6):
    r = requests.post(srv.url + "/v1/completions", timeout=T,
                      json={"model": SERVED, "prompt": prompt, "max_tokens": n, "temperature": 0,
                            "ignore_eos": True, "logprobs": 1})
    return r


def tokens_of(r):
    assert r.status_code == 200, r.text
    out = []
    for c in r.json()["choices"]:
        lp = c["logprobs"]
        assert c["finish_reason"] == "length" and len(lp["tokens"]) == 6
        assert all(math.isfinite(x) for x in lp["token_logprobs"])
        out.append((c["text"], lp["tokens"]))
    return out


def test_poisoned_token_fails_alone(tok_srv):
    base = [tokens_of(complete(tok_srv, h)) for h in HEALTHY]  # the NaN logit of POISON is never picked
    poisoned = [POISON] + list(range(110, 139))  # 30 tokens: fills 2 KV blocks with NaN
    # alone, batched with healthy requests, and inside a request with a healthy prompt
    # (poisoned requests ask for 2 tokens: 30 + 2 fill the 32-token context; more is a 400 now)
    r = complete(tok_srv, poisoned, 2)
    assert r.status_code == 500 and check_error(r.json()["error"])
    jobs = [poisoned, HEALTHY[0], [110, POISON, 111], HEALTHY[1], [HEALTHY[0], [POISON, 5]], poisoned[:20]]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        rs = list(ex.map(lambda p: complete(tok_srv, p, 6 if p in HEALTHY else 2), jobs))
    for p, r in zip(jobs, rs):
        if p in HEALTHY:
            assert tokens_of(r) == base[HEALTHY.index(p)]
        else:
            assert r.status_code == 500, (p, r.text)
            check_error(r.json()["error"])
    # two poisoned sequences at once hold all 4 KV blocks; healthy prompts then reuse them
    with cf.ThreadPoolExecutor(2) as ex:
        rs = list(ex.map(lambda i: complete(tok_srv, poisoned[:1] + poisoned[1 + i:], 2), range(2)))
    assert [r.status_code for r in rs] == [500, 500]
    for _ in range(2):
        assert [tokens_of(complete(tok_srv, h)) for h in HEALTHY] == base
    assert tokens_of(complete(tok_srv, HEALTHY)) == [b[0] for b in base]
    assert_idle(tok_srv)
