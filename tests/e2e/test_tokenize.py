"""test_tokenize.py - POST /tokenize and /detokenize in vLLM's and llama.cpp's server's shapes:
token ids against the Hugging Face `tokenizers` goldens (tests/golden/tokenizer/smollm2.jsonl, the
hard strings), round trips, the chat template through `messages`, pieces that are not UTF-8, auth
and bad input."""
from __future__ import annotations

import json
import os

import pytest
import requests

from conftest import ROOT

GOLDEN = os.path.join(ROOT, "tests/golden/tokenizer/smollm2.jsonl")


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("--api-key", "k")


def post(srv, path, body, key="k"):
    return requests.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def goldens():
    with open(GOLDEN) as f:
        return [json.loads(line) for line in f]


def test_ids_match_tokenizers_goldens(srv):
    recs = goldens()
    assert len(recs) > 300
    bad = []
    for r in recs:
        # vLLM shape; SmolLM2 adds no BOS, so add_special_tokens changes nothing here
        a = post(srv, "/tokenize", {"model": "base", "prompt": r["text"]})
        assert a.status_code == 200, a.text
        j = a.json()
        if j["tokens"] != r["ids_special"] or j["count"] != len(r["ids_special"]):
            bad.append((r["text"], j["tokens"], r["ids_special"]))
        assert j["max_model_len"] > 0
        # llama.cpp's shape
        b = post(srv, "/tokenize", {"content": r["text"]}).json()
        assert b["tokens"] == j["tokens"]
        assert set(b) == {"tokens"}
        # back again: the golden's decoded text, in both reply fields
        d = post(srv, "/detokenize", {"model": "base", "tokens": r["ids"]}).json()
        if d["prompt"] != r["decoded"] or d["content"] != r["decoded"]:
            bad.append((r["ids"], d, r["decoded"]))
    assert not bad, bad[:5]


def test_pieces(srv):
    j = post(srv, "/tokenize", {"content": "héllo 😀", "with_pieces": True}).json()
    toks = j["tokens"]
    assert all(set(t) == {"id", "piece"} for t in toks)
    joined = b""
    for t in toks:
        p = t["piece"]
        joined += bytes(p) if isinstance(p, list) else p.encode()
        if isinstance(p, list):  # only where the piece is not valid UTF-8 on its own
            with pytest.raises(UnicodeDecodeError):
                bytes(p).decode("utf-8")
    assert joined.decode() == "héllo 😀"
    assert any(isinstance(t["piece"], list) for t in toks)  # the emoji is split across byte tokens


def test_messages_use_the_chat_template(srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    j = post(srv, "/tokenize", {"model": "base", "messages": msgs}).json()
    text = post(srv, "/detokenize", {"model": "base", "tokens": j["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    j2 = post(srv, "/tokenize", {"model": "base", "messages": msgs, "add_generation_prompt": False}).json()
    assert j2["tokens"] == j["tokens"][: j2["count"]] and j2["count"] < j["count"]
    # the same ids the server prefills for a chat request (usage.prompt_tokens)
    r = post(srv, "/v1/chat/completions", {"model": "base", "messages": msgs, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == j["count"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"model": "base"}, "prompt"),
    ("/tokenize", {"prompt": "a", "content": "b"}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"content": "a", "add_special": "yes"}, "add_special"),
    ("/detokenize", {"tokens": [1, 99999999]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_input(srv, path, body, param):
    r = post(srv, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert post(srv, "/tokenize", {"content": "still serving"}).status_code == 200


def test_auth_and_method(srv):
    assert post(srv, "/tokenize", {"content": "a"}, key="wrong").status_code == 401
    r = requests.get(srv.url + "/tokenize", headers={"Authorization": "Bearer k"}, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


def test_tokenizer_info(srv):
    """GET /tokenizer_info in vLLM's shape, checked against the GGUF's own metadata (read with the
    `gguf` package), and used the way lm-eval's RemoteTokenizer uses it: token strings turned into
    ids through /tokenize with no `model` field, the raw chat template rendered with Jinja."""
    from gguf import GGUFReader

    from conftest import MODEL
    r = requests.get(srv.url + "/tokenizer_info", headers={"Authorization": "Bearer k"}, timeout=10)
    assert r.status_code == 200, r.text
    info = r.json()
    meta = GGUFReader(MODEL).fields
    vocab = meta["tokenizer.ggml.tokens"].contents()
    for field, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                       ("unk_token", "unknown_token_id")]:
        assert info[field] == vocab[meta["tokenizer.ggml." + key].contents()], field
    assert info["chat_template"] == meta["tokenizer.chat_template"].contents()
    assert info["vocab_size"] == len(vocab)
    assert info["add_bos_token"] is meta["tokenizer.ggml.add_bos_token"].contents()
    assert info["tokenizer_class"] == "GPT2TokenizerFast"
    assert info["model_max_length"] == post(srv, "/tokenize", {"prompt": "a"}).json()["max_model_len"]
    # RemoteTokenizer: eos_token_id = encode(eos_token)[0] with exactly this body (no model)
    for field in ("bos_token", "eos_token"):
        j = post(srv, "/tokenize", {"prompt": info[field], "add_special_tokens": False}).json()
        assert j["tokens"] == [vocab.index(info[field])]
    assert post(srv, "/detokenize", {"tokens": [2129, 1]}).json()["prompt"] == "test<|im_start|>"
    assert requests.get(srv.url + "/tokenizer_info", timeout=10).status_code == 401
    assert requests.post(srv.url + "/tokenizer_info", headers={"Authorization": "Bearer k"}, timeout=10).status_code == 405
    jinja2 = pytest.importorskip("jinja2")
    msgs = [{"role": "user", "content": "Hi"}]
    text = jinja2.Environment().from_string(info["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    ids = post(srv, "/tokenize", {"messages": msgs}).json()["tokens"]
    assert post(srv, "/detokenize", {"tokens": ids}).json()["prompt"] == text
