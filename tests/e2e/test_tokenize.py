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
