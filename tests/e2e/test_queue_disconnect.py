"""test_queue_disconnect.py - clients that go away while their request waits in the queue free
their queue slot at once, streaming or not: with --max-seqs 1 --max-queue 10, one long request
holds the only sequence slot, 10 queued streaming requests whose clients close leave the queue
within 1 s (vllm:num_requests_waiting), and the next client is admitted instead of getting 429."""
from __future__ import annotations

import json
import re
import socket
import time

import requests

from conftest import SERVED


def gauge(srv, name):
    t = requests.get(srv.url + "/metrics", timeout=10).text
    return float(re.search(r"^" + re.escape(name) + r"(\{[^}]*\})? ([0-9.eE+-]+)$", t, re.M).group(2))


def waiting(srv):
    return gauge(srv, "vllm:num_requests_waiting")


def open_stream(srv, stream=True):
    body = json.dumps({"model": SERVED, "prompt": "Tell me a story.", "max_tokens": 64, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def test_closed_queued_streams_leave_the_queue(start_server):
    srv = start_server("--max-seqs", "1", "--max-queue", "10", "--max-batch-tokens", "256")
    # one long whole answer holds the only sequence slot (closed at the end: cancelled)
    body = json.dumps({"model": SERVED, "prompt": "Count to a thousand:", "max_tokens": 3000,
                       "ignore_eos": True}).encode()
    long_sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    long_sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        deadline = time.time() + 10
        while gauge(srv, "vllm:num_requests_running") != 1 and time.time() < deadline:
            time.sleep(0.02)
        socks = [open_stream(srv, stream=i % 5 != 0) for i in range(10)]  # 8 streams, 2 whole answers
        deadline = time.time() + 10
        while waiting(srv) < 10 and time.time() < deadline:
            time.sleep(0.02)
        assert waiting(srv) == 10
        time.sleep(0.5)  # let every queued request settle (see the closing note of 2026-12-07)
        r = requests.post(srv.url + "/v1/completions", json={"model": SERVED, "prompt": "x", "max_tokens": 1},
                          timeout=30)
        assert r.status_code == 429  # the queue is full
        t0 = time.time()
        for s in socks:
            s.close()
        while waiting(srv) > 0 and time.time() - t0 < 5:
            time.sleep(0.01)
        freed = time.time() - t0
        print(f"10 closed queued requests left the queue in {freed * 1000:.0f} ms")
        assert waiting(srv) == 0 and freed < 1.0, freed
        assert gauge(srv, "vllm:num_requests_running") == 1  # still busy: the next one queues, not 429
        s = open_stream(srv)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        s.close()
        m = requests.get(srv.url + "/metrics", timeout=10).text
        assert "hydrad_requests_cancelled_total" in m
    finally:
        long_sock.close()
