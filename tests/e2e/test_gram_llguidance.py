"""test_gram_llguidance.py - hydrad's grammar masks (engine/gram.c, engine/gram_schema.c, driven
through bin/tests/tool_gram_masks) against llguidance, an independent implementation, over the
same vocabulary (SmolLM2's, rebuilt from the GGUF by scripts/gguf_tokenizer.py). No server.

For each JSON Schema (compact whitespace; two also with flexible whitespace) and one hand-written
GBNF grammar, random token paths are walked with llguidance: at each step a random token it
allows (biased towards structural and short tokens so that strings close and objects finish),
EOS now and then where the grammar may end, and for a quarter of the paths a final token it
refuses. Hand-picked texts near the bounds (SEEDS) are walked too, spelled by the tokenizer and
byte by byte. The tool replays every path with a fresh hydrad matcher and prints popcount and
FNV-1a of its mask at each step: they must agree with llguidance's at every step, and refused
tokens must be refused. On a mismatch the path is replayed with full masks (M lines) and the
first differing step is reported with the differing tokens' bytes.

llguidance settings: "whitespace_flexible" false (no whitespace outside strings), or true for
hydrad's --ws-flexible (runs of space, tab, CR, LF between any two JSON tokens); `no_forcing`
(without it llguidance narrows a forced stretch such as `{"a":"` to its canonical tokenisation,
a decoding policy rather than the grammar's language; hydrad allows every token path that spells
the language). EOS tokens: the end-of-generation control tokens hydrad's tok_is_eog marks for
this vocabulary (<|endoftext|>, <|im_end|>). Deliberate differences, each with its reason, go in
DELIBERATE; everything else fails."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import jsonschema
import llguidance as llg
import llguidance.gbnf_to_lark
import numpy as np
import pytest

from conftest import MODEL, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gguf_tokenizer import TOKEN_TYPE_CONTROL, build_tokenizer, read_tokenizer_metadata  # noqa: E402

TOOL = os.environ.get("HY_GRAM_TOOL", os.path.join(ROOT, "bin", "tests", "tool_gram_masks"))
SEED = 20240611
PATHS = 200           # random paths per grammar
MIN_CAP, MAX_CAP = 30, 60  # path length cap, drawn per path
REJECT_SHARE = 0.25   # paths that end with one token llguidance refuses
EOS_P = 0.3           # chance of ending where the grammar may end
# The names hydrad's tokenizer marks as end of generation when they are control tokens
# (engine/tokenizer.c mark_eog), plus tokenizer.ggml.eos_token_id.
EOG_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
             "</s>", "<EOT>")
REPORT_PATHS = 3      # mismatching paths replayed in full per grammar (M lines are large)

# ---- the grammars ----

def obj(props, required=None, **kw):
    """An object schema with additionalProperties false (OpenAI strict style) unless kw says."""
    s = {"type": "object", "properties": props,
         "required": list(props) if required is None else required, "additionalProperties": False}
    s.update(kw)
    return s


SCHEMAS = {
    "flat": obj({"name": {"type": "string"}, "age": {"type": "integer"}, "active": {"type": "boolean"}}),
    "nested": obj({
        "id": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "lines": {"type": "array", "items": obj({"sku": {"type": "string"}, "qty": {"type": "integer"}})},
        "meta": obj({"ok": {"type": "boolean"}, "note": {"type": "string"}}, required=["ok"]),
    }, required=["id", "tags", "lines"]),
    "enum_const": obj({
        "color": {"enum": ["red", "green", "blue", "re"]},
        "kind": {"const": "fixed"},
        "level": {"enum": [1, 2, 30, "x", None, True]},
        "unit": {"type": "string", "enum": ["m", "cm", "mm"]},
    }),
    # What pydantic emits for `nick: Optional[str] = None; score: Optional[int]` (titles included).
    "optional_null": {
        "title": "Player", "type": "object",
        "properties": {
            "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Nick"},
            "score": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Score"},
            "alive": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "title": "Alive"},
        },
        "required": ["nick", "score", "alive"], "additionalProperties": False,
    },
    "tree_ref": {
        "$defs": {"node": obj({"v": {"type": "integer"},
                               "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}})},
        "$ref": "#/$defs/node",
    },
    "array_bounds": obj({
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        "few": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        "rest": {"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "integer"},
                 "maxItems": 3},
    }),
    "string_len": obj({
        "code": {"type": "string", "minLength": 2, "maxLength": 5},
        "word": {"type": "string", "maxLength": 3},
        "long": {"type": "string", "minLength": 4},
    }),
    "int_range": obj({
        "small": {"type": "integer", "minimum": -5, "maximum": 120},
        "big": {"type": "integer", "minimum": 10},
        "neg": {"type": "integer", "maximum": -3},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    }),
    # Beyond the list above: `pattern` classes (searched unanchored unless ^/$, \d \w ASCII,
    # \s Unicode, as llguidance does) and "any character".
    "pattern_classes": obj({
        "id": {"type": "string", "pattern": "^(ab|a)c?[x-z]{1,3}$"},
        "not_a": {"type": "string", "pattern": "^[^a]{1,3}$"},
        "spaced": {"type": "string", "pattern": "^\\d\\s\\w$"},
        "other": {"type": "string", "pattern": "^[\\D\\W]$"},
    }),
    "pattern_any": obj({"dot": {"type": "string", "pattern": "^a.c$"},
                        "nonspace": {"type": "string", "pattern": "^\\S{2}$"}}),
    # Optional properties before and after the required one (the object rule has one
    # alternative per first property present).
    "optional_props": obj({"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"},
                           "d": {"type": "integer"}}, required=["c"]),
}
FLEXIBLE = ("nested", "optional_props")  # also checked with flexible whitespace

# A small command language: alternatives, bounded and unbounded repetition, a negated class,
# escapes, a non-ASCII literal and recursion (lists nest).
GBNF = r'''# set/del/say commands, up to four, separated by "; "
root   ::= cmd ( "; " cmd ){0,3}
cmd    ::= "set " name "=" value | "del " name ( "," name )? | "say " quoted ( " → " name )?
name   ::= [a-z] [a-z0-9_]{0,7}
value  ::= number | quoted | "true" | "false" | "null" | list
list   ::= "[" ( value ( "," value )* )? "]"
number ::= "-"? ( "0" | [1-9] [0-9]{0,5} ) ( "." [0-9]+ )?
quoted ::= "\"" ( [^"\\\x00-\x1f] | "\\" ["\\n] )* "\""
'''

# (name, kind, source): kind "schema" (compact), "schema-ws" (flexible whitespace) or "gbnf"
GRAMMARS = ([(name, "schema", s) for name, s in SCHEMAS.items()]
            + [(name + "-ws", "schema-ws", SCHEMAS[name]) for name in FLEXIBLE]
            + [("gbnf_commands", "gbnf", GBNF)])

# Hand-picked texts, walked as paths too (spelled by the tokenizer and byte by byte): bounds and
# corners a random walk rarely reaches. An invalid one ends at the first token llguidance refuses.
SEEDS = {
    "flat": ['{"name":"Zo\u00eb \\"q\\" \\\\ \\n \\u001f \\u007F","age":-0,"active":true}',
             '{"name":"","age":12345678901234567890,"active":false}', '{"name":"a","age":01',
             '{"name":"a","age":1.5', '{"age":1', '{"name":"\x7f"', '{"name":"\\u00e9"', '{"name":"\\/"',
             '{"name":"a","age":1,"active":true,"x":1', '{"name":"\ud7ff\ue000\U0010ffff"'],
    "nested": ['{"id":1,"tags":["a","b"],"lines":[{"sku":"x","qty":2},{"sku":"","qty":0}],'
               '"meta":{"ok":true,"note":"n"}}',
               '{"id":1,"tags":[],"lines":[],"meta":{"note":"n"', '{"id":1,"tags":[],"lines":[]}',
               '{"id":1,"lines":[]', '{"id":1,"tags":[],"lines":[{"qty":1'],
    "enum_const": ['{"color":"re","kind":"fixed","level":30,"unit":"mm"}', '{"color":"ree',
                   '{"color":"red","kind":"fixe"', '{"color":"blue","kind":"fixed","level":3,',
                   '{"color":"blue","kind":"fixed","level":"x","unit":"km"',
                   '{"color":"blue","kind":"fixed","level":true,"unit":"m"}',
                   '{"color":"blue","kind":"fixed","level":1.0',
                   '{"color":"blue","kind":"fixed","level":null,'],
    "optional_null": ['{"nick":null,"score":null,"alive":null}', '{"nick":"n","score":-12,"alive":true}',
                      '{"nick":nul}', '{"score":1', '{"nick":null,"score":1.0'],
    "tree_ref": ['{"v":1,"kids":[{"v":2,"kids":[]},{"v":3,"kids":[{"v":4,"kids":[]}]}]}',
                 '{"v":1,"kids":[{"v":2}', '{"v":1,"kids":[{"kids":[]', '{"v":1,"kids":[[]'],
    "array_bounds": ['{"pair":["x",1],"few":[true,false,true],"rest":[true,1,2]}', '{"pair":["x",1,2',
                     '{"pair":[],"few":[],', '{"pair":["x"],"few":[true,true,true,true', '{"pair":[1',
                     '{"pair":[],"few":[true],"rest":[true,1,2,3', '{"pair":[],"few":[true],"rest":[1'],
    "string_len": ['{"code":"ab","word":"","long":"abcd"}',
                   '{"code":"abcde","word":"xyz","long":"\u00e9\u00e9\u00e9\\n"}',
                   '{"code":"\\u0000\\n","word":"' + "\U0001F600" * 3
                   + '","long":"' + "\U0001F600" * 4 + '"}',
                   '{"code":"abcdef', '{"code":"a"', '{"code":"ab","word":"abcd',
                   '{"code":"ab","word":"","long":"abc"'],
    "int_range": ['{"small":120,"big":10,"neg":-3,"year":1900}',
                  '{"small":-5,"big":99999999999,"neg":-1000,"year":2100}',
                  '{"small":99,"big":100,"neg":-30,"year":2000}',
                  '{"small":119,"big":10,"neg":-4,"year":2099}',
                  '{"small":121', '{"small":-6', '{"small":-0,"big":9', '{"small":0,"big":10,"neg":-2',
                  '{"small":5,"big":10,"neg":-3,"year":2101', '{"small":5,"big":10,"neg":-3,"year":1899',
                  '{"small":5,"big":10,"neg":-3,"year":190}', '{"small":5,"big":10,"neg":-0'],
    "pattern_classes": ['{"id":"abx","not_a":"b\u00e9\\n","spaced":"1 _","other":"\\t"}',
                        '{"id":"acyyy","not_a":"bbb","spaced":"9\u00a0x","other":"a"}', '{"id":"abczzzz',
                        '{"id":"abz","not_a":"a', '{"id":"abz","not_a":"b","spaced":"x'],
    "pattern_any": ['{"dot":"a\u00e9c","nonspace":"xy"}', '{"dot":"a\\nc"', '{"dot":"abc","nonspace":"x '],
    "optional_props": ['{"a":1,"b":2,"c":3,"d":4}', '{"c":0}', '{"b":-1,"c":2}', '{"a":1,"d":2',
                       '{"c":1,"a":2'],
    "optional_props-ws": ['{"a":1,"c":2 }', '{ "b" :-1 ,\n\t"c":2\r\n}', '{"c":0 }', ' {"c":0}',
                          '{"c":0} ', '{"a":1 ,"b":2, "c":3 ,"d" :4\n}'],
    "nested-ws": ['{ "id" : 1 , "tags" : [ "a" , "b" ] , "lines" : [ { "sku" : "x" , "qty" : 2 } ] ,'
                  ' "meta" : { "ok" : true } }', '{\n\t"id":1,\r\n"tags":[\n],"lines":[]\n}', '{"id":1 2'],
    "gbnf_commands": ['set abcdefgh=[1,[2,"x"],[]]; del a,b; say "hi\\n" \u2192 zed; set q=-0.50',
                      'set abcdefghi=1', 'set a=01', 'del a; del b; del c; del d; del e', 'say "\x01"',
                      'set x=1234567', 'set x=-', 'say "\\t"', 'say "\\\\"; set y=null'],
}

# Differences that are a deliberate choice: name -> (reason, predicate(prefix_bytes, token_bytes)
# true for the tokens the choice explains). Empty: hydrad and llguidance must agree exactly.
DELIBERATE: dict = {}


# ---- llguidance side ----

class Vocab:
    """SmolLM2's vocabulary as both sides see it: llguidance's tokenizer, every token's bytes,
    the end-of-generation ids and a few token classes the random walk draws from."""

    def __init__(self, model):
        meta = read_tokenizer_metadata(model)
        self.n = len(meta["tokens"])
        self.words = (self.n + 31) // 32
        ctl = [i for i, t in enumerate(meta["token_type"]) if t == TOKEN_TYPE_CONTROL]
        eog = {i for i in ctl if meta["tokens"][i] in EOG_NAMES}
        if isinstance(meta["eos"], int):
            eog.add(meta["eos"])
        self.eog = sorted(eog)
        self.control = np.zeros(self.n, dtype=bool)
        self.control[ctl] = True
        self.hf = build_tokenizer(meta)
        self.tok = llg.LLTokenizer(self.hf.to_str(), n_vocab=self.n, eos_token=self.eog)
        assert self.tok.vocab_size >= self.n, (self.tok.vocab_size, self.n)
        self.bytes = [b"" if self.control[i] else self.tok.decode_bytes([i]) for i in range(self.n)]
        self.byte_tok = {b[0]: i for i, b in enumerate(self.bytes) if len(b) == 1}
        punct = set(b'"{}[],:;=-.\\')
        self.structural = np.array([any(c in punct for c in b) for b in self.bytes]) & ~self.control
        self.quote = np.array([b'"' in b for b in self.bytes]) & ~self.control
        self.short = np.array([0 < len(b) <= 2 for b in self.bytes]) & ~self.control
        self.space = np.array([len(b) > 0 and any(c in b" \t\r\n" for c in b) for b in self.bytes])
        self.lead_space = np.array([b[:1] in (b" ", b"\t", b"\r", b"\n") for b in self.bytes])

    def spellings(self, text):
        """Token paths spelling text: the tokenizer's own, and one token per byte (where the
        vocabulary has every byte of it: SmolLM2 lacks some bytes that never occur in UTF-8)."""
        paths = [self.hf.encode(text, add_special_tokens=False).ids]
        b = text.encode()
        if all(c in self.byte_tok for c in b):
            paths.append([self.byte_tok[c] for c in b])
        return paths

    def show(self, ids, limit=8):
        out = [f"{i}:<control>" if self.control[i] else f"{i}:{self.bytes[i]!r}" for i in ids[:limit]]
        return ", ".join(out) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def llg_grammar(kind, src):
    """llguidance grammar text: JSON in the kind's whitespace style, or the GBNF converted to its
    Lark dialect, with no_forcing (see the module docstring)."""
    if kind.startswith("schema"):
        schema = dict(src)
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"} \
            if kind == "schema" else {"whitespace_flexible": True}
        lark = "start: %json " + json.dumps(schema)
    else:
        lark = llg.gbnf_to_lark.any_to_lark(src)
        lark = "\n".join(l for l in lark.splitlines() if not l.startswith("%llguidance"))
    return llg.LLMatcher.grammar_from_lark('%llguidance {"no_forcing": true}\n' + lark + "\n")


def mask_words(m, vocab):
    """llguidance's mask in our layout: (n + 31) / 32 little-endian uint32 words, bits >= n clear."""
    w = np.frombuffer(m.compute_bitmask(), dtype="<u4")[:vocab.words].copy()
    if vocab.n % 32:
        w[-1] &= (1 << (vocab.n % 32)) - 1
    assert not m.is_error(), m.get_error()
    return w


