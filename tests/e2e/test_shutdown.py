"""test_shutdown.py - SIGTERM drains: the server stops accepting, /health answers 503 draining,
streams in flight finish normally within --drain-timeout; what is still running at the deadline
ends with an OpenAI-shaped error event (streams) or a 503 (whole answers), never a made-up
finish_reason; the exit status says whether anything was cut (0 / 3); a second SIGTERM stops at
once."""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import time

import requests

from conftest import SERVED, Server


def stream(url, n):
    """(finish_reason of the last choice chunk, error event or None, saw [DONE])."""
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": n, "ignore_eos": True, "stream": True,
            "temperature": 0}
    finish, error, done = None, None, False
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = ev["error"]
                for ch in ev.get("choices", []):
                    finish = ch.get("finish_reason") or finish
    except requests.RequestException as e:
        error = {"transport": str(e)}
    return finish, error, done


def whole(url, n):
    r = requests.post(url + "/v1/completions", json={"model": SERVED, "prompt": "Hi", "max_tokens": n,
                                                     "ignore_eos": True}, timeout=120)
    return r.status_code, r.json()


def start(tmp_path, *args):
    return Server(["--max-seqs", "16", "--max-batch-tokens", "256"] + list(args), tmp_path / "hydrad.log")


def wait_running(srv, n):
    deadline = time.time() + 30
    while time.time() < deadline:
        t = requests.get(srv.url + "/metrics", timeout=10).text
        line = [ln for ln in t.splitlines() if ln.startswith("vllm:num_requests_running")][0]
        if float(line.split()[-1]) >= n:
            return
        time.sleep(0.02)
    raise AssertionError("requests did not start")


def test_drain_lets_streams_finish(tmp_path):
    srv = start(tmp_path, "--drain-timeout", "60")
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(stream, srv.url, 24) for _ in range(8)]
        wait_running(srv, 8)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        h = requests.get(srv.url + "/health", timeout=5)
        late = requests.post(srv.url + "/v1/completions", json={"model": SERVED, "prompt": "Hi"}, timeout=5)
        res = [f.result() for f in futs]
    assert all(r == ("length", None, True) for r in res), res
    assert h.status_code == 503 and h.json()["status"] == "draining"
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
    assert srv.proc.wait(timeout=60) == 0


def test_drain_timeout_cuts_with_errors_and_exit_status(tmp_path):
    srv = start(tmp_path, "--drain-timeout", "1")
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(stream, srv.url, 3000) for _ in range(6)] + [ex.submit(whole, srv.url, 3000)
                                                                       for _ in range(2)]
        wait_running(srv, 8)
        t0 = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        res = [f.result() for f in futs]
    code = srv.proc.wait(timeout=30)
    took = time.time() - t0
    for finish, error, done in res[:6]:
        assert finish is None and done, (finish, error, done)  # no "abort" or other made-up reason
        assert error and error["type"] == "server_error" and "shutting down" in error["message"], error
    for status, body in res[6:]:
        assert status == 503 and "shutting down" in body["error"]["message"], body
    assert code == 3, code
    assert took < 10, took


def test_second_signal_stops_at_once(tmp_path):
    srv = start(tmp_path, "--drain-timeout", "120")
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(stream, srv.url, 3000) for _ in range(4)]
        wait_running(srv, 4)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert srv.proc.poll() is None  # draining, not gone
        t0 = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=30)
        res = [f.result() for f in futs]
    assert time.time() - t0 < 5
    assert code == 3
    assert all(e is not None for _, e, _ in res)
