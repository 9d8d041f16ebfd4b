"""make_test_adapter.py - write a seeded random PEFT LoRA / HydraLoRA adapter directory
(adapter_config.json + adapter_model.safetensors, the real file formats) for a GGUF llama
base model. Test input only: the weights are random, never trained, never hydrad output.

Usage:
    python scripts/make_test_adapter.py --out DIR --seed 1 --r 8 --K 3 --alpha 16 \
        --targets q_proj,k_proj,v_proj,o_proj --dtype bf16 \
        --base models/SmolLM2-135M-Instruct.Q4_1.gguf [--zero-b] [--ratio 0.2]

Tensors (HF row order, PEFT key names, prefix base_model.model.model.layers.{i}.):
    {self_attn|mlp}.{mod}.lora_A.weight      [r, in]     A ~ N(0, 1/sqrt(in))
    ... .lora_B.weight                        [out, r]    plain LoRA (--K 0 / absent)
    ... .lora_B{k}.weight, k = 0..K-1         [out, r]    HydraLoRA heads (--K >= 1)
    ... .lora_route.weight                    [K, in]     R ~ N(0, rho) (HydraLoRA)
B ~ N(0, b) with b = ratio * rms_row_norm(W) / (s * sqrt(r)), s = alpha / r, where W is the
base weight of that projection (dequantised from the GGUF) and rms_row_norm(W) =
||W||_F / sqrt(out): for an input x with iid entries this makes rms(s B A x) about
ratio * rms(W x), i.e. the adapter moves each projection by ~ratio of its output.
Router: rho = 3 / (sqrt(in) * rms(norm weight)) for the modules fed by an RMSNorm (q, k, v
use blk.i.attn_norm, gate, up use blk.i.ffn_norm; the normalised input then has rms about
rms(norm weight), so router logits have std about 3 and gates are far from uniform), and
rho = 4 / sqrt(in) for o_proj and down_proj (inputs of rms ~0.03-0.7 in SmolLM2).
Draw order (one numpy default_rng(seed), float64 standard normals, then scaled and cast):
for layer 0..n-1, for module in q,k,v,o,gate,up,down order if targeted: A, B_0..B_{K-1}
(or B), R. --zero-b multiplies every B by 0 after drawing (same A and R as without it).
Deterministic for a given seed, numpy version (tests/requirements.txt) and base GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_llama import MODULE_PARENT, MODULES, Config  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def module_dims(c: Config, mod: str):
    """(in, out) of a projection in HF layout."""
    qd = c.n_head * c.head_dim
    kvd = c.n_head_kv * c.head_dim
    return {
        "q_proj": (c.n_embd, qd), "k_proj": (c.n_embd, kvd), "v_proj": (c.n_embd, kvd),
        "o_proj": (qd, c.n_embd), "gate_proj": (c.n_embd, c.n_ff),
        "up_proj": (c.n_embd, c.n_ff), "down_proj": (c.n_ff, c.n_embd),
    }[mod]


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (no NaNs here)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 arrays as dtype F32 | F16 | BF16 in the safetensors format
    (u64 LE header length, JSON header padded with spaces to 8 bytes, raw LE data)."""
    st = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        a = tensors[name]
        if dtype == "f32":
            b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        elif dtype == "f16":
            b = np.ascontiguousarray(a.astype(np.float16), dtype="<f2").tobytes()
        else:
            b = to_bf16_bits(a).astype("<u2").tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def weight_rms_row_norm(reader_tensors, layer: int, mod: str) -> float:
    t = reader_tensors[f"blk.{layer}.{MODULES[mod]}.weight"]
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
    rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
    return float(np.sqrt(np.sum(w * w) / rows))


NORM_OF = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm",
           "gate_proj": "ffn_norm", "up_proj": "ffn_norm"}


def router_std(reader_tensors, layer: int, mod: str, din: int) -> float:
    if mod not in NORM_OF:
        return 4.0 / np.sqrt(din)
    t = reader_tensors[f"blk.{layer}.{NORM_OF[mod]}.weight"]
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
    return 3.0 / (np.sqrt(din) * float(np.sqrt(np.mean(w * w))))


def make_adapter(out: str, seed: int, r: int, K: int, alpha: float, targets, dtype: str,
                 base: str, zero_b: bool = False, ratio: float = 0.2) -> None:
    reader = GGUFReader(base)
    c = Config(reader)
    rt = {t.name: t for t in reader.tensors}
    for t in targets:
        if t not in ORDER:
            raise SystemExit(f"unknown target module {t!r}")
    if r < 1 or K < 0:
        raise SystemExit("need r >= 1 and K >= 0")
    s = alpha / r
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(c.n_layer):
        for mod in ORDER:
            if mod not in targets:
                continue
            din, dout = module_dims(c, mod)
            key = f"base_model.model.model.layers.{i}.{MODULE_PARENT[mod]}.{mod}."
            bstd = ratio * weight_rms_row_norm(rt, i, mod) / (s * np.sqrt(r))
            a = rng.standard_normal((r, din)) / np.sqrt(din)
            tensors[key + "lora_A.weight"] = a.astype(np.float32)
            bz = 0.0 if zero_b else 1.0
            for k in range(max(K, 1)):
                b = rng.standard_normal((dout, r)) * bstd * bz
                name = "lora_B.weight" if K == 0 else f"lora_B{k}.weight"
                tensors[key + name] = b.astype(np.float32)
            if K >= 1:
                route = rng.standard_normal((K, din)) * router_std(rt, i, mod, din)
                tensors[key + "lora_route.weight"] = route.astype(np.float32)
    os.makedirs(out, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_MODEL_NAME,
        "r": r,
        "lora_alpha": alpha if alpha != int(alpha) else int(alpha),
        "lora_dropout": 0.0,
        "target_modules": [m for m in ORDER if m in targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if K >= 1:
        cfg["lora_nums"] = K
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out, "adapter_model.safetensors"), tensors, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--K", type=int, default=0, help="HydraLoRA heads; 0 = plain LoRA naming")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--base", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "..", "models",
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--zero-b", action="store_true", help="all B = 0 (adapter is a no-op)")
    ap.add_argument("--ratio", type=float, default=0.2,
                    help="target rms(delta)/rms(W x) per projection (default 0.2)")
    a = ap.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    make_adapter(a.out, a.seed, a.r, a.K, a.alpha, targets, a.dtype, a.base, a.zero_b, a.ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
