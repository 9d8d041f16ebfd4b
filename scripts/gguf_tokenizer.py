"""gguf_tokenizer.py - build a Hugging Face `tokenizers` BPE tokenizer from a GGUF's
tokenizer.ggml.* metadata, configured the way SmolLM2's own tokenizer.json is. It is an
independent reference for golden files; it must never read anything hydrad produced.

Usage:
    from gguf_tokenizer import load_hf_tokenizer
    tok = load_hf_tokenizer("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.encode("<|im_start|>hi").ids              # special parsing on: [1, ...]
    encode_plain(tok, "<|im_start|>hi")           # special text tokenised as ordinary text

Only the GPT-2 style byte-level BPE ("gpt2" model) with the SmolLM2 pre-tokenizer
(tokenizer.ggml.pre == "smollm") is reproduced exactly; other pre values are refused
unless allow_other_pre=True (then the same smollm pipeline is used, which is wrong for
e.g. llama-bpe's regex).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

import numpy as np
from gguf import GGUFReader, GGUFValueType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token_type values (tokenizer.ggml.token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6


def _field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise KeyError(f"GGUF has no key {key!r}")
    return f


def _str_array(reader: GGUFReader, key: str) -> List[str]:
    f = _field(reader, key)
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _int_array(reader: GGUFReader, key: str) -> List[int]:
    f = _field(reader, key)
    return [int(f.parts[i][0]) for i in f.data]


def _scalar(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    v = f.parts[f.data[0]]
    return v.tolist()[0] if isinstance(v, np.ndarray) else v


def read_tokenizer_metadata(gguf_path: str) -> Dict:
    """Return the tokenizer.ggml.* metadata as plain Python values."""
    r = GGUFReader(gguf_path)
    meta = {
        "model": _scalar(r, "tokenizer.ggml.model"),
        "pre": _scalar(r, "tokenizer.ggml.pre"),
        "tokens": _str_array(r, "tokenizer.ggml.tokens"),
        "merges": _str_array(r, "tokenizer.ggml.merges"),
        "bos": _scalar(r, "tokenizer.ggml.bos_token_id"),
        "eos": _scalar(r, "tokenizer.ggml.eos_token_id"),
        "unk": _scalar(r, "tokenizer.ggml.unknown_token_id"),
        "add_bos": bool(_scalar(r, "tokenizer.ggml.add_bos_token", False)),
    }
    if "tokenizer.ggml.token_type" in r.fields:
        meta["token_type"] = _int_array(r, "tokenizer.ggml.token_type")
    else:
        meta["token_type"] = [TOKEN_TYPE_NORMAL] * len(meta["tokens"])
    return meta


def _split_merge(m: str) -> Tuple[str, str]:
    # Byte-level symbols never contain a raw space (space maps to U+0120), so the single
    # separating space is unambiguous.
    a, sep, b = m.partition(" ")
    if not sep or not a or not b or " " in b:
        raise ValueError(f"malformed merge {m!r}")
    return a, b


def build_tokenizer(meta: Dict, register_special: bool = True,
                    allow_other_pre: bool = False) -> Tokenizer:
    """Build the tokenizer from read_tokenizer_metadata() output.

    register_special=False leaves control tokens unregistered as added tokens, so their
    text can only come out of ordinary BPE (used to cross-check encode_plain)."""
    if meta["model"] != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {meta['model']!r} is not byte-level BPE (gpt2)")
    if meta["pre"] != "smollm" and not allow_other_pre:
        raise ValueError(f"tokenizer.ggml.pre {meta['pre']!r}: only 'smollm' is reproduced")

    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate token strings in tokenizer.ggml.tokens")
    merges = [_split_merge(m) for m in meta["merges"]]

    unk = meta.get("unk")
    unk_tok = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk_tok,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # add_bos_token is false for SmolLM2 and its tokenizer.json's ByteLevel post-processor
    # adds nothing to ids, so no post-processor.
    tok.post_processor = None

    if register_special:
        specials = [AddedToken(tokens[i], single_word=False, lstrip=False, rstrip=False,
                               normalized=False, special=True)
                    for i, tt in enumerate(meta["token_type"])
                    if tt == TOKEN_TYPE_CONTROL]
        tok.add_special_tokens(specials)
        for a in specials:
            if tok.token_to_id(a.content) != vocab[a.content]:
                raise ValueError(f"special token {a.content!r} got a new id")
    return tok


def load_hf_tokenizer(gguf_path: str, register_special: bool = True,
                      allow_other_pre: bool = False) -> Tokenizer:
    """Tokenizer equivalent to SmolLM2's tokenizer.json, built from the GGUF at gguf_path.
    Control tokens (token_type 3) are special added tokens: with the default
    tok.encode_special_tokens == False, "<|im_start|>" encodes to its id (1 in SmolLM2)."""
    return build_tokenizer(read_tokenizer_metadata(gguf_path), register_special,
                           allow_other_pre)


def encode_plain(tok: Tokenizer, text: str) -> List[int]:
    """Encode with special-token parsing off: special-token text is ordinary text.
    Uses tokenizers' encode_special_tokens switch (a.k.a. split_special_tokens)."""
    old = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = old


def encode_special(tok: Tokenizer, text: str) -> List[int]:
    """Encode with special-token parsing on."""
    old = tok.encode_special_tokens
    tok.encode_special_tokens = False
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = old


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    t = load_hf_tokenizer(path)
    for s in sys.argv[2:] or ["<|im_start|>user\nHello, world! 12345<|im_end|>"]:
        print(repr(s), encode_special(t, s), encode_plain(t, s))
