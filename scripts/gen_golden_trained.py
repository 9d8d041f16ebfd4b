#!/usr/bin/env python3
"""gen_golden_trained.py - goldens for the trained demo adapters from the training framework
(PyTorch + transformers + PEFT, fp32 on the GGUF's dequantised weights), never from hydrad:
reads the committed fixture files (tests/fixtures/adapters/trained/{lora,hydra}, fp16) and
writes tests/golden/trained/trained.json. Run in the training venv (make train-goldens):

    .venv-train/bin/python scripts/gen_golden_trained.py [--em-per-task 50]

Per model (base, lora, hydra) and per held-out prompt (the first 8 of each task in tasks.py):
  ids             the prompt's token ids (chat template with the default system prompt)
  range, argmax   of the last position's logits (max - min over the vocabulary)
  top             the 64 largest last-position logits as [id, value]
  probe           the last-position logits of PROBE_IDS (1024 fixed ids, seeded)
  greedy          the 32-token greedy continuation (stops at nothing)
  margin          per continuation step, top-1 minus top-2 logit (a near-tie flags a step
                  where rounding may pick either token)
Router controls (hydra only, one prompt per task): force each head, temperature 0.5 with
top_k 2, and head 0 masked - same fields, computed with the control applied in every layer.
exact_match: the framework's greedy exact match per task on the first --em-per-task held-out
examples of each task (batched greedy, left padding, up to 48 new tokens, stop at <|im_end|>).
router: HydraLoRA's mean gate per head per task over the generated answer tokens (all layers
and projections), and the Jensen-Shannon divergence (nats) between every pair of tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
import train_hydralora as th  # noqa: E402

ROOT = th.ROOT
FIX = os.path.join(ROOT, "tests/fixtures/adapters/trained")
OUT = os.path.join(ROOT, "tests/golden/trained/trained.json")
N_PROMPTS = 8
N_GREEDY = 32
PROBE_IDS = sorted(np.random.default_rng(2404).choice(49152, 1024, replace=False).tolist())


def load_hydra(model, d: str):
    """HydraLinear modules from hydrad's layout (convert_hydralora.py's output, fp16 -> fp32)."""
    from safetensors.numpy import load_file
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    r, K, alpha = cfg["r"], cfg["lora_nums"], cfg["lora_alpha"]
    mods = th.attach_hydra(model, r, K, alpha)
    for name, m in mods:
        pre = f"base_model.model.{name}."
        with torch.no_grad():
            m.lora_A.weight.copy_(torch.from_numpy(sd[pre + "lora_A.weight"].astype(np.float32)))
            for k in range(K):
                m.lora_B[k].copy_(torch.from_numpy(sd[pre + f"lora_B{k}.weight"].astype(np.float32)))
            m.lora_route.weight.copy_(torch.from_numpy(sd[pre + "lora_route.weight"].astype(np.float32)))
    return mods, K


def set_ctl(mods, ctl):
    for _, m in mods:
        m.ctl = ctl


@torch.no_grad()
def record(model, ids):
    """Last logits fields and the greedy continuation with its margins (KV-cached)."""
    x = torch.tensor([ids])
    out = model(input_ids=x, use_cache=True)
    last = out.logits[0, -1].float()
    rec = {"ids": ids, "range": float(last.max() - last.min()), "argmax": int(last.argmax())}
    top = torch.topk(last, 64)
    rec["top"] = [[int(i), round(float(v), 5)] for v, i in zip(top.values, top.indices)]
    rec["probe"] = [round(float(last[i]), 5) for i in PROBE_IDS]
    greedy, margin = [], []
    past, lg = out.past_key_values, last
    for _ in range(N_GREEDY):
        t2 = torch.topk(lg, 2).values
        margin.append(round(float(t2[0] - t2[1]), 5))
        nxt = int(lg.argmax())
        greedy.append(nxt)
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, lg = o.past_key_values, o.logits[0, -1].float()
    rec["greedy"], rec["margin"] = greedy, margin
    return rec


@torch.no_grad()
def generate_batch(model, tok, prompts, max_new=48):
    """Greedy answers for a batch of prompt texts (left padding), cut at <|im_end|>."""
    end = tok.convert_tokens_to_ids(tasks.END)
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = max(len(e) for e in enc)
    ids = torch.full((len(enc), n), end, dtype=torch.long)
    att = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, n - len(e):] = torch.tensor(e)
        att[i, n - len(e):] = 1
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=end, pad_token_id=end)
    res = []
    for row in out[:, n:]:
        toks = row.tolist()
        if end in toks:
            toks = toks[: toks.index(end)]
        res.append(tok.decode(toks, skip_special_tokens=False))
    return res


def exact_match(model, tok, split, per_task, batch=25):
    em = {}
    for t in tasks.TASKS:
        ex = split[t][:per_task]
        hits = 0
        for i in range(0, len(ex), batch):
            chunk = ex[i: i + batch]
            ans = generate_batch(model, tok, [tasks.render_prompt(q) for q, _ in chunk])
            hits += sum(a.strip() == want for a, (_, want) in zip(ans, chunk))
        em[t] = hits / len(ex)
        print(f"  {t}: {hits}/{len(ex)}", flush=True)
    return em


@torch.no_grad()
def router_means(model, tok, mods, K, split, per_task):
    """Mean gate per head per task over the answer tokens the adapter generates (teacher-forced
    on its own greedy answer, all layers and projections), and pairwise JS divergence."""
    means = {}
    for t in tasks.TASKS:
        acc, cnt = np.zeros(K), 0
        for q, _ in split[t][:per_task]:
            p = tasks.render_prompt(q)
            ans = generate_batch(model, tok, [p])[0]
            pi = tok(p, add_special_tokens=False)["input_ids"]
            ai = tok(ans, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(tasks.END)]
            model(input_ids=torch.tensor([pi + ai]))
            # the gates of the positions that sample the answer tokens: the last prompt token on
            for _, m in mods:
                g = m.last_gates[0, len(pi) - 1: len(pi) - 1 + len(ai)].numpy()
                acc += g.sum(0)
                cnt += g.shape[0]
        means[t] = (acc / cnt).tolist()

    def kl(a, b):
        return float(sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0))

    js = {}
    for i, a in enumerate(tasks.TASKS):
        for b in tasks.TASKS[i + 1:]:
            m = [(x + y) / 2 for x, y in zip(means[a], means[b])]
            js[f"{a}/{b}"] = 0.5 * kl(means[a], m) + 0.5 * kl(means[b], m)
    return means, js


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--em-per-task", type=int, default=50)
    ap.add_argument("--router-per-task", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    split = tasks.splits()["test"]
    prompts = [(t, q) for t in tasks.TASKS for q, _ in split[t][:N_PROMPTS]]
    gold = {"generator": "scripts/gen_golden_trained.py", "torch": torch.__version__,
            "probe_ids": PROBE_IDS, "n_greedy": N_GREEDY, "models": {}, "controls": [],
            "exact_match": {}, "exact_match_per_task": a.em_per_task}
    for kind in ["base", "lora", "hydra"]:
        model, tok = th.load_base(a.base)
        mods, K = None, 1
        if kind == "lora":
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, os.path.join(FIX, "lora"))
            model = model.float()
        elif kind == "hydra":
            mods, K = load_hydra(model, os.path.join(FIX, "hydra"))
        model.eval()
        print(f"{kind}: goldens for {len(prompts)} prompts", flush=True)
        recs = []
        for t, q in prompts:
            r = record(model, tok(tasks.render_prompt(q), add_special_tokens=False)["input_ids"])
            r["task"] = t
            recs.append(r)
        gold["models"][kind] = recs
        if kind == "hydra":
            for ti, t in enumerate(tasks.TASKS):
                q = split[t][0][0]
                ids = tok(tasks.render_prompt(q), add_special_tokens=False)["input_ids"]
                ctls = [{"force_head": h} for h in range(K)] + [{"temperature": 0.5, "top_k": 2},
                                                                {"mask_heads": [0]}]
                for c in ctls:
                    mask = [True] * K
                    if "force_head" in c:
                        mask = [k == c["force_head"] for k in range(K)]
                    for k in c.get("mask_heads", []):
                        mask[k] = False
                    set_ctl(mods, {"temp": c.get("temperature", 1.0), "top_k": c.get("top_k", 0), "mask": mask})
                    r = record(model, ids)
                    r.update({"task": t, "control": c})
                    gold["controls"].append(r)
                set_ctl(mods, None)
            print("router means", flush=True)
            means, js = router_means(model, tok, mods, K, split, a.router_per_task)
            gold["router"] = {"K": K, "per_task_examples": a.router_per_task, "mean_gate": means,
                              "js_divergence_nats": js}
        print(f"{kind}: exact match on {a.em_per_task} per task", flush=True)
        gold["exact_match"][kind] = exact_match(model, tok, split, a.em_per_task)
        print(f"  ({time.time() - t0:.0f} s so far)", flush=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(gold, f, separators=(",", ":"))
    print(f"wrote {OUT} ({os.path.getsize(OUT) >> 10} KiB, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
