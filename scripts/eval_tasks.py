#!/usr/bin/env python3
"""eval_tasks.py - the four tasks' held-out sets (scripts/tasks.py) sent to a running hydrad with
the official openai client: greedy chat completions, concurrently, base model + LoRA + HydraLoRA
requests mixed in the same batches. Prints exact match per task and overall for each model next
to the training framework's figures (tests/golden/trained/trained.json), and the HydraLoRA
router's mean gate per head per task (the `hydra.return_router` view) and the Jensen-Shannon
divergence between tasks, of the mean gates and of the share of tokens each head dominates.

    .venv/bin/python scripts/eval_tasks.py --url http://127.0.0.1:8000 [--per-task 50]
        [--base-name SmolLM2-135M-Instruct] [--lora lora] [--hydra hydra] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests/golden/trained/trained.json")


def js_divergence(p: List[float], q: List[float]) -> float:
    """Jensen-Shannon divergence in nats (0 .. ln 2)."""
    m = [(a + b) / 2 for a, b in zip(p, q)]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def ask(client, model: str, question: str, router: bool, max_tokens: int) -> dict:
    extra = {"hydra": {"return_router": True}} if router else None
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=max_tokens, extra_body=extra)
    out = {"text": r.choices[0].message.content or ""}
    if router:
        out["router"] = (r.choices[0].model_extra or {}).get("hydra", {}).get("router")
    return out


def evaluate(url: str, models: Dict[str, str], per_task: int, workers: int = 16, max_tokens: int = 48,
             api_key: str = "none", progress=None) -> dict:
    """{"exact_match": {kind: {task: frac, "overall": frac}}, "router": {...}, "seconds": s}.
    models maps kind (base, lora, hydra) to the served model name."""
    from openai import OpenAI
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
    split = tasks.splits()["test"]
    jobs = []
    for t in tasks.TASKS:
        for i, (q, a) in enumerate(split[t][:per_task]):
            for kind, name in models.items():
                jobs.append((kind, name, t, q, a))
    # interleave kinds and tasks so every batch mixes base, LoRA and HydraLoRA
    jobs.sort(key=lambda j: (split[j[2]].index((j[3], j[4])), tasks.TASKS.index(j[2]), j[0]))
    hits: Dict[str, Dict[str, int]] = {k: {t: 0 for t in tasks.TASKS} for k in models}
    gates: Dict[str, List[float]] = {}
    counts: Dict[str, int] = {}
    heads_used: Dict[str, Dict[int, int]] = {}
    t0 = time.time()
    done = 0
    with cf.ThreadPoolExecutor(workers) as ex:
        futs = {ex.submit(ask, client, name, q, kind == "hydra", max_tokens): (kind, t, a)
                for kind, name, t, q, a in jobs}
        for f in cf.as_completed(futs):
            kind, t, want = futs[f]
            res = f.result()
            hits[kind][t] += res["text"].strip() == want
            rt = res.get("router")
            if rt and rt.get("mean_gate"):
                n = len(rt["token_heads"])
                g = gates.setdefault(t, [0.0] * rt["heads"])
                for k, v in enumerate(rt["mean_gate"]):
                    g[k] += v * n
                counts[t] = counts.get(t, 0) + n
                hu = heads_used.setdefault(t, {})
                for h in rt["token_heads"]:
                    hu[h] = hu.get(h, 0) + 1
            done += 1
            if progress and done % 50 == 0:
                progress(f"{done}/{len(jobs)} requests ({time.time() - t0:.0f} s)")
    em = {}
    for k in models:
        em[k] = {t: hits[k][t] / per_task for t in tasks.TASKS}
        em[k]["overall"] = sum(hits[k].values()) / (per_task * len(tasks.TASKS))
    router = {}
    if gates:
        means = {t: [x / counts[t] for x in g] for t, g in gates.items()}
        js = {}
        for i, a in enumerate(tasks.TASKS):
            for b in tasks.TASKS[i + 1:]:
                if a in means and b in means:
                    js[f"{a}/{b}"] = js_divergence(means[a], means[b])
        # the same measure over the per-token dominant head (what the view reports per token)
        K = len(next(iter(means.values())))
        hist = {t: [heads_used.get(t, {}).get(k, 0) / max(1, sum(heads_used.get(t, {}).values())) for k in range(K)]
                for t in means}
        js_dom = {}
        for i, a in enumerate(tasks.TASKS):
            for b in tasks.TASKS[i + 1:]:
                if a in hist and b in hist:
                    js_dom[f"{a}/{b}"] = js_divergence(hist[a], hist[b])
        router = {"mean_gate": means, "js_divergence_nats": js, "dominant_head_counts": heads_used,
                  "dominant_head_share": hist, "dominant_head_js_divergence_nats": js_dom}
    return {"exact_match": em, "router": router, "seconds": time.time() - t0, "requests": len(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--base-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--lora", default="lora")
    ap.add_argument("--hydra", default="hydra")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    models = {"base": a.base_name, "lora": a.lora, "hydra": a.hydra}
    res = evaluate(a.url, models, a.per_task, a.workers, api_key=a.api_key,
                   progress=lambda s: print(s, file=sys.stderr, flush=True))
    fw = {}
    if os.path.exists(GOLDEN):
        g = json.load(open(GOLDEN))
        fw = g.get("exact_match", {})
        fw_n = g.get("exact_match_per_task")
    print(f"exact match, {a.per_task} held-out examples per task, served by hydrad "
          f"(training framework in brackets{f', on {fw_n} per task' if fw else ''}); "
          f"{res['requests']} requests in {res['seconds']:.0f} s")
    print("| task | base | LoRA | HydraLoRA |\n|---|---|---|---|")
    for t in tasks.TASKS + ["overall"]:
        cells = []
        for k in ["base", "lora", "hydra"]:
            s = f"{100 * res['exact_match'][k][t]:.0f} %"
            if k in fw:
                f = fw[k][t] if t in fw[k] else sum(fw[k].values()) / len(fw[k])
                s += f" ({100 * f:.0f} %)"
            cells.append(s)
        print(f"| {t} | " + " | ".join(cells) + " |")
    r = res["router"]
    if r:
        print("\nHydraLoRA router, mean gate per head over the generated tokens (all layers and projections):")
        for t, g in r["mean_gate"].items():
            print(f"  {t:8s} " + " ".join(f"{x:.3f}" for x in g) +
                  "   dominant head per token: " + ", ".join(f"{h}: {n}" for h, n in
                                                           sorted(r["dominant_head_counts"][t].items())))
        print("  Jensen-Shannon divergence between tasks' mean gates (nats): " +
              ", ".join(f"{k} {v:.4f}" for k, v in r["js_divergence_nats"].items()))
        print("  Jensen-Shannon divergence between tasks' dominant-head shares (nats, max ln 2 = 0.693): " +
              ", ".join(f"{k} {v:.3f}" for k, v in r["dominant_head_js_divergence_nats"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