def bits_of(words, vocab):
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab.n].astype(bool)


def fnv1a_many(masks):
    """FNV-1a 64 of each mask's bytes, all masks at once (one numpy step per byte position)."""
    data = np.stack([m.view(np.uint8) for m in masks])
    h = np.full(len(masks), 0xcbf29ce484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001b3)
    with np.errstate(over="ignore"):
        for col in range(data.shape[1]):
            h = (h ^ data[:, col].astype(np.uint64)) * prime
    return [f"{int(x):016x}" for x in h]


def deliberate_ok(prefix, tok_bytes):
    return any(pred(prefix, tok_bytes) for _, pred in DELIBERATE.values())


def deliberate_mask(prefix, vocab):
    if not DELIBERATE:
        return np.zeros(vocab.n, dtype=bool)
    return np.array([deliberate_ok(prefix, b) for b in vocab.bytes])


def pick(rng, ids):
    return int(ids[rng.randrange(len(ids))])


def in_json_string(text):
    """Whether JSON text (a prefix) ends inside a string."""
    inside = esc = False
    for c in text:
        if esc:
            esc = False
        elif inside and c == 0x5C:
            esc = True
        elif c == 0x22:
            inside = not inside
    return inside


def walk(rng, m0, vocab, reject, json_text):
    """One random path. Returns (tokens, masks, ends): masks[i] is llguidance's mask after i
    tokens; ends is "reject" (the last token is one llguidance refuses), "eos" or "cap".
    json_text: also check that llguidance never allows whitespace outside strings."""
    m = m0.deep_copy()
    cap = rng.randint(MIN_CAP, MAX_CAP)
    stop = rng.randint(0, cap) if reject else cap
    toks, masks, prefix = [], [], b""
    while True:
        w = mask_words(m, vocab)
        masks.append(w)
        allowed = bits_of(w, vocab)
        if json_text and not in_json_string(prefix):
            assert not (allowed & vocab.lead_space).any(), f"llguidance allows whitespace after {prefix!r}"
        # tokens whose verdict is a documented choice are never walked on nor used as refusals
        avoid = deliberate_mask(prefix, vocab)
        text_ok = allowed & ~avoid
        text_ok[vocab.eog] = False
        if reject and (len(toks) == stop or not text_ok.any()):
            toks.append(pick_refused(rng, vocab, ~allowed & ~avoid))
            return toks, masks, "reject"
        eos_ok = allowed[vocab.eog].any()
        if eos_ok and not reject and (rng.random() < EOS_P or not text_ok.any()):
            toks.append(rng.choice([e for e in vocab.eog if allowed[e]]))
            return toks, masks, "eos"
        if len(toks) >= cap or not text_ok.any():
            return toks, masks, "cap"
        r = rng.random()
        pool = np.flatnonzero(text_ok & vocab.quote) if r < 0.15 else \
            np.flatnonzero(text_ok & vocab.structural) if r < 0.45 else \
            np.flatnonzero(text_ok & vocab.short) if r < 0.6 else np.empty(0)
        if len(pool) == 0:
            pool = np.flatnonzero(text_ok)
        t = pick(rng, pool)
        assert m.consume_token(t), (t, m.get_error())
        toks.append(t)
        prefix += vocab.bytes[t]


