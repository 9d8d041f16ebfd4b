#!/usr/bin/env python3
"""convert_hydralora.py - turn what the HydraLoRA reference code (github.com/Clin0212/HydraLoRA, a
patched PEFT) saves - adapter_model.bin (a torch pickle of the adapter state dict) and its
adapter_config.json - into the directory hydrad loads: adapter_model.safetensors with PEFT key
names plus a plain adapter_config.json. Values are copied, never changed except by the --dtype
cast; any key or option it does not understand stops it with an error naming it.

Usage:
    python scripts/convert_hydralora.py SRC OUT_DIR [--dtype keep|f32|f16|bf16]

SRC is the reference's output directory (or the file itself): adapter_model.bin needs torch,
adapter_model.safetensors (same keys) does not. --dtype keep (the default) writes each tensor
in its source precision (F32, F16 or BF16; F64 becomes F32).

Key names accepted (the reference registers lora_A, lora_B0..lora_B{K-1} and lora_route as
nn.Linear submodules of each target projection, so each is a [out, in] `.weight`):
    [module.][base_model.][model.[model.]]layers.{i}.{self_attn|mlp}.{proj}.{part}[.{adapter}].weight
    part = lora_A | lora_B{k} | lora_route   (HydraLoRA, K = lora_nums)
         | lora_B                            (plain PEFT LoRA, written back as it is)
    adapter = an adapter-name infix such as `default` (PEFT >= 0.3 layouts); one name per file.
Written as base_model.model.model.layers.{i}.{parent}.{proj}.{part}.weight (DESIGN.md section 1).
Not supported (refused): biases (bias != "none"), modules_to_save (embeddings, lm_head),
MergedLinear (enable_lora), layer subsets, DoRA, rank/alpha patterns, MLLM-HydraLoRA's
LoRA_MOE_LM (one router shared by gate/up/down, with a bias) - that layout is not this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
OUT_PREFIX = "base_model.model.model.layers."
MAX_K = 64  # a sanity bound; hydrad states its own limit when it loads the result

KEY_RE = re.compile(
    r"^(?:module\.)?(?:base_model\.)?(?:model\.){0,2}layers\.(?P<layer>0|[1-9][0-9]*)\."
    r"(?P<parent>self_attn|mlp)\.(?P<proj>" + "|".join(ORDER) + r")\."
    r"(?P<part>lora_A|lora_route|lora_B(?:0|[1-9][0-9]*)?)"
    r"(?:\.(?P<adapter>[A-Za-z_][A-Za-z0-9_-]*))?\.weight$")

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
DTYPE_OF_ST = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}


class ConvertError(Exception):
    """A source this converter refuses; the message reaches the user verbatim."""


# ---------------------------------------------------------------- reading

def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """-> ({name: float32 array}, {name: source dtype f32|f16|bf16}). Checks every size against the
    file; F32/F16/BF16/F64 only. float32 holds F16 and BF16 exactly, so nothing is lost."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ConvertError(f"{path}: too short for a safetensors file")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > 100 << 20:
        raise ConvertError(f"{path}: header length {hlen} exceeds the file")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: header is not a JSON object")
    base = 8 + hlen
    tensors, dtypes = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if dt not in ST_DTYPES:
            raise ConvertError(f"{path}: tensor '{name}' has dtype {dt}; only F32, F16, BF16 and F64 are read")
        npdt = ST_DTYPES[dt]
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if min(shape, default=1) < 0 or not (0 <= b <= e <= len(data) - base) or e - b != n * npdt.itemsize:
            raise ConvertError(f"{path}: tensor '{name}': offsets [{b}, {e}) do not fit shape {shape} {dt} "
                               f"in a {len(data) - base}-byte data section")
        a = np.frombuffer(data, dtype=npdt, count=n, offset=base + b).reshape(shape)
        tensors[name] = bf16_bits_to_f32(a) if dt == "BF16" else a.astype(np.float32)
        dtypes[name] = DTYPE_OF_ST[dt]
    return tensors, dtypes


