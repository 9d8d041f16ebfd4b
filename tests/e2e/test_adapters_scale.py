"""test_adapters_scale.py - adapters at scale (issue 18, the parts built so far): loading on first use
from an --adapter-resolver directory (one load per name under 32 concurrent first requests, the
same tokens as an explicit load), pinned adapters surviving pressure from 50 others through 4
device slots and a small host tier, an adapter in use never evicted (a long stream keeps its
output while 40 others cycle), the adapter metrics through load -> use -> evict, and bad input
(a resolver entry that leaves its root, a broken adapter, an unknown name, too many pins)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re

import pytest
import requests

from conftest import mkadapter

PROMPT = "The weather today is"


def ask(srv, model, n=6, prompt=PROMPT):
    r = requests.post(srv.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                        "temperature": 0, "ignore_eos": True}, timeout=300)
    return r


def text(srv, model, n=6):
    r = ask(srv, model, n)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def metric(srv, name, labels=None):
    body = requests.get(srv.url + "/metrics").text
    total = 0.0
    found = False
    for line in body.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in (labels or {}).items()):
            total += float(m.group(2))
            found = True
    return total if found else None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("resolver")
    for i in range(56):  # small adapters: r 2, q/v; ratio 1 moves the text clearly off the base
        mkadapter(d / f"ad{i}", seed=100 + i, r=2, K=2, targets="q_proj,v_proj", ratio=1.0)
    os.symlink("/etc", d / "escape")
    broken = d / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    return d


def test_first_use_loads_once(start_server, root):
    srv = start_server("--adapter-resolver", str(root), "--max-loras", "8", "--max-cpu-loras", "16",
                       "--max-seqs", "16")
    names = [f"ad{i}" for i in range(8)]
    with cf.ThreadPoolExecutor(32) as ex:
        outs = list(ex.map(lambda i: (names[i % 8], ask(srv, names[i % 8])), range(32)))
    for name, r in outs:
        assert r.status_code == 200, (name, r.text)
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 8
    assert metric(srv, "hydrad_adapter_load_seconds_count") == 8
    by_name = {}
    for name, r in outs:  # every request for a name got the same greedy tokens
        by_name.setdefault(name, set()).add(r.json()["choices"][0]["text"])
    assert all(len(v) == 1 for v in by_name.values()), by_name
    # the same tokens as an explicit load of the same directories
    ref = start_server(*sum((["--adapter", f"{n}={root}/{n}"] for n in names[:3]), []))
    for n in names[:3]:
        assert text(ref, n) == next(iter(by_name[n]))
    for n in names:
        assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": n, "level": "host"}) == 1
    # loaded now: a request is served without another load
    text(srv, "ad0")
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 8


def test_bad_resolver_input(start_server, root):
    srv = start_server("--adapter-resolver", str(root))
    r = ask(srv, "escape")
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
    r = ask(srv, "broken")
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed", r.text
    assert "broken" in r.json()["error"]["message"]
    for bad in ("nope", "../ad0", ".hidden", "ad0/x"):
        r = ask(srv, bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (bad, r.text)
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 0
    assert metric(srv, "hydrad_adapter_load_failures_total") == 1
    assert json.loads(requests.get(srv.url + "/v1/adapters").text)["data"] == []
    assert ask(srv, "ad1").status_code == 200  # and it keeps serving


def test_pinned_survive_pressure_and_in_use_never_evicted(start_server, root):
    srv = start_server("--adapter-resolver", str(root), "--adapter-root", str(root), "--max-loras", "4",
                       "--max-cpu-loras", "6", "--max-seqs", "8")
    base_x = text(srv, "ad50", 8)  # X: first use, then unloaded and loaded again pinned
    assert requests.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "ad50"}).status_code == 200
    r = requests.post(srv.url + "/v1/load_lora_adapter",
                      json={"lora_name": "ad50", "lora_path": str(root / "ad50"), "pinned": True})
    assert r.status_code == 200, r.text
    for n in ("ad51", "ad52"):
        assert requests.post(srv.url + "/v1/load_lora_adapter",
                             json={"lora_name": n, "lora_path": str(root / n), "pinned": True}).status_code == 200
    # a fourth pin would leave no device slot for unpinned adapters
    r = requests.post(srv.url + "/v1/load_lora_adapter",
                      json={"lora_name": "ad53", "lora_path": str(root / "ad53"), "pinned": True})
    assert r.status_code == 400 and "pinned" in r.json()["error"]["message"], r.text
    assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": "ad53"}) is None
    # a long stream on Y while 40 others cycle through the one free device slot and 3 host slots
    long_ref = text(srv, "ad49", 120)
    stream_out = {}

    def stream():
        r = requests.post(srv.url + "/v1/completions", json={"model": "ad49", "prompt": PROMPT, "max_tokens": 120,
                                                            "temperature": 0, "ignore_eos": True, "stream": True},
                          stream=True, timeout=300)
        t = ""
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                t += json.loads(line[6:])["choices"][0]["text"]
        stream_out["t"] = t

    with cf.ThreadPoolExecutor(3) as ex:
        fut = ex.submit(stream)
        others = list(ex.map(lambda i: ask(srv, f"ad{i}", 3), range(40)))
        fut.result()
    assert all(r.status_code == 200 for r in others), [r.text for r in others if r.status_code != 200][:2]
    assert stream_out["t"] == long_ref
    assert metric(srv, "hydrad_adapter_evictions_total") >= 30
    assert metric(srv, "hydrad_adapter_device_loads_total") >= 40  # host -> device, once per first use at least
    # the pinned ones never left: same output, still on host and device
    assert text(srv, "ad50", 8) == base_x
    for n in ("ad50", "ad51", "ad52"):
        assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": n, "level": "host", "pinned": "true"}) == 1
    assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": "ad50", "level": "device"}) == 1
    info = {a["name"]: a for a in requests.get(srv.url + "/v1/adapters").json()["data"]}
    assert info["ad50"]["pinned"] is True and len(info) <= 6 + 1
    # unload removes its series
    assert requests.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "ad51"}).status_code == 200
    assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": "ad51"}) is None


def test_stack_members_load_on_first_use(start_server, root):
    """A `lora` stack naming adapters nobody loaded loads each (once, however many requests ask)
    and answers what the same stack gives once they are loaded explicitly; an unknown member is
    a 404 naming it, and nothing stays pinned."""
    srv = start_server("--adapter-resolver", str(root), "--max-loras", "4", "--max-cpu-loras", "8")
    stack = [{"name": "ad50", "scale": 0.5}, {"name": "ad51", "scale": 0.5}]
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "lora": stack}
    with cf.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda _: requests.post(srv.url + "/v1/completions", json=body, timeout=300), range(4)))
    for r in rs:
        assert r.status_code == 200, r.text
    got = {r.json()["choices"][0]["text"] for r in rs}
    assert len(got) == 1
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 2
    ref = start_server("--adapter", f"ad50={root}/ad50", "--adapter", f"ad51={root}/ad51")
    r = requests.post(ref.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == next(iter(got))
    bad = dict(body, lora=[{"name": "ad52", "scale": 1.0}, {"name": "nope", "scale": 1.0}])
    r = requests.post(srv.url + "/v1/completions", json=bad, timeout=300)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"], r.text
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 3  # ad52 came in; nope does not exist
    for n in ("ad50", "ad51", "ad52"):  # loaded, in host memory, not pinned
        assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": n, "level": "host", "pinned": "false"}) == 1
    # device tier: ad50, ad51 (the stack), ad53, ad54 fill the 4 slots; ad55 moves the idle one used
    # least recently off the device, which stays in host memory
    assert metric(srv, "hydrad_adapter_device_loads_total") == 2
    for n in ("ad53", "ad54", "ad55"):
        assert text(srv, n)
    assert metric(srv, "hydrad_adapter_device_loads_total") == 5
    assert metric(srv, "hydrad_adapter_device_evictions_total") == 1
    on_device = [n for n in ("ad50", "ad51") if metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": n, "level": "device"})]
    assert len(on_device) == 1
    assert metric(srv, "vllm:lora_adapter_loaded", {"adapter_name": "ad50", "level": "host"}) == 1
