"""ref_llama.py - independent numpy fp32 reference forward pass for GGUF llama models,
with optional HydraLoRA / PEFT LoRA adapters, used to generate golden files.
It works in Hugging Face layout (Q/K rows un-permuted, rotate_half RoPE) so that it checks
hydrad's GGUF-layout RoPE independently; it must never read anything hydrad produced.

Usage:
    from ref_llama import Model, load_adapter
    m = Model("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = m.forward([1, 9690, 198])                 # [3, vocab] float32
    ids = m.greedy([1, 9690, 198], 32)                 # 32 greedy ids
    ad = load_adapter("path/to/adapter_dir")           # adapter_config.json + safetensors
    logits = m.forward([1, 9690, 198], adapter=ad)

Math (HF LlamaForCausalLM, fp32 throughout):
    x = embed[ids]
    per layer: h = rmsnorm(x) * attn_norm; q,k,v = h Wq^T, h Wk^T, h Wv^T;
               RoPE(rotate_half) on q,k; causal GQA softmax(q k^T / sqrt(d)) v; x += o Wo^T
               h = rmsnorm(x) * ffn_norm; x += (silu(h Wg^T) * (h Wu^T)) Wd^T
    logits = (rmsnorm(x) * output_norm) Wout^T    (Wout = token_embd when output.weight absent)
Adapter on a targeted linear y = W x (DESIGN.md section 1, HydraLoRA arXiv 2404.19245):
    y = W x + s * sum_k softmax(R x)_k B_k (A x),  s = alpha/r (alpha/sqrt(r) with rslora);
    plain LoRA is K = 1 with gate 1.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Dict, List, Optional

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# HF module name -> GGUF tensor suffix in blk.{i}.
MODULES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
    "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def _meta(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata {key} missing")
        return default
    return f.contents()


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert the GGUF converter's Q/K row permutation (GGUF row h*d + 2i + j holds HF row
    h*d + j*d/2 + i): GGUF layout [out, in] -> HF layout [out, in]."""
    out, inp = w.shape
    d = out // n_head
    return (w.reshape(n_head, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)).copy()


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF layout -> GGUF layout (the converter's permutation); inverse of unpermute_rows."""
    out, inp = w.shape
    d = out // n_head
    return (w.reshape(n_head, 2, d // 2, inp).swapaxes(1, 2).reshape(out, inp)).copy()


def read_base_weight(reader: GGUFReader, name: str) -> np.ndarray:
    """Dequantise one GGUF tensor to float32 with numpy shape [rows(out), cols(in)]."""
    for t in reader.tensors:
        if t.name == name:
            return _deq(t)
    raise KeyError(f"tensor {name} not in GGUF")


def _deq(t) -> np.ndarray:
    a = dequantize(t.data, t.tensor_type)
    a = np.asarray(a, dtype=np.float32)
    # GGUF shape lists ne0 (fastest) first; numpy wants it last.
    shape = tuple(int(x) for x in reversed(t.shape))
    return np.ascontiguousarray(a.reshape(shape))


class Config:
    def __init__(self, reader: GGUFReader):
        arch = _meta(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"architecture {arch!r} is not llama")
        p = "llama."
        self.n_layer = int(_meta(reader, p + "block_count"))
        self.n_embd = int(_meta(reader, p + "embedding_length"))
        self.n_ff = int(_meta(reader, p + "feed_forward_length"))
        self.n_head = int(_meta(reader, p + "attention.head_count"))
        self.n_head_kv = int(_meta(reader, p + "attention.head_count_kv", self.n_head))
        self.eps = float(_meta(reader, p + "attention.layer_norm_rms_epsilon"))
        self.rope_theta = float(_meta(reader, p + "rope.freq_base", 10000.0))
        self.head_dim = self.n_embd // self.n_head
        self.rope_dim = int(_meta(reader, p + "rope.dimension_count", self.head_dim))
        if self.rope_dim != self.head_dim:
            raise ValueError("partial RoPE is not supported by this reference")


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))).astype(np.float32) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- adapters