def pick_refused(rng, vocab, refused):
    """A token llguidance refuses: mostly near misses (punctuation, whitespace), some control
    tokens, the rest anything."""
    r = rng.random()
    pool = np.flatnonzero(refused & vocab.structural) if r < 0.45 else \
        np.flatnonzero(refused & vocab.space) if r < 0.65 else \
        np.flatnonzero(refused & vocab.control) if r < 0.75 else np.empty(0)
    if len(pool) == 0:
        pool = np.flatnonzero(refused)
    return pick(rng, pool)


def follow(m0, vocab, toks):
    """A given path, as walk() returns it: up to the first token llguidance refuses ("reject"),
    then EOS where the grammar may end ("eos"), else "cap"."""
    m = m0.deep_copy()
    path, masks = [], []
    for t in toks:
        masks.append(mask_words(m, vocab))
        path.append(t)
        if not bits_of(masks[-1], vocab)[t]:
            return path, masks, "reject"
        assert m.consume_token(t), (t, m.get_error())
    masks.append(mask_words(m, vocab))
    if m.is_accepting():
        return path + [vocab.eog[0]], masks, "eos"
    return path, masks, "cap"


# ---- hydrad side ----

def tool_args(kind, src, tmp_path, name):
    if kind.startswith("schema"):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(src))
        return [TOOL, MODEL, "--schema", str(f)] + (["--ws-flexible"] if kind == "schema-ws" else [])
    f = tmp_path / f"{name}.gbnf"
    f.write_text(src)
    return [TOOL, MODEL, "--gbnf", str(f)]


