"""load_steps.py - does loading adapters slow the engine's steps? (issue 18; run by bench_scale.sh)

Against a running `hydrad serve --adapter-resolver DIR`: STREAMS clients keep the base model
decoding the whole time; then two windows of WINDOW seconds each send the same 20 one-token
requests, spread evenly: in the warm window to 20 adapters already loaded and resident, in the
cold window to 20 adapters never used (each is read, validated and packed on a loader thread while
the others decode). The engine's step-time histogram (/metrics hydrad_engine_step_seconds) is read
at each window's edges; the p50/p99 of each window come from the bucket counts (linear within a
bucket). Prints one JSON line: steps, p50/p99 per window, and cold p99 / warm p99 (target <= 1.1).
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time

import requests


def hist(url):
    """Cumulative bucket counts of hydrad_engine_step_seconds: [(le, count)] with +Inf last."""
    out = []
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r'^hydrad_engine_step_seconds_bucket\{le="([^"]+)"\} (\d+)$', line)
        if m:
            out.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), int(m.group(2))))
    return out


def quantile(h0, h1, q):
    """q-quantile of the steps between two scrapes; linear inside a bucket."""
    cum = [(le, c1 - c0) for (le, c0), (_, c1) in zip(h0, h1)]
    n = cum[-1][1]
    if n == 0:
        return float("nan")
    want, lo, below = q * n, 0.0, 0
    for le, c in cum:
        if c >= want:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (want - below) / max(1, c - below)
        lo, below = le, c
    return lo


def one(url, model, max_tokens, prompt="Hi"):
    r = requests.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, "ignore_eos": True}, timeout=600)
    r.raise_for_status()


def window(url, names, secs):
    """Send one request per name, evenly over secs; returns the histogram before and after."""
    h0 = hist(url)
    t0 = time.time()
    threads = []
    for i, n in enumerate(names):
        time.sleep(max(0.0, t0 + i * secs / len(names) - time.time()))
        t = threading.Thread(target=one, args=(url, n, 1))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    time.sleep(max(0.0, t0 + secs - time.time()))
    return h0, hist(url)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--first", type=int, default=1000, help="first adapter index used (names are %%04d)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--window", type=float, default=20.0)
    a = ap.parse_args()
    warm = [f"{a.first + i:04d}" for i in range(20)]
    cold = [f"{a.first + 20 + i:04d}" for i in range(20)]
    for n in warm:  # loaded (and resident: the server runs with --max-loras >= 21) before timing
        one(a.url, n, 1)
    stop = threading.Event()

    def decode():
        while not stop.is_set():
            one(a.url, "base", 48, "Write a long story about the sea.")

    ds = [threading.Thread(target=decode) for _ in range(a.streams)]
    for t in ds:
        t.start()
    time.sleep(5)  # the decoding batch settles
    w0, w1 = window(a.url, warm, a.window)
    c0, c1 = window(a.url, cold, a.window)
    stop.set()
    for t in ds:
        t.join()
    res = {"streams": a.streams, "window_s": a.window,
           "warm_steps": w1[-1][1] - w0[-1][1], "cold_steps": c1[-1][1] - c0[-1][1],
           "warm_p50_ms": 1e3 * quantile(w0, w1, 0.5), "warm_p99_ms": 1e3 * quantile(w0, w1, 0.99),
           "cold_p50_ms": 1e3 * quantile(c0, c1, 0.5), "cold_p99_ms": 1e3 * quantile(c0, c1, 0.99)}
    res["p99_ratio"] = res["cold_p99_ms"] / res["warm_p99_ms"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
