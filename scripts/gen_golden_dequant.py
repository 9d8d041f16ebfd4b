#!/usr/bin/env python3
"""gen_golden_dequant.py - writes tests/golden/dequant/: seeded raw blocks of each GGML type
hydrad must read (<TYPE>.bin) with their fp32 dequantisation by the `gguf` Python package
(<TYPE>.f32, little-endian float32), real rows from the default model, and index.json.
Reference data only; never reads hydrad output.

Every expected output is also recomputed by a plain per-element loop written here from the
block layouts (same float32 operation order as ggml's reference dequantisers) and the script
fails unless the two agree bit for bit.

Usage: .venv/bin/python scripts/gen_golden_dequant.py [model.gguf] [out_dir]
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "golden", "dequant")
SEED = 20240611

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Random valid blocks.

def f16_bytes(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).reshape(-1).view(np.uint8)


def scale_values(rng, n, sigma, positive):
    """Small fp16 scales, finite; a few edge values (0, -0, subnormal, a large one) mixed in."""
    v = rng.normal(0.0, sigma, n)
    if positive:
        v = np.abs(v)
    v = v.astype(np.float16)
    edges = [0.0, 6.0e-8, 3.0e-5, 1.0] if positive else [0.0, -0.0, 6.0e-8, -3.0e-5, 2.0]
    for k, e in enumerate(edges[: max(0, n // 4)]):
        v[(k * 5 + 1) % n] = np.float16(e)
    assert np.all(np.isfinite(v))
    return v


def gen_blocks(rng, qtype, n_blocks) -> np.ndarray:
    """n_blocks valid blocks of qtype as a (n_blocks, type_size) uint8 array."""
    _, tsize = GGML_QUANT_SIZES[qtype]
    rb = lambda k: rng.integers(0, 256, (n_blocks, k), dtype=np.uint8)  # noqa: E731
    if qtype == T.Q8_0:
        d = scale_values(rng, n_blocks, 0.01, positive=False)
        out = np.concatenate([f16_bytes(d).reshape(n_blocks, 2), rb(32)], axis=1)
    elif qtype == T.Q4_0:
        d = scale_values(rng, n_blocks, 0.02, positive=False)
        out = np.concatenate([f16_bytes(d).reshape(n_blocks, 2), rb(16)], axis=1)
    elif qtype == T.Q4_1:
        d = scale_values(rng, n_blocks, 0.02, positive=True)
        m = (-np.abs(rng.normal(0.0, 0.1, n_blocks))).astype(np.float16)
        out = np.concatenate([f16_bytes(d).reshape(n_blocks, 2),
                              f16_bytes(m).reshape(n_blocks, 2), rb(16)], axis=1)
    elif qtype == T.Q4_K:
        d = scale_values(rng, n_blocks, 0.002, positive=True)
        dmin = scale_values(rng, n_blocks, 0.002, positive=True)
        out = np.concatenate([f16_bytes(d).reshape(n_blocks, 2),
                              f16_bytes(dmin).reshape(n_blocks, 2), rb(12), rb(128)], axis=1)
    elif qtype == T.Q6_K:
        d = scale_values(rng, n_blocks, 0.0005, positive=False)
        out = np.concatenate([rb(128), rb(64), rb(16), f16_bytes(d).reshape(n_blocks, 2)], axis=1)
    else:
        raise ValueError(qtype)
    assert out.shape == (n_blocks, tsize), (qtype, out.shape)
    return np.ascontiguousarray(out)


def all_finite_bits16(exp_mask: int) -> np.ndarray:
    """Every 16-bit pattern whose exponent field is not all ones (no NaN/Inf)."""
    b = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    return b[(b & exp_mask) != exp_mask]


# ---------------------------------------------------------------------------------------------
# Independent per-element dequantisers, written from the block layouts.

def h(b, off) -> F32:
    return F32(np.frombuffer(bytes(b[off:off + 2]), dtype="<f2")[0])


def ref_q8_0(b):
    d = h(b, 0)
    return [F32(F32(np.int8(np.uint8(b[2 + j]).view(np.int8))) * d) for j in range(32)]


def ref_q4_0(b):
    d = h(b, 0)
    y = [F32(0)] * 32
    for j in range(16):
        y[j] = F32(F32(int(b[2 + j] & 0x0F) - 8) * d)
        y[j + 16] = F32(F32(int(b[2 + j] >> 4) - 8) * d)
    return y


def ref_q4_1(b):
    d, m = h(b, 0), h(b, 2)
    y = [F32(0)] * 32
    for j in range(16):
        y[j] = F32(F32(F32(int(b[4 + j] & 0x0F)) * d) + m)
        y[j + 16] = F32(F32(F32(int(b[4 + j] >> 4)) * d) + m)
    return y


def k4_scale_min(j, s):
    if j < 4:
        return int(s[j] & 63), int(s[j + 4] & 63)
    return (int(s[j + 4] & 0x0F) | (int(s[j - 4] >> 6) << 4),
            int(s[j + 4] >> 4) | (int(s[j] >> 6) << 4))


def ref_q4_k(b):
    d, dmin = h(b, 0), h(b, 2)
    s = b[4:16]
    q = b[16:144]
    y = []
    for g in range(4):  # 64 values per group: low nibbles then high nibbles of 32 bytes
        sc1, m1 = k4_scale_min(2 * g, s)
        sc2, m2 = k4_scale_min(2 * g + 1, s)
        d1, mm1 = F32(d * F32(sc1)), F32(dmin * F32(m1))
        d2, mm2 = F32(d * F32(sc2)), F32(dmin * F32(m2))
        qq = q[32 * g:32 * g + 32]
        y += [F32(F32(d1 * F32(int(x & 0x0F))) - mm1) for x in qq]
        y += [F32(F32(d2 * F32(int(x >> 4))) - mm2) for x in qq]
    return y


def ref_q6_k(b):
    ql, qh = b[0:128], b[128:192]
    sc = b[192:208].view(np.int8)
    d = h(b, 208)
    y = [F32(0)] * 256
    for n in range(2):  # two halves of 128 values
        L, H, S = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
        for l in range(32):
            i = l // 16
            q1 = (int(L[l] & 0xF) | ((int(H[l]) >> 0 & 3) << 4)) - 32
            q2 = (int(L[l + 32] & 0xF) | ((int(H[l]) >> 2 & 3) << 4)) - 32
            q3 = (int(L[l] >> 4) | ((int(H[l]) >> 4 & 3) << 4)) - 32
            q4 = (int(L[l + 32] >> 4) | ((int(H[l]) >> 6 & 3) << 4)) - 32
            base = 128 * n
            y[base + l] = F32(F32(d * F32(int(S[i]))) * F32(q1))
            y[base + l + 32] = F32(F32(d * F32(int(S[i + 2]))) * F32(q2))
            y[base + l + 64] = F32(F32(d * F32(int(S[i + 4]))) * F32(q3))
            y[base + l + 96] = F32(F32(d * F32(int(S[i + 6]))) * F32(q4))
    return y


REF = {T.Q8_0: ref_q8_0, T.Q4_0: ref_q4_0, T.Q4_1: ref_q4_1, T.Q4_K: ref_q4_k, T.Q6_K: ref_q6_k}


def ref_dequant(raw: np.ndarray, qtype) -> np.ndarray:
    raw = raw.reshape(-1).view(np.uint8)
    if qtype == T.F32:
        return np.frombuffer(raw.tobytes(), dtype="<f4").astype(F32)
    if qtype == T.F16:
        return np.frombuffer(raw.tobytes(), dtype="<f2").astype(F32)
    if qtype == T.BF16:
        u = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return u.view(F32)
    _, tsize = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, tsize)
    return np.array([v for b in blocks for v in REF[qtype](b)], dtype=F32)


def check_same_bits(a: np.ndarray, b: np.ndarray, what: str):
    a = np.ascontiguousarray(a, dtype=F32).reshape(-1)
    b = np.ascontiguousarray(b, dtype=F32).reshape(-1)
    if a.shape != b.shape or not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
        bad = np.nonzero(a.view(np.uint32) != b.view(np.uint32))[0] if a.shape == b.shape else []
        raise SystemExit(f"{what}: gguf and the per-element reference differ "
                         f"(shape {a.shape} vs {b.shape}, first bad {bad[:5]})")


# ---------------------------------------------------------------------------------------------

def write_case(out_dir, name, qtype, raw: np.ndarray, n_elements, extra=None):
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    blk, tsize = GGML_QUANT_SIZES[qtype]
    assert n_elements % blk == 0 and raw.size == n_elements // blk * tsize
    if qtype == T.F32:
        exp = dequantize(raw.view(F32), qtype)
    elif qtype == T.F16:
        exp = dequantize(raw.view(np.float16), qtype)
    else:
        exp = dequantize(raw.reshape(-1, tsize), qtype)
    exp = np.ascontiguousarray(exp, dtype=F32).reshape(-1)
    assert exp.size == n_elements
    assert np.all(np.isfinite(exp)), name
    check_same_bits(exp, ref_dequant(raw, qtype), name)
    bin_name, f32_name = f"{name}.bin", f"{name}.f32"
    with open(os.path.join(out_dir, bin_name), "wb") as f:
        f.write(raw.tobytes())
    with open(os.path.join(out_dir, f32_name), "wb") as f:
        f.write(exp.astype("<f4").tobytes())
    entry = {"name": name, "type": qtype.name, "ggml_type": int(qtype), "n_elements": int(n_elements),
             "block_size": int(blk), "type_size": int(tsize), "bin": bin_name, "f32": f32_name,
             "bin_bytes": int(raw.size)}
    if extra:
        entry.update(extra)
    return entry


def main(argv) -> int:
    model = argv[1] if len(argv) > 1 else DEFAULT_MODEL
    out_dir = argv[2] if len(argv) > 2 else DEFAULT_OUT
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    cases = []

    # F32: normal values plus signed zeros, subnormals, extremes (all finite).
    x = rng.normal(0.0, 1.0, 512).astype(F32)
    x[:8] = np.array([0.0, -0.0, 1.4e-45, -1.4e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38,
                      1.0], dtype=F32)
    cases.append(write_case(out_dir, "F32", T.F32, x.view(np.uint8), x.size))
    # F16 and BF16: every finite bit pattern (exhaustive conversion check).
    f16 = all_finite_bits16(0x7C00)
    cases.append(write_case(out_dir, "F16", T.F16, f16.astype("<u2").view(np.uint8), f16.size,
                            {"note": "every finite fp16 bit pattern, ascending"}))
    bf16 = all_finite_bits16(0x7F80)
    cases.append(write_case(out_dir, "BF16", T.BF16, bf16.astype("<u2").view(np.uint8), bf16.size,
                            {"note": "every finite bf16 bit pattern, ascending"}))
    for qtype, nb in [(T.Q8_0, 16), (T.Q4_0, 16), (T.Q4_1, 16), (T.Q4_K, 8), (T.Q6_K, 8)]:
        blk, _ = GGML_QUANT_SIZES[qtype]
        raw = gen_blocks(rng, qtype, nb)
        cases.append(write_case(out_dir, qtype.name, qtype, raw, nb * blk))

    # Real rows from the default model.
    r = GGUFReader(model)
    by_name = {t.name: t for t in r.tensors}
    for tname, fname, want in [("blk.0.attn_q.weight", "real_blk0_attn_q_Q4_1", T.Q4_1),
                               ("token_embd.weight", "real_token_embd_Q8_0", T.Q8_0)]:
        t = by_name[tname]
        if t.tensor_type != want:
            raise SystemExit(f"{tname} is {t.tensor_type.name}, expected {want.name}")
        ne0 = int(t.shape[0])
        rows = np.ascontiguousarray(t.data[:2])
        # data_offset is the absolute file offset of the tensor's first byte.
        with open(model, "rb") as f:
            f.seek(int(t.data_offset))
            assert f.read(rows.size) == rows.tobytes()
        cases.append(write_case(out_dir, fname, want, rows, 2 * ne0, {
            "source": os.path.basename(model), "tensor": tname, "rows": [0, 1], "ne0": ne0,
            "file_offset": int(t.data_offset)}))

    index = {"generator": "scripts/gen_golden_dequant.py", "seed": SEED,
             "gguf_version": importlib.metadata.version("gguf"), "numpy_version": np.__version__,
             "tolerance": "bit-identical float32", "cases": cases}
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out_dir, c[k])) for c in cases for k in ("bin", "f32"))
    for c in cases:
        print(f"{c['name']:24s} type={c['type']:5s} id={c['ggml_type']:2d} n={c['n_elements']}")
    print(f"wrote {len(cases)} cases, {total} bytes, to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