_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2),
              "F64": (np.float64, 8)}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Minimal safetensors reader (F32, F16, BF16, F64) -> float32 numpy arrays.
    Written here (not safetensors.numpy) because numpy has no bfloat16."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError("safetensors file too short")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if 8 + hlen > len(raw):
        raise ValueError("safetensors header runs past the file")
    hdr = json.loads(raw[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dt} not supported")
        npdt, size = _ST_DTYPES[dt]
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        n = int(np.prod(shape)) if shape else 1
        if e - b != n * size or base + e > len(raw):
            raise ValueError(f"{name}: bad data_offsets")
        buf = raw[base + b:base + e]
        if dt == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            a = u.view(np.float32)
        else:
            a = np.frombuffer(buf, dtype=np.dtype(npdt).newbyteorder("<")).astype(np.float32)
        out[name] = a.reshape(shape).copy()
    return out


class Adapter:
    """Adapter in HF layout: mods[(layer, module)] = (A [r,in], Bcat list of K [out,r],
    R [K,in] or None). scale = alpha/r (or alpha/sqrt(r))."""

    def __init__(self, config: dict, tensors: Dict[str, np.ndarray]):
        self.config = config
        self.r = int(config["r"])
        self.alpha = float(config.get("lora_alpha", self.r))
        rs = bool(config.get("use_rslora", False))
        self.scale = self.alpha / (np.sqrt(self.r) if rs else self.r)
        if config.get("fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out adapters are not supported")
        self.K = int(config.get("lora_nums", 0) or 0)
        self.mods = {}
        prefix = "base_model.model.model.layers."
        for key, a in tensors.items():
            if not key.startswith(prefix) or not key.endswith(".lora_A.weight"):
                continue
            rest = key[len(prefix):-len(".lora_A.weight")]  # "{i}.self_attn.q_proj"
            li, parent, mod = rest.split(".")
            stem = key[:-len("lora_A.weight")]
            if self.K >= 1:
                bs = [tensors[f"{stem}lora_B{k}.weight"] for k in range(self.K)]
                rt = tensors[f"{stem}lora_route.weight"]
            else:
                bs = [tensors[f"{stem}lora_B.weight"]]
                rt = None
            self.mods[(int(li), mod)] = (a, bs, rt)

    def delta(self, layer: int, mod: str, x: np.ndarray) -> Optional[np.ndarray]:
        """s * sum_k softmax(R x)_k B_k (A x) for x [T, in]; None when not targeted."""
        m = self.mods.get((layer, mod))
        if m is None:
            return None
        a, bs, rt = m
        h = x @ a.T  # [T, r]
        if rt is None:
            y = h @ bs[0].T
        else:
            g = self.gates(layer, mod, x)  # [T, K]
            y = np.zeros((x.shape[0], bs[0].shape[0]), dtype=np.float32)
            for k, b in enumerate(bs):
                y += g[:, k:k + 1] * (h @ b.T)
        return (np.float32(self.scale) * y).astype(np.float32)

    def gates(self, layer: int, mod: str, x: np.ndarray) -> np.ndarray:
        """Router gates softmax(R x) [T, K] (float32); ones for plain LoRA."""
        a, bs, rt = self.mods[(layer, mod)]
        if rt is None:
            return np.ones((x.shape[0], 1), dtype=np.float32)
        return _softmax((x @ rt.T).astype(np.float32), axis=-1).astype(np.float32)


def load_adapter(path: str) -> Adapter:
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError("not a LORA adapter")
    return Adapter(cfg, read_safetensors(os.path.join(path, "adapter_model.safetensors")))


# ----------------------------------------------------------------------------- model

class Model:
    """fp32 llama forward in HF layout from a GGUF file (all weights dequantised up front)."""

    def __init__(self, gguf_path: str, kv_fp16: bool = False):
        # kv_fp16: round K and V to float16 as they enter the cache (everything else stays fp32),
        # to compare with an engine whose KV cache is fp16 at tolerances below that rounding.
        self.kv_fp16 = kv_fp16
        reader = GGUFReader(gguf_path)
        self.cfg = c = Config(reader)
        t = {tt.name: tt for tt in reader.tensors}
        self.tok_embd = _deq(t["token_embd.weight"])          # [vocab, n_embd]
        self.vocab = self.tok_embd.shape[0]
        self.output = _deq(t["output.weight"]) if "output.weight" in t else self.tok_embd
        self.output_norm = _deq(t["output_norm.weight"])
        self.layers = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            L = {
                "attn_norm": _deq(t[p + "attn_norm.weight"]),
                "ffn_norm": _deq(t[p + "ffn_norm.weight"]),
                "q_proj": unpermute_rows(_deq(t[p + "attn_q.weight"]), c.n_head),
                "k_proj": unpermute_rows(_deq(t[p + "attn_k.weight"]), c.n_head_kv),
                "v_proj": _deq(t[p + "attn_v.weight"]),
                "o_proj": _deq(t[p + "attn_output.weight"]),
                "gate_proj": _deq(t[p + "ffn_gate.weight"]),
                "up_proj": _deq(t[p + "ffn_up.weight"]),
                "down_proj": _deq(t[p + "ffn_down.weight"]),
            }
            self.layers.append(L)
        d = c.head_dim
        self.inv_freq = (1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)))
        # optional probe: called as hook(layer, module, x_in) for every targeted linear
        self.hook = None

    def _lin(self, i: int, mod: str, x: np.ndarray, adapter: Optional[Adapter]) -> np.ndarray:
        y = x @ self.layers[i][mod].T
        if adapter is not None:
            if self.hook is not None:
                self.hook(i, mod, x)
            dy = adapter.delta(i, mod, x)
            if dy is not None:
                y = y + dy
        return y

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [H, T, d]; HF rotate_half with cos/sin of cat(freqs, freqs)."""
        f = np.outer(pos.astype(np.float64), self.inv_freq)       # [T, d/2]
        emb = np.concatenate([f, f], axis=-1)
        cos = np.cos(emb).astype(np.float32)
        sin = np.sin(emb).astype(np.float32)
        return x * cos + _rotate_half(x) * sin

    def new_cache(self):
        return {"k": [None] * self.cfg.n_layer, "v": [None] * self.cfg.n_layer, "n": 0}

    def step(self, ids: List[int], cache, adapter: Optional[Adapter] = None,
             all_logits: bool = True) -> np.ndarray:
        """Run ids at positions cache['n']..; extends the cache; returns logits
        [len(ids), vocab] (or [1, vocab] for the last position when all_logits=False)."""
        c = self.cfg
        T = len(ids)
        n0 = cache["n"]
        pos = np.arange(n0, n0 + T)
        H, Hkv, d = c.n_head, c.n_head_kv, c.head_dim
        grp = H // Hkv
        x = self.tok_embd[np.asarray(ids, dtype=np.int64)].astype(np.float32)
        S = n0 + T
        # causal mask over [T, S]: query t (abs n0+t) sees keys <= n0+t
        mask = np.arange(S)[None, :] > (n0 + np.arange(T))[:, None]
        inv_sqrt_d = np.float32(1.0 / np.sqrt(d))
        for i, L in enumerate(self.layers):
            h = _rmsnorm(x, L["attn_norm"], c.eps)
            q = self._lin(i, "q_proj", h, adapter).reshape(T, H, d).transpose(1, 0, 2)
            k = self._lin(i, "k_proj", h, adapter).reshape(T, Hkv, d).transpose(1, 0, 2)
            v = self._lin(i, "v_proj", h, adapter).reshape(T, Hkv, d).transpose(1, 0, 2)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            if self.kv_fp16:  # model a KV cache stored in fp16 (what hydrad keeps)
                k = k.astype(np.float16).astype(np.float32)
                v = v.astype(np.float16).astype(np.float32)
            if cache["k"][i] is None:
                cache["k"][i], cache["v"][i] = k, v
            else:
                cache["k"][i] = np.concatenate([cache["k"][i], k], axis=1)
                cache["v"][i] = np.concatenate([cache["v"][i], v], axis=1)
            K_, V_ = cache["k"][i], cache["v"][i]                     # [Hkv, S, d]
            kk = np.repeat(K_, grp, axis=0)                            # [H, S, d]
            vv = np.repeat(V_, grp, axis=0)
            sc = (q @ kk.transpose(0, 2, 1)) * inv_sqrt_d              # [H, T, S]
            sc = np.where(mask[None], np.float32(-np.inf), sc)
            p = _softmax(sc, axis=-1).astype(np.float32)
            o = (p @ vv).transpose(1, 0, 2).reshape(T, H * d)
            x = x + self._lin(i, "o_proj", o, adapter)
            h = _rmsnorm(x, L["ffn_norm"], c.eps)
            g = self._lin(i, "gate_proj", h, adapter)
            u = self._lin(i, "up_proj", h, adapter)
            x = x + self._lin(i, "down_proj", (_silu(g) * u).astype(np.float32), adapter)
        cache["n"] = S
        if not all_logits:
            x = x[-1:]
        hn = _rmsnorm(x, self.output_norm, c.eps)
        return (hn @ self.output.T).astype(np.float32)

    def forward(self, ids: List[int], adapter: Optional[Adapter] = None) -> np.ndarray:
        """Full causal pass; logits [len(ids), vocab] float32."""
        return self.step(list(ids), self.new_cache(), adapter)

    def greedy(self, ids: List[int], n: int, adapter: Optional[Adapter] = None,
               margins: Optional[list] = None) -> List[int]:
        """n greedy ids continuing ids (no stop at EOS), with a KV cache. If margins is a
        list, the top-1 minus top-2 logit gap of each step is appended to it."""
        cache = self.new_cache()
        lg = self.step(list(ids), cache, adapter, all_logits=False)[-1]
        out = []
        for j in range(n):
            t = int(np.argmax(lg))
            if margins is not None:
                top2 = np.partition(lg, -2)[-2:]
                margins.append(float(top2[1] - top2[0]))
            out.append(t)
            if j + 1 < n:
                lg = self.step([t], cache, adapter, all_logits=False)[-1]
        return out


if __name__ == "__main__":
    import time
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    t0 = time.time()
    m = Model(path)
    print(f"loaded in {time.time() - t0:.1f}s")
    ids = [1, 9690, 198]
    t0 = time.time()
    lg = m.forward(ids)
    print(f"forward {len(ids)} tokens {time.time() - t0:.2f}s argmax {int(np.argmax(lg[-1]))}")
    print("greedy", m.greedy(ids, 8))
