"""ref_perplexity.py - independent numpy reference for `hydrad perplexity`: llama.cpp's
llama-perplexity method (tools/perplexity/perplexity.cpp, default mode) over ref_llama.py's fp32
forward pass and the Hugging Face `tokenizers` tokenizer that gguf_tokenizer.py builds from the
GGUF. It must never read anything hydrad produced.

Method:
  - the text file (one trailing newline dropped, as llama.cpp's -f does) is tokenised once with
    special-token text as plain text, BOS prepended when tokenizer.ggml.add_bos_token is true;
  - n = len(ids) // ctx non-overlapping windows of ctx tokens (at most `chunks` of them); at least
    2 * ctx tokens are needed;
  - each window runs alone from position 0; when the model adds BOS its first token becomes BOS;
  - the logits at positions ctx//2 .. ctx-2 score the tokens at ctx//2+1 .. ctx-1:
    nll = logsumexp(logits) - logits[next] (in float64 from the fp32 logits);
  - PPL = exp(mean nll); +/- = PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).

Usage:
    python scripts/ref_perplexity.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf \
        -f tests/fixtures/ppl.txt --ctx 64 [--chunks N] [--adapter DIR]
    from ref_perplexity import read_text, tokenize, perplexity
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_tokenizer import build_tokenizer, encode_plain, read_tokenizer_metadata  # noqa: E402
from ref_llama import Adapter, Model, load_adapter  # noqa: E402


def read_text(path: str) -> str:
    """The file as llama.cpp's -f reads it: all of it, minus one trailing newline."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    return raw.decode("utf-8")


@functools.lru_cache(maxsize=4)
def _tokenizer(gguf_path: str):
    """(metadata, tokenizer) of a GGUF; cached: reading the vocabulary is the slow part."""
    meta = read_tokenizer_metadata(gguf_path)
    return meta, build_tokenizer(meta)


def tokenize(gguf_path: str, text: str, add_bos: Optional[bool] = None) -> tuple:
    """(ids, bos): ids of the whole text (special-token text as plain text), BOS first when the
    GGUF's add_bos_token is true (add_bos, when given, stands in for that flag); bos is the id each
    window starts with, or None."""
    meta, tok = _tokenizer(gguf_path)
    ids = encode_plain(tok, text)
    if add_bos is None:
        add_bos = meta["add_bos"]
    bos = meta["bos"] if add_bos and meta["bos"] is not None else None
    if bos is not None:
        ids = [bos] + ids
    return ids, bos


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lg = logits.astype(np.float64)
    mx = lg.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1))
    return lse - lg[np.arange(len(targets)), targets]


def perplexity(model: Model, ids: List[int], ctx: int, bos: Optional[int] = None,
               adapter: Optional[Adapter] = None, chunks: Optional[int] = None) -> dict:
    """{'ppl', 'err', 'running': [ppl after each window], 'count': scored tokens}."""
    if len(ids) < 2 * ctx:
        raise ValueError(f"need at least {2 * ctx} tokens for a context of {ctx}, have {len(ids)}")
    n = len(ids) // ctx
    if chunks is not None and chunks > 0:
        n = min(n, chunks)
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    for w in range(n):
        win = list(ids[w * ctx:(w + 1) * ctx])
        if bos is not None:
            win[0] = bos
        logits = model.forward(win, adapter=adapter)
        v = _nll_rows(logits[first:ctx - 1], np.asarray(win[first + 1:ctx]))
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += len(v)
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 else 0.0
    return {"ppl": ppl, "err": err, "running": running, "count": count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--adapter", default=None)
    a = ap.parse_args()
    ids, bos = tokenize(a.model, read_text(a.file))
    model = Model(a.model)
    ad = load_adapter(a.adapter) if a.adapter else None
    r = perplexity(model, ids, a.ctx, bos=bos, adapter=ad, chunks=a.chunks)
    print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(r["running"])) + ",")
    print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['err']:.5f}")


if __name__ == "__main__":
    main()
