#!/usr/bin/env python3
"""train_hydralora.py - train the demo adapters on the default model's own weights, on the CPU,
off CI: a plain PEFT LoRA (written by PEFT's save_pretrained) and a HydraLoRA (shared A, K B heads,
a per-token fp32-softmax router; written with the reference code's key names, then turned into
hydrad's layout by convert_hydralora.py). Same data, steps, optimiser and (within 1 %) the same
number of trainable parameters. Not used by make test; `make train` runs it in .venv-train.

The base is the GGUF that hydrad serves, loaded by transformers (dequantised to fp32), so training
and serving see the same weights. Data: scripts/tasks.py's four tasks mixed with no labels; loss on
the answer tokens plus <|im_end|> only. No router auxiliary loss (the reference code has none); the router's learning rate is
--router-lr-mult (default 10) times the rest's: at 1x the router stayed near uniform here.

HydraLoRA, per target linear y = W x (arXiv 2404.19245, DESIGN.md section 1):
    y = W x + s * sum_k softmax(R x)_k B_k A x,   s = alpha / r
A: r x in (kaiming-uniform, as PEFT inits lora_A), B_k: out x r (zeros), R: K x in (nn.Linear's
default init). K: --K N, or --K auto (the paper's recipe: k-means over the base model's mean
last-layer hidden states of training prompts, K = the count with the best silhouette in 2..8).

Usage:
    .venv-train/bin/python scripts/train_hydralora.py --kind lora|hydra --out DIR [--steps 240] [--threads 1]
Writes DIR/ (the adapter hydrad loads, fp16), DIR/train_log.json (loss per step, wall time,
parameter counts, hyper-parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in TARGETS}


def load_base(gguf_path: str):
    """(model, tokenizer) from the GGUF, fp32, eval mode, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.config.quantization_config = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


