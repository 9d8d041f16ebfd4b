"""spec_bench.py - decode speed of one running hydrad on a workload (issue 20; run by bench_spec.sh).

Workloads: "copy" (answers that copy long spans of their prompt: correct the spelling of a
~200-token paragraph, reformat a list as JSON, edit a code snippet) and "chat" (open-ended
questions). STREAMS clients each send the workload's prompts in turn (greedy chat completions,
streamed, ROUNDS times over) to MODEL. Decode speed is the tokens after each answer's first,
summed, over the wall time from the first client's start to the last's end minus each answer's
time to first token (one stream: exactly the decode time). Prints one JSON line with it and the
draft counters' change (/metrics vllm:spec_decode_*), whose ratio is the acceptance rate.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import requests

PARAGRAPH = (
    "Teh history of the citty begins in the erly medieval period, when a smal setlement grew up "
    "arround a crossing of the river. Merchents from the north and the south met ther to trade wool, "
    "salt and timbr, and by the twelth century the town had a market charter, a stone bridge and a "
    "church whose tower can stil be seen today. The plague of the fourteenth centruy halved the "
    "population, but the wool trade recoverd and the town grew rich again. In the sixteenth century "
    "a grammer school was founded, and its libary, with more than two thousand books, became famous "
    "across the region. The industrial revolution brought canals, then railways, and with them mills "
    "that emploied thousands of workers in long and dangerus shifts. Today the mills are musuems, "
    "the canals carry boats of touristes, and the old market still opens every saturday morning."
)
LIST = "\n".join(f"- {n}: {r}, {c}" for n, r, c in [
    ("Ada Lovelace", "mathematician", "London"), ("Alan Turing", "computer scientist", "Manchester"),
    ("Grace Hopper", "rear admiral", "Arlington"), ("Edsger Dijkstra", "professor", "Austin"),
    ("Barbara Liskov", "professor", "Cambridge"), ("Donald Knuth", "professor", "Stanford"),
    ("Margaret Hamilton", "engineer", "Boston"), ("Ken Thompson", "engineer", "Murray Hill")])
CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        price = item["price"]
        quantity = item["quantity"]
        total = total + price * quantity
    total = total + total * tax_rate
    return total


def average_price(items):
    total = 0
    count = 0
    for item in items:
        total = total + item["price"]
        count = count + 1
    return total / count
'''
WORKLOADS = {
    "copy": [
        "Correct the spelling mistakes in this paragraph. Answer with the corrected paragraph only.\n\n" + PARAGRAPH,
        "Reformat this list as a JSON array of objects with the keys name, role and city. Answer with "
        "the JSON only.\n\n" + LIST,
        "Rename the variable `total` to `running_sum` in this code. Answer with the whole code only.\n\n" + CODE,
    ],
    "chat": [
        "What are the benefits of regular exercise?",
        "Write a short story about a lighthouse keeper.",
        "Explain how a bicycle works to a child.",
    ],
}


def counters(url):
    out = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            if line.startswith(f"vllm:spec_decode_{k}_total"):
                out[k] = float(line.rsplit(" ", 1)[1])
    return out


def one(url, model, prompt, max_tokens):
    """(tokens, seconds to the first token, seconds in all) of one streamed greedy answer."""
    t0 = time.time()
    r = requests.post(url + "/v1/chat/completions", stream=True, timeout=900, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    r.raise_for_status()
    first, n = None, 0
    for line in r.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        j = json.loads(line[6:])
        if j.get("choices") and j["choices"][0].get("delta", {}).get("content") and first is None:
            first = time.time() - t0
        if j.get("usage"):
            n = j["usage"]["completion_tokens"]
    return n, first or 0.0, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="base")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    prompts = WORKLOADS[a.workload]
    one(a.url, a.model, prompts[0], 8)  # warm-up (and the prompt's prefix cache is not what we time)
    c0 = counters(a.url)
    results, lock = [], threading.Lock()

    def client(k):
        for r in range(a.rounds):
            for i in range(len(prompts)):
                res = one(a.url, a.model, prompts[(i + k) % len(prompts)], a.max_tokens)
                with lock:
                    results.append(res)

    t0 = time.time()
    th = [threading.Thread(target=client, args=(k,)) for k in range(a.streams)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.time() - t0
    c1 = counters(a.url)
    tokens = sum(max(0, n - 1) for n, _, _ in results)
    # one stream: the decode time is each answer's time after its first token; several: the wall
    # time less the mean time to first token per stream (prefill shared with the others' decodes)
    decode_s = sum(t - f for _, f, t in results) if a.streams == 1 else \
        wall - sum(f for _, f, _ in results) / a.streams
    d = {k: c1.get(k, 0) - c0.get(k, 0) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    print(json.dumps({"workload": a.workload, "streams": a.streams, "answers": len(results),
                      "tokens": sum(n for n, _, _ in results), "decode_tok_s": tokens / decode_s,
                      "wall_s": wall, "draft_tokens": d["num_draft_tokens"], "accepted": d["num_accepted_tokens"],
                      "acceptance": d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else 0}))


if __name__ == "__main__":
    main()
