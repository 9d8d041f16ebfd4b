"""gen_golden_adapters.py - regenerate tests/golden/adapters/: logits and greedy continuations
of SmolLM2 with three seeded test adapters (plain LoRA, HydraLoRA K=3, HydraLoRA K=4 on all
projections), computed by the independent numpy reference scripts/ref_llama.py. The adapters
themselves are not committed: adapters.json records the exact make_test_adapter.py argv that
rebuilds them (and their sha256), so tests regenerate them at test time.

Usage:
    .venv/bin/python scripts/gen_golden_adapters.py [--model GGUF] [--out tests/golden/adapters]
Placeholders in the recorded argv: {OUT} = a scratch directory, {MODEL} = the base GGUF path.
Run argv with the repo root as working directory and the pinned .venv python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from gen_golden_forward import (DEFAULT_MODEL, PROMPTS, TOLERANCE, prompt_record,  # noqa: E402
                                sha256_file, versions, write_bin)
from gguf_tokenizer import encode_special, load_hf_tokenizer  # noqa: E402
from ref_llama import Model, load_adapter  # noqa: E402

ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _argv(name, seed, r, K, alpha, targets, dtype):
    return ["scripts/make_test_adapter.py", "--out", "{OUT}/" + name, "--seed", str(seed),
            "--r", str(r), "--K", str(K), "--alpha", str(alpha), "--targets", targets,
            "--dtype", dtype, "--base", "{MODEL}"]


# (name, argv). Scales s = alpha/r: 2.0, 1.5, 0.5 (B is calibrated by ratio/s, so the size
# of the delta does not depend on alpha, but a wrong s shows).
ADAPTERS = [
    ("lora_qv", _argv("lora_qv", 11, 8, 0, 16, "q_proj,v_proj", "f32")),
    ("hydra_k3", _argv("hydra_k3", 12, 8, 3, 12, "q_proj,k_proj,v_proj,o_proj", "bf16")),
    ("hydra_k4_all", _argv("hydra_k4_all", 13, 16, 4, 8, ALL7, "f16")),
]
# Every forward prompt: which ones have no near-tie depends on the adapter, so all are kept
# (see greedy_strict_prefix); a test may use any subset.
PROMPT_NAMES = [p[0] for p in PROMPTS]
GATE_ADAPTER, GATE_PROMPT, GATE_LAYER, GATE_MODULE = "hydra_k3", "chat_capital", 0, "q_proj"


def build(argv, out_dir: str, model_path: str) -> str:
    args = [a.replace("{OUT}", out_dir).replace("{MODEL}", model_path) for a in argv]
    subprocess.run([sys.executable] + args, cwd=ROOT, check=True)
    return args[args.index("--out") + 1]


def gate_record(model: Model, adapter, ids):
    """Router gates softmax(R x) of GATE_LAYER/GATE_MODULE for every prompt token."""
    seen = []

    def hook(layer, mod, x):
        if layer == GATE_LAYER and mod == GATE_MODULE:
            seen.append(adapter.gates(layer, mod, x))
    model.hook = hook
    try:
        model.forward(ids, adapter)
    finally:
        model.hook = None
    g = seen[0]
    return {"adapter": GATE_ADAPTER, "prompt": GATE_PROMPT, "layer": GATE_LAYER,
            "module": GATE_MODULE, "n_tokens": len(ids),
            "mean_gate": [float(v) for v in g.mean(axis=0)],
            "gates_per_token": [[round(float(v), 6) for v in row] for row in g],
            "tolerance": "abs error <= 1e-4 per mean gate (float32 softmax of R x)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "adapters"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    model_path = os.path.abspath(a.model)
    tok = load_hf_tokenizer(model_path)
    model = Model(model_path)
    prompts = {n: (t, c) for n, t, c in PROMPTS}
    ids_of = {n: encode_special(tok, prompts[n][0]) for n in PROMPT_NAMES}
    base_logits = {n: model.forward(ids_of[n])[-1] for n in PROMPT_NAMES}
    doc = {
        "description": "Logits with seeded test adapters from scripts/ref_llama.py (numpy "
                       "fp32, HF layout; HydraLoRA y = W x + s sum_k softmax(R x)_k B_k A x)",
        "regenerate": "scripts/gen_golden_adapters.py",
        "model": os.path.basename(model_path),
        "model_sha256": sha256_file(model_path),
        "versions": versions(),
        "argv_placeholders": {"{OUT}": "scratch directory", "{MODEL}": "base GGUF path"},
        "argv_runner": ".venv/bin/python, working directory = repo root",
        "logits_format": "little-endian float32, vocab values, last prompt position",
        "tolerance": TOLERANCE,
        "adapters": [],
    }
    with tempfile.TemporaryDirectory(prefix="hy_golden_ad_") as tmp:
        for name, av in ADAPTERS:
            t1 = time.time()
            d = build(av, tmp, model_path)
            ad = load_adapter(d)
            rec = {"name": name, "argv": av, "r": ad.r, "lora_alpha": ad.alpha,
                   "lora_nums": ad.K, "scale": ad.scale,
                   "target_modules": ad.config["target_modules"],
                   "adapter_config_sha256": sha256_file(os.path.join(d, "adapter_config.json")),
                   "safetensors_sha256": sha256_file(
                       os.path.join(d, "adapter_model.safetensors")),
                   "safetensors_bytes": os.path.getsize(
                       os.path.join(d, "adapter_model.safetensors")),
                   "prompts": []}
            for j, pn in enumerate(PROMPT_NAMES):
                ids = ids_of[pn]
                pr, lg = prompt_record(model, ids, ad)
                fn = f"{name}_p{j}.bin"
                write_bin(os.path.join(a.out, fn), lg)
                diff = float(np.max(np.abs(lg - base_logits[pn])))
                rec["prompts"].append({"name": pn, "text": prompts[pn][0], "ids": ids,
                                       "n_tokens": len(ids), "last_logits": fn,
                                       "max_abs_diff_vs_base": diff, **pr})
                print(f"{name}/{pn}: range {pr['logit_range']:.3f}, |diff vs base| {diff:.3f}, "
                      f"argmax {pr['argmax']}, min margin {min(pr['greedy32_margins']):.4f}, "
                      f"strict prefix {pr['greedy_strict_prefix']}",
                      file=sys.stderr)
                if name == GATE_ADAPTER and pn == GATE_PROMPT:
                    doc["gate_stats"] = gate_record(model, ad, ids)
            doc["adapters"].append(rec)
            print(f"{name}: {time.time() - t1:.1f}s", file=sys.stderr)
    print("gates:", doc["gate_stats"]["mean_gate"], file=sys.stderr)
    with open(os.path.join(a.out, "adapters.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
