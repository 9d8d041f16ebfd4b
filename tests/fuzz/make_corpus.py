#!/usr/bin/env python3
"""make_corpus.py - writes the fuzz targets' seed corpora into tests/fuzz/corpus/<target>/ from the
repository's own material: the default model's GGUF head, tiny GGUFs written with the `gguf`
package (a whole llama model with a SentencePiece vocabulary, a byte-level BPE vocabulary with
merges and a chat template), the trained fixture adapter's config, lines of the tokenizer golden
file, and hand-written request bodies, grammars and schemas. Seeded and deterministic; rewrites only
the files it names (regression inputs added by hand, regress-*, are left alone). Each file is a few
KB at most.

Usage (from the repository root, with the test venv): .venv/bin/python tests/fuzz/make_corpus.py
"""
import json
import os
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus")
MODEL = os.environ.get("HY_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= 8192, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- gguf ----

def byte_level_chars():
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_model_gguf(path):
    """A whole llama model (1 layer, embd 8, 2 heads, 1 kv head, ff 16) with a 24-token
    SentencePiece vocabulary, F32 norms and F16 matrices."""
    import gguf
    rng = np.random.default_rng(7)
    toks = ["<unk>", "<s>", "</s>", "<0x0A>", "<0x41>", "\u2581", "\u2581a", "a", "b", "c", "ab",
            "\u2581ab", "<|im_start|>", "<|im_end|>", "d", "e", "\u2581the", "t", "h", "he", "the",
            "x", "y", "z"]
    types = [2, 3, 3, 6, 6] + [1] * 7 + [3, 3] + [1] * 10
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([float(-i) for i in range(len(toks))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    nv, e, ff = len(toks), 8, 16
    f16 = lambda *s: rng.standard_normal(s).astype(np.float16)
    w.add_tensor("token_embd.weight", f16(nv, e))
    w.add_tensor("output_norm.weight", np.ones(e, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(e, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(e, np.float32))
    for name, shape in [("attn_q", (e, e)), ("attn_k", (4, e)), ("attn_v", (4, e)), ("attn_output", (e, e)),
                        ("ffn_gate", (ff, e)), ("ffn_up", (ff, e)), ("ffn_down", (e, ff))]:
        w.add_tensor("blk.0.%s.weight" % name, f16(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_bpe_gguf(path):
    """A byte-level BPE tokenizer only (no tensors): the 256 byte tokens, a few merges, specials,
    the smollm pre-tokenizer and a ChatML template."""
    import gguf
    m = byte_level_chars()
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [m[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld"]
    for mg in merges:
        toks.append(mg.replace(" ", ""))
    types = [3, 3, 3] + [1] * (len(toks) - 3)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                        "{{ message['content'] }}<|im_end|>\n{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_seeds(tmp):
    if os.path.exists(MODEL):
        with open(MODEL, "rb") as f:
            put("gguf", "smollm2-head-4k", f.read(4096))
    for name, fn in [("tiny-llama-spm.gguf", tiny_model_gguf), ("tiny-bpe-tokenizer.gguf", tiny_bpe_gguf)]:
        p = os.path.join(tmp, name)
        fn(p)
        with open(p, "rb") as f:
            put("gguf", name, f.read())


# ---- adapter ----

def safetensors_bytes(tensors):
    """tensors: [(key, dtype "F32"|"F16"|"BF16", np.ndarray float32)] -> file bytes."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for key, dt, a in tensors:
        if dt == "F32":
            b = a.astype("<f4").tobytes()
        elif dt == "F16":
            b = a.astype("<f2").tobytes()
        else:
            b = (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        header[key] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def adapter_seeds():
    # fuzz_adapter.c's synthetic base: 2 layers, in/out per projection q k v o gate up down
    IN = [8, 8, 8, 8, 8, 8, 12]
    OUT_ = [8, 4, 4, 8, 12, 12, 8]
    names = {0: "self_attn.q_proj", 1: "self_attn.k_proj", 2: "self_attn.v_proj", 3: "self_attn.o_proj",
             4: "mlp.gate_proj", 5: "mlp.up_proj", 6: "mlp.down_proj"}
    rng = np.random.default_rng(11)

    def adapter(projs, r, K, dt, route=True):
        ts = []
        for layer in range(2):
            for p in projs:
                base = "base_model.model.model.layers.%d.%s." % (layer, names[p])
                ts.append((base + "lora_A.weight", dt, rng.standard_normal((r, IN[p])).astype(np.float32)))
                if K == 1:
                    ts.append((base + "lora_B.weight", dt, rng.standard_normal((OUT_[p], r)).astype(np.float32)))
                else:
                    for k in range(K):
                        ts.append((base + "lora_B%d.weight" % k, dt,
                                   rng.standard_normal((OUT_[p], r)).astype(np.float32)))
                    if route:
                        ts.append((base + "lora_route.weight", dt,
                                   rng.standard_normal((K, IN[p])).astype(np.float32)))
        return safetensors_bytes(ts)

    def mode0(cfg, st):
        c = json.dumps(cfg).encode()
        return bytes([0]) + struct.pack("<H", len(c)) + c + st

    put("adapter", "m0-hydra-k2-qkdown-bf16",
        mode0({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_nums": 2,
               "target_modules": ["q_proj", "k_proj", "down_proj"]}, adapter([0, 1, 6], 2, 2, "BF16")))
    put("adapter", "m0-lora-vo-f16",
        mode0({"r": 1, "lora_alpha": 2.0, "target_modules": ["v_proj", "o_proj"], "use_rslora": True},
              adapter([2, 3], 1, 1, "F16")))
    put("adapter", "m0-hydra-k3-regex-f32",
        mode0({"r": 1, "lora_alpha": 1, "lora_nums": 3,
               "target_modules": "model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj"}, adapter([4, 5], 1, 3, "F32")))
    put("adapter", "m0-all-linear-noroute",
        mode0({"r": 1, "target_modules": "all-linear", "lora_nums": 2, "fan_in_fan_out": False},
              adapter([0], 1, 2, "F32", route=False)))
    # mode 1: (u16 offset, byte) patches of the template; 0xffff truncates
    put("adapter", "m1-patch-header", bytes([1]) + struct.pack("<HB", 0, 0x20) + struct.pack("<HB", 12, ord("x")))
    put("adapter", "m1-truncate", bytes([1]) + struct.pack("<HB", 0xFFFF, 200))
    # mode 2: the fixture adapters' own configs against the template safetensors
    for kind in ("hydra", "lora"):
        p = os.path.join(ROOT, "tests", "fixtures", "adapters", "trained", kind, "adapter_config.json")
        if os.path.exists(p):
            with open(p, "rb") as f:
                put("adapter", "m2-trained-%s-config" % kind, bytes([2]) + f.read())
    put("adapter", "m2-config-rslora", bytes([2]) + json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_nums": 2, "use_rslora": True,
         "target_modules": ["q_proj", "k_proj", "down_proj"], "base_model_name_or_path": "x"}).encode())


# ---- request ----

def request_seeds():
    bodies = {
        "completion-min": {"model": "base", "prompt": "Hello"},
        "completion-full": {"model": "a1", "prompt": ["one", "two"], "max_tokens": 8, "temperature": 0.7,
                            "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 42, "stop": ["\n", "END"],
                            "n": 2, "stream": True, "stream_options": {"include_usage": True},
                            "logprobs": 3, "echo": True, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                            "repetition_penalty": 1.1, "ignore_eos": False, "cache_salt": "t1",
                            "logit_bias": {"42": -100, "7": 5.5}, "user": "u"},
        "completion-ids": {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 0, "echo": True, "logprobs": 0},
        "completion-hydra": {"prompt": "x", "hydra": {"return_router": True, "temperature": 0.5, "top_k": 2,
                                                      "force_head": 1, "mask_heads": [0, 3]}},
        "chat-min": {"model": "base", "messages": [{"role": "user", "content": "Hi"}]},
        "chat-full": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]},
                                   {"role": "assistant", "content": None,
                                    "tool_calls": [{"id": "c1", "type": "function",
                                                    "function": {"name": "get", "arguments": "{\"q\":1}"}}]},
                                   {"role": "tool", "tool_call_id": "c1", "content": "42"},
                                   {"role": "developer", "content": "d"}],
                      "max_tokens": 16, "logprobs": True, "top_logprobs": 2, "n": 1, "stop": "x",
                      "response_format": {"type": "json_object"}},
        "chat-schema": {"messages": [{"role": "user", "content": "json"}],
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "r", "strict": True, "schema": {
                                "type": "object", "properties": {"a": {"type": "integer"},
                                                                 "b": {"type": "string", "enum": ["x", "y"]}},
                                "required": ["a", "b"], "additionalProperties": False}}}},
        "chat-grammar": {"messages": [{"role": "user", "content": "g"}],
                         "response_format": {"type": "grammar", "grammar": "root ::= \"yes\" | \"no\""}},
        "chat-tools": {"messages": [{"role": "user", "content": "weather?"}],
                       "tools": [{"type": "function", "function": {
                           "name": "get_weather", "description": "d",
                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}],
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                       "parallel_tool_calls": False},
        "chat-tools-auto": {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
                            "tools": [{"type": "function", "function": {"name": "f"}}]},
        "completion-lora-stack": {"prompt": "x", "model": "base",
                                  "lora": [{"name": "a1", "scale": 0.5}, {"id": "b2"}, {"name": "c", "scale": -2}]},
        "load-lora": {"lora_name": "a1", "lora_path": "/tmp/a1", "sha256": "0" * 64, "pinned": True},
        "unload-lora": {"lora_name": "a1"},
    }
    for name, b in bodies.items():
        put("request", name, json.dumps(b, separators=(",", ":")))
    put("request", "not-object", "[1,2,3]")
    put("request", "dup-keys", "{\"prompt\":\"a\",\"prompt\":\"b\"}")
    put("request", "escapes", "{\"prompt\":\"\\u00e9\\ud83d\\ude00\\n\\u0000\",\"max_tokens\":1e400}")


# ---- tokenizer ----

def tokenizer_seeds():
    p = os.path.join(ROOT, "tests", "golden", "tokenizer", "smollm2.jsonl")
    texts = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            if t and len(t.encode()) < 2000:
                texts.append(t)
    # every 8th golden text, options: parse_special (bit 0), add_bos (bit 1), detok buffer (bits 2-7)
    for i, t in enumerate(texts[::8]):
        put("tokenizer", "golden-%03d" % i, bytes([(i * 37) & 0xFF]) + t.encode())
    put("tokenizer", "specials", b"\x01<|im_start|>user\nHi<|im_end|>\n<|endoftext|><|im_start|>")
    put("tokenizer", "invalid-utf8", b"\x00a\xff\xfe\xc0\xaf\xe0\x80\xed\xa0\x80\xf4\x90\x80\x80\xf0\x9f\x98")
    put("tokenizer", "missing-bytes", b"\x08\x04\x06\x13\x14\x16\x1d\xf1\x80\x80\x80\xf2\xbf\xbf\xbf")
    put("tokenizer", "digits-spaces", b"\x02  12345678901234   x\t\t\r\n\n  ")


# ---- grammar ----

def grammar_seeds():
    gbnf = {
        "json": "root   ::= object\n"
                "value  ::= object | array | string | number | (\"true\" | \"false\" | \"null\")\n"
                "object ::= \"{\" ( string \":\" value (\",\" string \":\" value)* )? \"}\"\n"
                "array  ::= \"[\" ( value (\",\" value)* )? \"]\"\n"
                "string ::= \"\\\"\" ( [^\"\\\\\\x7F\\x00-\\x1F] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4}) )* \"\\\"\"\n"
                "number ::= \"-\"? (\"0\" | [1-9] [0-9]*) (\".\" [0-9]+)? ([eE] [-+]? [0-9]+)?\n",
        "arith": "root ::= expr\nexpr ::= term ((\"+\" | \"-\") term)*\nterm ::= num | \"(\" expr \")\"\n"
                 "num ::= [0-9]+\n",
        "repeat": "root ::= \"a\"* \"b\"+ \"c\"? d{2} e{1,} f{0,2} (\"x\" | \"yz\"){3}\n"
                  "d ::= \"d\"\ne ::= \"e\"\nf ::= \"f\"\n",
        "classes": "root ::= \"ab\" [c-e] [^x-z\\n] . \"\\x41\\u00e9\\t\" [\\U0001F600-\\U0001F64F]\n",
        "alts": "# a comment\nroot ::= item (\",\" item)*   # trailing\nitem ::=\n  \"one\"\n  | \"two\"\n",
        "yes-no": "root ::= (\"yes\" | \"no\") \" \" [a-z]{1,8}\n",
    }
    steps = bytes(range(3, 250, 31))
    for name, g in gbnf.items():
        put("grammar", "gbnf-" + name, b"\x00" + g.encode() + b"\x00" + steps)
    schemas = {
        "object": {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                    "tags": {"type": "array", "items": {"type": "string"},
                                                             "minItems": 1, "maxItems": 3}},
                   "required": ["name", "age"], "additionalProperties": False},
        "enum-const": {"anyOf": [{"enum": ["red", "green", 3, None, True]}, {"const": {"k": [1, 2]}}]},
        "defs-ref": {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "number"},
                                                                          "next": {"$ref": "#/$defs/node"}},
                                        "required": ["v"]}},
                     "$ref": "#/$defs/node"},
        "number-bounds": {"type": "number", "exclusiveMinimum": -1.5, "maximum": 10},
        "string-format": {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                                           "u": {"type": "string", "format": "uuid"},
                                                           "p": {"type": "string", "pattern": "^[a-c]+x?$"}}},
        "oneof-allof": {"oneOf": [{"type": "boolean"}, {"type": "null"},
                                  {"allOf": [{"type": "integer"}, {"minimum": 5}]}]},
        "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        "any": {},
        "pydantic": {"title": "M", "type": "object", "properties": {
            "x": {"title": "X", "anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
            "y": {"title": "Y", "type": "array", "items": {"$ref": "#/$defs/E"}}},
            "required": ["y"], "$defs": {"E": {"title": "E", "enum": ["a", "b"], "type": "string"}}},
    }
    for i, (name, s) in enumerate(schemas.items()):
        put("grammar", "schema-" + name, bytes([1 | (i & 1) << 1]) + json.dumps(s).encode() + b"\x00" + steps)


def main():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        gguf_seeds(tmp)
    adapter_seeds()
    request_seeds()
    tokenizer_seeds()
    grammar_seeds()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print("corpus: %d bytes in %s" % (total, OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