def run_tool(args, lines):
    p = subprocess.run(args, input="".join(lines), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()}"
    blocks, cur = [], []
    for line in p.stdout.splitlines():
        if line == "END":
            blocks.append(cur)
            cur = []
        else:
            cur.append(line.split())
    assert not cur and len(blocks) == len(lines), f"tool printed {len(blocks)} paths for {len(lines)}"
    return blocks


def first_difference(block, toks, hashes, ends):
    """None when the tool's lines for a path are what llguidance expects, else (step, what)."""
    n_masks = len(toks) if ends == "reject" else len(toks) + 1
    if ends == "eos":
        n_masks -= 1  # after EOS the sequence is over; the mask there is nobody's business
    for i in range(n_masks):
        if i >= len(block):
            return i, "tool output ended early"
        line = block[i]
        if line[0] == "REJECT":
            return i - 1, f"hydrad refused token {toks[int(line[1])]} that llguidance allows"
        if line[0] == "ERROR":
            return i, "hydrad error: " + " ".join(line[2:])
        if line[0] != str(i):
            return i, f"unexpected tool line {' '.join(line)!r}"
        if (int(line[1]), line[2]) != hashes[i]:
            return i, f"mask differs: hydrad allows {line[1]} tokens, llguidance {hashes[i][0]}"
    rest = block[n_masks] if len(block) > n_masks else ["(nothing)"]
    if ends == "eos" and rest[0] in ("REJECT", "ERROR"):
        return n_masks - 1, f"hydrad refused end-of-generation token {toks[-1]} where llguidance may end"
    if ends == "reject":
        if rest != ["REJECT", str(len(toks) - 1)]:
            return len(toks) - 1, (f"hydrad accepted token {toks[-1]} that llguidance refuses "
                                   f"(tool printed {' '.join(rest)!r})")
    return None


