"""test_hot_swap.py - reloading an adapter under the same name has no gap: unload frees the name
at once, a load of the same name right after succeeds (even while requests still run on the old
weights) and the next request gets the new weights. 200 cycles of unload -> load (alternating
two adapters' weights) -> greedy request, on an idle server and under 16 clients of load; every
cycle must succeed and answer with the weights just loaded (the reference texts are the two
adapters served under fixed names, sent alone). The adapters are seeded random ones made by
`hydrad mkadapter` (test input only)."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import requests

from conftest import SERVED, mkadapter

PROMPT = "The three primary colours are"
CYCLES = 200


@pytest.fixture(scope="module")
def env(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    a, b = mkadapter(root / "a", 31, targets="q_proj,v_proj,o_proj"), mkadapter(root / "b", 32, targets="q_proj,v_proj,o_proj")
    srv = start_server("--adapter", f"fixed_a={a}", "--adapter", f"fixed_b={b}", "--adapter", f"x={a}",
                       "--adapter-root", str(root), "--admin-key", "adm", "--max-seqs", "32",
                       "--max-batch-tokens", "512")
    want = {p: gen(srv, name) for p, name in ((a, "fixed_a"), (b, "fixed_b"))}
    assert want[a] != want[b]
    return srv, a, b, want


def gen(srv, model, n=6):
    r = requests.post(srv.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def admin(srv, path, body):
    return requests.post(srv.url + path, json=body, headers={"Authorization": "Bearer adm"}, timeout=60)


def cycles(srv, a, b, want, n):
    """n unload -> load -> request cycles of `x`; returns the failures (empty: none)."""
    bad = []
    for i in range(n):
        path = b if i % 2 == 0 else a
        u = admin(srv, "/v1/unload_lora_adapter", {"lora_name": "x"})
        ld = admin(srv, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        if u.status_code != 200 or ld.status_code != 200:
            bad.append((i, u.status_code, u.text[:120], ld.status_code, ld.text[:120]))
            continue
        got = gen(srv, "x")
        if got != want[path]:
            bad.append((i, "wrong weights", got, want[path]))
    return bad


def test_reload_cycles_idle(env):
    srv, a, b, want = env
    t0 = time.time()
    bad = cycles(srv, a, b, want, CYCLES)
    print(f"{CYCLES} idle cycles in {time.time() - t0:.1f} s, {len(bad)} failures")
    assert not bad, bad[:5]


def test_reload_cycles_under_load(env):
    srv, a, b, want = env
    stop = threading.Event()
    counts = {"ok": 0, "bad": 0, "gone": 0}
    lock = threading.Lock()

    def client(i):
        # the other clients use the base model, the fixed adapters and x itself (a request for x
        # that lands between an unload and the next load may get 404: not a failure of the swap)
        model = [SERVED, "fixed_a", "fixed_b", "x"][i % 4]
        while not stop.is_set():
            body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "stream": i % 2 == 0}
            r = requests.post(srv.url + "/v1/completions", json=body, timeout=60)
            with lock:
                if r.status_code == 200:
                    counts["ok"] += 1
                elif model == "x" and r.status_code == 404:
                    counts["gone"] += 1
                else:
                    counts["bad"] += 1

    with cf.ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(client, i) for i in range(16)]
        t0 = time.time()
        try:
            bad = cycles(srv, a, b, want, CYCLES)
        finally:
            stop.set()
        for f in futs:
            f.result()
    print(f"{CYCLES} cycles under 16 clients in {time.time() - t0:.1f} s: {len(bad)} failures; clients {counts}")
    assert not bad, bad[:5]
    assert counts["bad"] == 0 and counts["ok"] > 0, counts
    # nothing is left draining once the load is gone
    deadline = time.time() + 5
    while time.time() < deadline:
        listed = requests.get(srv.url + "/v1/adapters", timeout=10).json()["data"]
        if [d["name"] for d in listed if d["name"] == "x"] == ["x"]:
            break
        time.sleep(0.05)
    assert [d["state"] for d in listed if d["name"] == "x"] == ["ready"], listed
