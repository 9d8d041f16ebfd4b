"""gen_golden_forward.py - regenerate tests/golden/forward/: base-model last-position logits
and greedy continuations for SmolLM2, computed by the independent numpy reference
(scripts/ref_llama.py) with token ids from scripts/gguf_tokenizer.py. Never reads hydrad output.

Usage:
    .venv/bin/python scripts/gen_golden_forward.py [--model GGUF] [--out tests/golden/forward]
Writes smollm2.json (prompts, ids, argmax, logit_range, greedy32, margins, tolerance) and one
little-endian float32 file per prompt, smollm2_p{i}.bin, holding the full-vocab logits of the
last prompt position.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_tokenizer import encode_special, load_hf_tokenizer  # noqa: E402
from ref_llama import Model  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
N_GREEDY = 32


def chatml(user: str, system: str = SYSTEM) -> str:
    """The GGUF's chat template applied to one user turn, add_generation_prompt=True."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


LONG_USER = ("I am planning a three-day trip to Lisbon in early spring with two friends. "
             "We like old neighbourhoods, seafood, live music and long walks, but one of us "
             "cannot climb many stairs. Could you suggest a rough plan for each day, a few "
             "places to eat, and tell us whether we should buy a transport card? We arrive "
             "on a Friday morning by plane and leave on Sunday evening, and our budget is "
             "moderate, so please avoid very expensive restaurants.")

# (name, text, chat). Lengths range from 1 token to ~120 tokens. Chosen so that every
# greedy step's top1-top2 gap in the reference is well above the logits tolerance (see
# greedy32_margins): a near-tie would make the greedy golden fragile.
PROMPTS = [
    ("one_token", "Hello", False),
    ("my_name", "My name is", False),
    ("japan", "The capital of Japan is", False),
    ("code", "import numpy as np\n\ndef", False),
    ("digits_unicode", "In 2024, the café in Zürich sold 1234567 cups — 東京 too! 🙂", False),
    ("chat_capital", chatml("What is the capital of France?"), True),
    ("plain_long", "Photosynthesis is the process by which green plants, algae and some "
                   "bacteria convert light energy into chemical energy. During this process, "
                   "carbon dioxide and water are combined to form glucose and oxygen. The "
                   "reactions take place in the chloroplasts, which contain the pigment "
                   "chlorophyll. Scientists usually divide photosynthesis into two stages:",
     False),
    ("chat_long", chatml(LONG_USER), True),
]

TOLERANCE = {
    "last_logits": "max_abs(hydrad - golden) <= 1e-3 * logit_range, and argmax identical "
                   "unless greedy_strict_prefix == 0 (the top two logits are a near-tie)",
    "greedy32": "greedy32[:greedy_strict_prefix] identical. greedy32_margins[j] is the "
                "reference's top1 - top2 logit gap at step j; a step with a gap below "
                "2 * 1e-3 * logit_range is a near-tie (both logits may move by the tolerance), "
                "so greedy_strict_prefix = index of the first near-tie (32 when none). A "
                "divergence at or after it is rounding, not a bug; before it, it is a bug",
    "rel": 1e-3,
    "near_tie_factor": 2.0,
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import gguf
    import importlib.metadata as md
    import tokenizers
    return {"numpy": np.__version__, "gguf": md.version("gguf"),
            "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}


def prompt_record(model: Model, ids, adapter=None, n_greedy: int = N_GREEDY):
    """Logits of the last position (full pass, no cache) and a greedy continuation
    (KV cache) for ids; returns (record dict, last logits float32 array)."""
    lg = model.forward(ids, adapter)[-1].astype(np.float32)
    margins = []
    greedy = model.greedy(ids, n_greedy, adapter, margins=margins)
    am = int(np.argmax(lg))
    if greedy[0] != am:
        raise RuntimeError("cached and uncached reference passes disagree on the argmax")
    top5 = np.argsort(-lg)[:5]
    tie = TOLERANCE["near_tie_factor"] * TOLERANCE["rel"] * float(lg.max() - lg.min())
    strict = next((j for j, mg in enumerate(margins) if mg < tie), len(margins))
    rec = {
        "argmax": am,
        "logit_range": float(lg.max() - lg.min()),
        "logit_max": float(lg.max()),
        "logit_min": float(lg.min()),
        "top5": [int(t) for t in top5],
        "top5_logits": [float(lg[t]) for t in top5],
        "greedy32": greedy,
        "greedy32_margins": [round(x, 5) for x in margins],
        "greedy_strict_prefix": strict,
    }
    return rec, lg


def write_bin(path: str, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "golden", "forward"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    tok = load_hf_tokenizer(a.model)
    model = Model(a.model)
    print(f"model loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    prompts = []
    for i, (name, text, chat) in enumerate(PROMPTS):
        t1 = time.time()
        ids = encode_special(tok, text)
        rec, lg = prompt_record(model, ids)
        fn = f"smollm2_p{i}.bin"
        write_bin(os.path.join(a.out, fn), lg)
        cont = tok.decode(rec["greedy32"], skip_special_tokens=False)
        prompts.append({"name": name, "text": text, "chat": chat, "ids": ids,
                        "n_tokens": len(ids), "last_logits": fn, **rec,
                        "greedy32_text": cont})
        print(f"{name}: {len(ids)} tokens, range {rec['logit_range']:.3f}, argmax "
              f"{rec['argmax']}, min margin {min(rec['greedy32_margins']):.4f}, "
              f"strict prefix {rec['greedy_strict_prefix']}, "
              f"{time.time() - t1:.1f}s  -> {cont!r}", file=sys.stderr)
    c = model.cfg
    doc = {
        "description": "Base-model golden logits from scripts/ref_llama.py (numpy fp32, HF "
                       "layout, gguf.quants dequantisation); ids from scripts/gguf_tokenizer.py",
        "regenerate": "scripts/gen_golden_forward.py",
        "model": os.path.basename(a.model),
        "model_sha256": sha256_file(a.model),
        "versions": versions(),
        "config": {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
                   "n_head_kv": c.n_head_kv, "n_ff": c.n_ff, "vocab": model.vocab,
                   "rope_theta": c.rope_theta, "eps": c.eps},
        "logits_format": "little-endian float32, vocab values, last prompt position",
        "tolerance": TOLERANCE,
        "prompts": prompts,
    }
    with open(os.path.join(a.out, "smollm2.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