def explain(args, vocab, toks, masks, step, what):
    """Replay the path up to the differing step with full masks and describe the difference."""
    prefix = b"".join(vocab.bytes[t] for t in toks[:step])
    msg = [f"  step {step} after {prefix!r}: {what}"]
    if "mask differs" in what:
        block = run_tool(args, ["M " + " ".join(map(str, toks[:step])) + "\n"])[0]
        ours = set(map(int, block[step][1:]))
        theirs = set(np.flatnonzero(bits_of(masks[step], vocab)).tolist())
        extra = sorted(ours - theirs)
        missing = sorted(theirs - ours)
        extra = [t for t in extra if not deliberate_ok(prefix, vocab.bytes[t])]
        missing = [t for t in missing if not deliberate_ok(prefix, vocab.bytes[t])]
        if extra:
            msg.append(f"    only hydrad allows: {vocab.show(extra)}")
        if missing:
            msg.append(f"    only llguidance allows: {vocab.show(missing)}")
        if not extra and not missing:
            return None  # all explained by DELIBERATE
    elif step < len(toks):
        msg.append(f"    token {toks[step]}: {vocab.show([toks[step]])}")
    return "\n".join(msg)


# ---- the test ----

@pytest.fixture(scope="module")
def vocab():
    assert os.path.exists(MODEL), f"{MODEL} missing (run scripts/bootstrap.sh)"
    return Vocab(MODEL)