def read_torch_bin(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """adapter_model.bin (torch.save of a flat state dict) -> same as read_safetensors."""
    try:
        import torch  # imported here: only .bin sources need it
    except ImportError:
        raise ConvertError(f"{path} is a torch pickle and reading it needs PyTorch, which is not installed: "
                           "`pip install torch` (CPU wheel is enough), or give an adapter_model.safetensors "
                           "with the same keys") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        sd = torch.load(path, map_location="cpu")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a state dict (name -> tensor), found {type(sd).__name__}")
    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f32"}
    tensors, dtypes = {}, {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{path}: entry '{k}' is a {type(t).__name__}, not a tensor")
        if t.dtype not in names:
            raise ConvertError(f"{path}: tensor '{k}' has dtype {t.dtype}; only float32/16, bfloat16, float64")
        tensors[k] = t.detach().to(torch.float32).contiguous().numpy().copy()
        dtypes[k] = names[t.dtype]
    return tensors, dtypes


def find_source(src: str) -> Tuple[str, str]:
    """SRC (dir or file) -> (weights file, adapter_config.json path)."""
    if os.path.isdir(src):
        cands = [os.path.join(src, n) for n in ("adapter_model.bin", "adapter_model.safetensors")]
        have = [c for c in cands if os.path.isfile(c)]
        if not have:
            raise ConvertError(f"{src}: neither adapter_model.bin nor adapter_model.safetensors is there")
        if len(have) == 2:
            raise ConvertError(f"{src} holds both adapter_model.bin and adapter_model.safetensors; "
                               "name the file to convert")
        wpath = have[0]
    elif os.path.isfile(src):
        wpath = src
    else:
        raise ConvertError(f"{src}: no such file or directory")
    cpath = os.path.join(os.path.dirname(os.path.abspath(wpath)), "adapter_config.json")
    if not os.path.isfile(cpath):
        raise ConvertError(f"{cpath}: missing (the reference writes it next to the weights)")
    return wpath, cpath


# ---------------------------------------------------------------- mapping and checks

def map_keys(tensors: Dict[str, np.ndarray]) -> Dict[Tuple[int, str, str], Tuple[str, np.ndarray]]:
    """-> {(layer, proj, part): (source key, array)}; every key must be one this file knows."""
    out: Dict[Tuple[int, str, str], Tuple[str, np.ndarray]] = {}
    unknown: List[str] = []
    adapters = set()
    for k in sorted(tensors):
        m = KEY_RE.match(k)
        if not m:
            unknown.append(k)
            continue
        proj = m["proj"]
        if m["parent"] != PARENT[proj]:
            raise ConvertError(f"tensor '{k}': {proj} belongs under {PARENT[proj]}, not {m['parent']}")
        adapters.add(m["adapter"])
        slot = (int(m["layer"]), proj, m["part"])
        if slot in out:
            raise ConvertError(f"tensors '{out[slot][0]}' and '{k}' map to the same name")
        out[slot] = (k, tensors[k])
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ConvertError("unknown tensor key(s): " + ", ".join(f"'{u}'" for u in unknown[:5]) + more +
                           ". Known: [base_model.model.]model.layers.{i}.{self_attn|mlp}.{proj}."
                           "{lora_A|lora_B{k}|lora_B|lora_route}[.{adapter}].weight; biases, embeddings and "
                           "other modules_to_save are not supported by hydrad")
    if len(adapters) > 1:
        names = sorted("(none)" if a is None else a for a in adapters)
        raise ConvertError(f"the file holds tensors of several adapters ({', '.join(names)}); convert one at a time")
    if not out:
        raise ConvertError("the file holds no tensors")
    return out


def check_structure(slots) -> Tuple[int, int, List[str], int, bool]:
    """Every (layer, proj) must hold A, B heads 0..K-1 (or one plain B) and, for HydraLoRA, a router,
    all with one rank r and matching shapes; every targeted proj must cover layers 0..n-1.
    -> (r, K, targets in ORDER, n_layer, plain)."""
    groups: Dict[Tuple[int, str], Dict[str, Tuple[str, np.ndarray]]] = {}
    for (layer, proj, part), v in slots.items():
        groups.setdefault((layer, proj), {})[part] = v
    plain_any = any("lora_B" in g for g in groups.values())
    hydra_any = any(p.startswith("lora_B") and p != "lora_B" for g in groups.values() for p in g)
    if plain_any and hydra_any:
        raise ConvertError("the file mixes plain LoRA (lora_B) and HydraLoRA (lora_B{k}) tensors")
    r = K = None
    for (layer, proj), g in sorted(groups.items(), key=lambda x: (x[0][0], ORDER.index(x[0][1]))):
        where = f"layer {layer} {proj}"
        if "lora_A" not in g:
            raise ConvertError(f"{where}: lora_A is missing")
        akey, A = g["lora_A"]
        if A.ndim != 2:
            raise ConvertError(f"'{akey}' has shape {list(A.shape)}; expected [r, in]")
        heads = sorted(int(p[6:]) for p in g if p.startswith("lora_B") and p != "lora_B")
        k_here = 1 if plain_any else len(heads)
        if not plain_any and heads != list(range(len(heads))):
            raise ConvertError(f"{where}: B heads {heads} are not 0..{len(heads) - 1}")
        if k_here == 0:
            raise ConvertError(f"{where}: no lora_B tensors")
        if r is None:
            r, K = A.shape[0], k_here
        if A.shape[0] != r:
            raise ConvertError(f"'{akey}' has rank {A.shape[0]} but other modules have r = {r}")
        if k_here != K:
            raise ConvertError(f"{where} has {k_here} B heads but other modules have {K}")
        din = A.shape[1]
        bparts = ["lora_B"] if plain_any else [f"lora_B{k}" for k in range(K)]
        dout = None
        for p in bparts:
            bkey, B = g[p]
            dout = B.shape[0] if dout is None and B.ndim == 2 else dout
            if B.ndim != 2 or B.shape != (dout, r):
                raise ConvertError(f"'{bkey}' has shape {list(B.shape)}; expected [{dout}, {r}] ([out, r])")
        if plain_any:
            if "lora_route" in g:
                raise ConvertError(f"'{g['lora_route'][0]}': a router in a plain LoRA adapter")
        else:
            if "lora_route" not in g:
                raise ConvertError(f"{where}: lora_route (the router of a K = {K} HydraLoRA) is missing")
            rkey, R = g["lora_route"]
            if R.shape != (K, din):
                raise ConvertError(f"'{rkey}' has shape {list(R.shape)}; expected [{K}, {din}] ([K, in])")
    targets = [p for p in ORDER if any(pp == p for (_, pp) in groups)]
    layers = sorted({l for (l, _) in groups})
    n_layer = layers[-1] + 1
    for p in targets:
        have = sorted(l for (l, pp) in groups if pp == p)
        if have != list(range(n_layer)):
            missing = sorted(set(range(n_layer)) - set(have))
            raise ConvertError(f"{p} has no tensors for layer(s) {missing[:8]}; adapters on a subset of layers "
                               "(layers_to_transform) are not supported by hydrad")
    return r, K, targets, n_layer, plain_any


def convert_config(cfg: dict, r: int, K: int, targets: List[str], plain: bool) -> dict:
    """Reference adapter_config.json -> the fields hydrad reads, checked against the tensors."""
    if not isinstance(cfg, dict):
        raise ConvertError("adapter_config.json is not a JSON object")
    pt = cfg.get("peft_type")
    if pt not in (None, "LORA"):
        raise ConvertError(f"adapter_config.json: peft_type {pt!r} is not LORA")
    if cfg.get("bias", "none") not in (None, "none"):
        raise ConvertError(f"adapter_config.json: bias {cfg['bias']!r} is not supported (only \"none\")")
    if cfg.get("modules_to_save"):
        raise ConvertError(f"adapter_config.json: modules_to_save {cfg['modules_to_save']!r} is not supported")
    if cfg.get("enable_lora"):
        raise ConvertError("adapter_config.json: enable_lora (MergedLinear) is not supported")
    if cfg.get("use_dora"):
        raise ConvertError("adapter_config.json: DoRA (use_dora) is not supported")
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise ConvertError(f"adapter_config.json: a non-empty {k} is not supported")
    if cfg.get("layers_to_transform") is not None:
        raise ConvertError("adapter_config.json: layers_to_transform is not supported")
    if "r" in cfg and cfg["r"] != r:
        raise ConvertError(f"adapter_config.json says r = {cfg['r']} but lora_A has {r} rows")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ConvertError(f"adapter_config.json: lora_alpha is {alpha!r}; the scale alpha / r needs a number")
    nums = cfg.get("lora_nums")
    if nums is not None and not plain and nums != K:
        raise ConvertError(f"adapter_config.json says lora_nums = {nums} but the tensors have {K} B heads")
    if plain and nums not in (None, 1):
        raise ConvertError(f"adapter_config.json says lora_nums = {nums} but the tensors are plain LoRA (one B)")
    if K > MAX_K:
        raise ConvertError(f"{K} B heads is more than {MAX_K}")
    tm = cfg.get("target_modules")
    if isinstance(tm, list):
        # The reference wraps every module whose full name ends with a listed entry.
        full = {p: f"model.layers.0.{PARENT[p]}.{p}" for p in ORDER}
        for p in targets:
            if not any(isinstance(t, str) and full[p].endswith(t) for t in tm):
                raise ConvertError(f"tensors exist for {p} but target_modules {tm} does not select it")
        for t in tm:
            lost = [p for p in ORDER if isinstance(t, str) and full[p].endswith(t) and p not in targets]
            if lost:
                raise ConvertError(f"target_modules entry {t!r} selects {', '.join(lost)} but the file holds "
                                   "no tensors for it")
    out = {
        "peft_type": "LORA",
        "task_type": cfg.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.get("lora_dropout") or 0.0,
        "target_modules": targets,
        "bias": "none",
        # The LoRA parts are nn.Linear modules whatever the base layer's layout, so [out, in] always.
        "fan_in_fan_out": False,
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "inference_mode": True,
        "modules_to_save": None,
    }
    if not plain:
        out["lora_nums"] = K
    return out


# ---------------------------------------------------------------- writing

def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    r[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return r


def encode(name: str, a: np.ndarray, dtype: str) -> Tuple[str, bytes]:
    if dtype == "f32":
        return "F32", np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "f16":
        big = np.abs(a[np.isfinite(a)]) > 65504.0
        if big.any():
            raise ConvertError(f"tensor '{name}' has values beyond the F16 range; use --dtype f32 or bf16")
        return "F16", np.ascontiguousarray(a.astype(np.float16), dtype="<f2").tobytes()
    return "BF16", f32_to_bf16_bits(a).astype("<u2").tobytes()


def write_safetensors(path: str, tensors: Dict[str, Tuple[np.ndarray, str]]) -> None:
    """{name: (float32 array, f32|f16|bf16)} -> safetensors file (u64 LE header length, JSON header
    padded with spaces to a multiple of 8, then the raw little-endian data in header order)."""
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name in sorted(tensors):
        a, dt = tensors[name]
        st, b = encode(name, a, dt)
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def atomic_write(path: str, write) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".convert-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert(src: str, out_dir: str, dtype: str = "keep") -> dict:
    """Convert SRC into OUT_DIR; returns a summary dict. Raises ConvertError on anything refused."""
    wpath, cpath = find_source(src)
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, os.path.dirname(os.path.abspath(wpath))):
        raise ConvertError("OUT_DIR is the source directory; write the converted adapter elsewhere")
    if wpath.endswith(".safetensors"):
        tensors, src_dt = read_safetensors(wpath)
    else:
        tensors, src_dt = read_torch_bin(wpath)
    try:
        with open(cpath, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cpath}: {e}") from None
    slots = map_keys(tensors)
    r, K, targets, n_layer, plain = check_structure(slots)
    new_cfg = convert_config(cfg, r, K, targets, plain)
    out: Dict[str, Tuple[np.ndarray, str]] = {}
    for (layer, proj, part), (key, a) in slots.items():
        name = f"{OUT_PREFIX}{layer}.{PARENT[proj]}.{proj}.{part}.weight"
        out[name] = (a, src_dt[key] if dtype == "keep" else dtype)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"), lambda p: write_safetensors(p, out))

    def write_cfg(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(new_cfg, f, indent=2)
            f.write("\n")
    atomic_write(os.path.join(out_dir, "adapter_config.json"), write_cfg)
    return {"source": wpath, "tensors": len(out), "r": r, "K": K, "plain": plain, "targets": targets,
            "layers": n_layer, "alpha": new_cfg["lora_alpha"], "out": out_dir}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Convert a HydraLoRA reference adapter (adapter_model.bin or "
                                 ".safetensors + adapter_config.json) into hydrad's PEFT safetensors format.")
    ap.add_argument("src", metavar="SRC", help="reference output directory, or its adapter_model.bin/.safetensors")
    ap.add_argument("out", metavar="OUT_DIR", help="directory to write the hydrad adapter into")
    ap.add_argument("--dtype", choices=["keep", "f32", "f16", "bf16"], default="keep",
                    help="tensor precision of the output (default: keep each source tensor's)")
    a = ap.parse_args(argv)
    try:
        s = convert(a.src, a.out, a.dtype)
    except ConvertError as e:
        print(f"convert_hydralora: error: {e}", file=sys.stderr)
        return 1
    kind = "plain LoRA" if s["plain"] else f"HydraLoRA K = {s['K']}"
    print(f"convert_hydralora: {s['tensors']} tensors ({kind}, r = {s['r']}, lora_alpha = {s['alpha']}, "
          f"{','.join(s['targets'])} x {s['layers']} layers) -> {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