class HydraLinear(nn.Module):
    """A frozen nn.Linear plus a HydraLoRA: shared A, K B heads, per-token softmax router.
    Router control (inference only, for the goldens): temp, top_k, mask (list of K bools: True =
    head allowed) - the same rules hydrad applies."""

    def __init__(self, base: nn.Linear, r: int, K: int, alpha: float):
        super().__init__()
        self.base, self.r, self.K, self.scale = base, r, K, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(base.out_features, r)) for _ in range(K)])
        self.lora_route = nn.Linear(base.in_features, K, bias=False)
        self.ctl = None  # None or dict(temp=, top_k=, mask=)
        self.last_gates = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lora_route(x).float()
        if self.ctl:
            logits = logits / self.ctl.get("temp", 1.0)
            mask = self.ctl.get("mask")
            if mask is not None:
                allow = torch.tensor(mask, dtype=torch.bool)
                logits = logits.masked_fill(~allow, float("-inf"))
            k = self.ctl.get("top_k", 0)
            if k and k < self.K:
                kth = torch.topk(logits, k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(x)                                       # [..., r]
        g = self.gates(x).to(x.dtype)                            # [..., K]
        self.last_gates = g.detach()
        bcat = torch.cat(list(self.lora_B), dim=1)               # out x K*r: one matmul for all heads
        z = (g.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)      # [..., K*r], head-major
        return self.base(x) + self.scale * (z @ bcat.t())


def attach_hydra(model, r: int, K: int, alpha: float) -> List[Tuple[str, HydraLinear]]:
    out = []
    for i, layer in enumerate(model.model.layers):
        for p in TARGETS:
            parent = getattr(layer, PARENT[p])
            m = HydraLinear(getattr(parent, p), r, K, alpha)
            setattr(parent, p, m)
            out.append((f"model.layers.{i}.{PARENT[p]}.{p}", m))
    return out


def hydra_state(mods: List[Tuple[str, HydraLinear]]) -> Dict[str, torch.Tensor]:
    """The reference code's key names (lora_A, lora_B{k}, lora_route as Linear .weight)."""
    sd = {}
    for name, m in mods:
        pre = f"base_model.model.{name}."
        sd[pre + "lora_A.weight"] = m.lora_A.weight.detach().clone()
        for k in range(m.K):
            sd[pre + f"lora_B{k}.weight"] = m.lora_B[k].detach().clone()
        sd[pre + "lora_route.weight"] = m.lora_route.weight.detach().clone()
    return sd


def encode(tok, corpus: List[Tuple[str, str]]) -> List[Tuple[List[int], int]]:
    """[(ids, n_prompt)]: prompt tokens then answer + <|im_end|> (the loss covers the latter)."""
    end = tok.convert_tokens_to_ids(tasks.END)
    out = []
    for q, a in corpus:
        p = tok(tasks.render_prompt(q), add_special_tokens=False)["input_ids"]
        t = tok(a, add_special_tokens=False)["input_ids"] + [end]
        out.append((p + t, len(p)))
    return out


def batch_tensors(items, pad_id: int):
    """Right-padded ids, attention mask and labels (-100 outside the answer)."""
    n = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    for i, (x, np_) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lab[i, np_: len(x)] = torch.tensor(x[np_:])
    return ids, att, lab


@torch.no_grad()
def choose_k(model, tok, corpus, n: int = 400, seed: int = 0) -> Tuple[int, Dict[int, float]]:
    """The paper's K: k-means (k = 2..8) over mean last-layer hidden states of n training prompts;
    the k with the best silhouette score. Returns (K, {k: silhouette})."""
    feats = []
    for q, _ in corpus[:n]:
        ids = tok(tasks.render_prompt(q), add_special_tokens=False, return_tensors="pt")["input_ids"]
        hs = model.model(input_ids=ids).last_hidden_state[0]
        feats.append(hs.mean(0).numpy())
    X = np.stack(feats)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    rng = np.random.default_rng(seed)
    scores = {}
    for k in range(2, 9):
        best = None
        for _ in range(5):  # restarts; keep the lowest inertia
            c = X[rng.choice(len(X), k, replace=False)]
            for _ in range(100):
                lab = ((X[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
                nc = np.stack([X[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
                if np.allclose(nc, c):
                    break
                c = nc
            inertia = ((X - c[lab]) ** 2).sum()
            if best is None or inertia < best[0]:
                best = (inertia, lab)
        lab = best[1]
        sil = []
        for i in range(len(X)):
            same = D[i, lab == lab[i]]
            a = same.sum() / max(len(same) - 1, 1)
            b = min(D[i, lab == j].mean() for j in range(k) if j != lab[i] and (lab == j).any())
            sil.append((b - a) / max(a, b))
        scores[k] = float(np.mean(sil))
    return max(scores, key=scores.get), scores


def count(params) -> int:
    return int(sum(p.numel() for p in params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["lora", "hydra"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--r", type=int, default=0, help="rank (0: hydra 4; lora matched to hydra's budget)")
    ap.add_argument("--K", default="auto", help="HydraLoRA heads: N, or auto (k-means, see above)")
    ap.add_argument("--alpha-per-r", type=float, default=2.0, help="alpha = this x r (s = alpha / r)")
    ap.add_argument("--router-lr-mult", type=float, default=10.0,
                    help="HydraLoRA: the router's learning rate is this x --lr (1 = the reference code; with "
                         "1 the router stayed within 0.245-0.26 of uniform on every task here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()
    model, tok = load_base(a.base)
    print(f"base loaded in {time.time() - t_start:.0f} s", flush=True)
    corpus = tasks.mixed_train()
    info = {"kind": a.kind, "steps": a.steps, "batch": a.batch, "lr": a.lr, "optimizer": "AdamW(wd=0)",
            "schedule": "linear warmup 20 steps, cosine to 0", "targets": TARGETS,
            "router_aux_loss": "none", "threads": a.threads, "seed": a.seed}

    # K and the ranks: HydraLoRA r=4 with K heads; LoRA's rank gives the closest parameter count.
    if a.K == "auto":
        t0 = time.time()
        K, sil = choose_k(model, tok, corpus)
        info["kmeans_silhouette"] = sil
        print(f"k-means over base hidden states: silhouette {sil} -> K = {K} ({time.time() - t0:.0f} s)", flush=True)
    else:
        K = int(a.K)
    info["K"] = K
    hydra_r = 4
    shapes = []
    for p in TARGETS:
        lin = getattr(getattr(model.model.layers[0], PARENT[p]), p)
        shapes.append((lin.in_features, lin.out_features))
    n_layer = len(model.model.layers)
    hydra_params = n_layer * sum(hydra_r * i + K * hydra_r * o + K * i for i, o in shapes)
    lora_per_r = n_layer * sum(i + o for i, o in shapes)
    if a.kind == "hydra":
        r = a.r or hydra_r
    else:
        r = a.r or max(1, round(hydra_params / lora_per_r))
    alpha = a.alpha_per_r * r
    info.update({"r": r, "lora_alpha": alpha})

    if a.kind == "lora":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        mods = attach_hydra(model, r, K, alpha)
        router = [p for _, m in mods for p in m.lora_route.parameters()]
        trainable = [p for _, m in mods for p in list(m.lora_A.parameters()) + list(m.lora_B)] + router
        info["router_lr_mult"] = a.router_lr_mult
    info["trainable_params"] = count(trainable)
    info["hydra_params_at_K"] = hydra_params
    print(f"{a.kind}: r={r} K={K if a.kind == 'hydra' else 1} alpha={alpha}, "
          f"{info['trainable_params']:,} trainable parameters", flush=True)

    data = encode(tok, corpus)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    groups = [{"params": trainable, "mult": 1.0}]
    if a.kind == "hydra" and a.router_lr_mult != 1.0:
        rids = {id(p) for p in router}
        groups = [{"params": [p for p in trainable if id(p) not in rids], "mult": 1.0},
                  {"params": router, "mult": a.router_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    warm = 20

    def lr_at(step: int) -> float:
        if step < warm:
            return a.lr * (step + 1) / warm
        return a.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm)))

    model.train()
    losses, t_train = [], time.time()
    for step in range(a.steps):
        items = [data[(step * a.batch + i) % len(data)] for i in range(a.batch)]
        ids, att, lab = batch_tensors(items, pad)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["mult"]
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
        if step % 10 == 0 or step == a.steps - 1:
            el = time.time() - t_train
            print(f"step {step + 1}/{a.steps} loss {losses[-1]:.4f} ({el / (step + 1):.2f} s/step, "
                  f"{el:.0f} s)", flush=True)
    info["loss"] = losses
    info["train_seconds"] = round(time.time() - t_train, 1)
    info["total_seconds"] = round(time.time() - t_start, 1)
    model.eval()

    os.makedirs(a.out, exist_ok=True)
    if a.kind == "lora":
        for p in trainable:
            p.data = p.data.half()  # fp16 files, as committed
        model.save_pretrained(a.out)
    else:
        from safetensors.torch import save_file
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in hydra_state(mods).items()},
                      os.path.join(tmp, "adapter_model.safetensors"))
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_nums": K,
                           "target_modules": TARGETS, "bias": "none", "lora_dropout": 0.0,
                           "task_type": "CAUSAL_LM"}, f, indent=2)
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts/convert_hydralora.py"), tmp, a.out,
                            "--dtype", "f16"], check=True)
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {a.out} ({info['train_seconds']} s training)", flush=True)


if __name__ == "__main__":
    main()