@pytest.mark.parametrize("name,kind,src", GRAMMARS, ids=[g[0] for g in GRAMMARS])
def test_masks_match_llguidance(name, kind, src, vocab, tmp_path):
    if not os.path.exists(TOOL):
        pytest.skip(f"{TOOL} not built (`make test` or `make bin/tests/tool_gram_masks` builds it)")
    t0 = time.time()
    m0 = llg.LLMatcher(vocab.tok, llg_grammar(kind, src), log_level=0)
    assert not m0.is_error(), f"llguidance refused the {name} grammar: {m0.get_error()}"

    rng = random.Random(f"{SEED}/{name}")
    paths = [walk(rng, m0, vocab, rng.random() < REJECT_SHARE, kind == "schema") for _ in range(PATHS)]

    for text in SEEDS.get(name, []):
        paths += [follow(m0, vocab, toks) for toks in vocab.spellings(text)]
    if kind.startswith("schema"):  # the reference itself: every finished text validates
        for toks, _, ends in paths:
            if ends == "eos":
                jsonschema.validate(json.loads(b"".join(vocab.bytes[t] for t in toks)), src)
    uniq = {}
    for _, masks, _ in paths:
        for w in masks:
            uniq.setdefault(w.tobytes(), w)
    fnv = dict(zip(uniq, fnv1a_many(list(uniq.values()))))
    hashes = [[(int(bits_of(w, vocab).sum()), fnv[w.tobytes()]) for w in masks] for _, masks, _ in paths]
    t1 = time.time()

    args = tool_args(kind, src, tmp_path, name)
    blocks = run_tool(args, ["H " + " ".join(map(str, toks)) + "\n" for toks, _, _ in paths])
    t2 = time.time()

    bad = []
    for k, ((toks, masks, ends), block) in enumerate(zip(paths, blocks)):
        d = first_difference(block, toks, hashes[k], ends)
        if d is not None:
            bad.append((k, d))
    report = []
    for k, (step, what) in bad:
        if len(report) >= REPORT_PATHS and not DELIBERATE:
            break
        toks, masks, _ = paths[k]
        text = explain(args, vocab, toks, masks, step, what)
        if text is not None:
            kind_of = "random" if k < PATHS else "seed"
            report.append(f"{kind_of} path {k} ({len(toks)} tokens): tokens {toks[:step + 1]}\n{text}")
    n_steps = sum(len(m) for _, m, _ in paths)
    print(f"{name}: {len(paths)} paths, {n_steps} masks ({len(uniq)} distinct), "
          f"{sum(e == 'eos' for *_, e in paths)} finished, {sum(e == 'reject' for *_, e in paths)} refused; "
          f"llguidance {t1 - t0:.1f} s, hydrad {t2 - t1:.1f} s")
    assert not report, (f"{name}: {len(bad)} of {len(paths)} paths differ from llguidance; first ones:\n"
                        + "\n".join(report))
