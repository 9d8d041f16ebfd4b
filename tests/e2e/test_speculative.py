"""test_speculative.py - speculative decoding (prompt lookup, issue 20) changes nothing but speed.

Greedy: 64 concurrent requests over the base model and 8 adapters (4 HydraLoRA, 4 plain LoRA),
prompts that repeat themselves and prompts that do not, stop strings and max_tokens that end inside
drafted runs, streams, n = 2 and logprobs, give the same text, finish reasons and (to float
rounding) logprobs on a server with drafts (--speculative ngram) as on one without; the draft
counters add up, the KV cache is empty again when idle, and a request can turn drafts off.

Sampling: on a tiny `hydrad mkmodel` model (512-token vocabulary) whose prompt holds every token
once, a prompt-lookup draft exists after any token. The first three tokens sampled (temperature 1,
top_k 8) with drafts have the distribution they have without (chi-square, 1,200 unseeded samples
each); a seeded request gives the very same tokens either way (one sample per token); and the
test shows that its chi-square test catches a wrong rule: always accepting the draft would make the
second token the draft's, which it rejects at p < 1e-6.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import requests
from scipy.stats import chi2_contingency

from conftest import BIN, make_adapter, mkadapter

PROMPTS = [
    "Repeat this list exactly, twice: apple, banana, cherry, date, elderberry, fig, grape, honeydew.",
    "Rewrite as JSON: name: Ada; role: engineer; city: London; name: Bob; role: designer; city: Paris; name:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The weather today is",
    "Write a short poem about the sea.",
    "Correct the spelling: Teh quick brwon fox jumpd over teh lazy dog. Teh quick brwon fox",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec_adapters")
    out = {}
    for i in range(4):
        out[f"h{i}"] = mkadapter(d / f"h{i}", seed=700 + i, r=4, K=2 + i % 2, targets="q_proj,v_proj", ratio=0.5)
        out[f"p{i}"] = make_adapter(d / f"p{i}", seed=710 + i, r=4, K=0, targets="q_proj,v_proj,o_proj", ratio=0.5)
    return out


@pytest.fixture(scope="module")
def pair(start_server, adapters):
    args = sum((["--adapter", f"{n}={p}"] for n, p in adapters.items()), []) + [
        "--max-seqs", "16", "--max-loras", "9"]
    # --spec-max-batch 0: drafts in full batches too, so mixed batches carry them
    return (start_server(*args, "--speculative", "ngram", "--spec-max-draft", "4", "--spec-max-batch", "0"),
            start_server(*args, "--speculative", "none"))


def body(i):
    models = ["base", "h0", "h1", "h2", "h3", "p0", "p1", "p2", "p3"]
    b = {"model": models[i % 9], "prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
         "max_tokens": [5, 7, 13, 24, 40][i % 5]}
    if i % 6 == 1:
        b["stop"] = [",", "\n\n"]
    if i % 7 == 2:
        b["logprobs"] = 2
    if i % 11 == 3:
        b["n"] = 2
    if i % 5 == 4:
        b["stream"] = True
    return b


def run(srv, b):
    r = requests.post(srv.url + "/v1/completions", json=b, timeout=300, stream=b.get("stream", False))
    assert r.status_code == 200, r.text
    if not b.get("stream"):
        j = r.json()
        return [(c["text"], c["finish_reason"], (c.get("logprobs") or {}).get("token_logprobs")) for c in j["choices"]]
    texts, fins = {}, {}
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if c.get("finish_reason"):
                    fins[c["index"]] = c["finish_reason"]
    return [(texts[k], fins.get(k), None) for k in sorted(texts)]


def metric(srv, name):
    for line in requests.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_greedy_outputs_identical(pair):
    on, off = pair
    with cf.ThreadPoolExecutor(32) as ex:
        got_on = list(ex.map(lambda i: run(on, body(i)), range(64)))
        got_off = list(ex.map(lambda i: run(off, body(i)), range(64)))
    for i, (a, b) in enumerate(zip(got_on, got_off)):
        assert len(a) == len(b), i
        for (ta, fa, la), (tb, fb, lb) in zip(a, b):
            assert (ta, fa) == (tb, fb), (i, body(i), ta, tb)
            if la is not None:  # the target's logprobs: same tokens, values to float rounding
                assert np.allclose(la, lb, atol=2e-3), (i, la, lb)
    drafted = metric(on, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(on, "vllm:spec_decode_num_accepted_tokens_total")
    print(f"\n# 64 requests: {metric(on, 'vllm:spec_decode_num_drafts_total'):.0f} drafts, {drafted:.0f} tokens, "
          f"{accepted:.0f} accepted; engine steps {metric(on, 'hydrad_engine_steps_total'):.0f} with drafts, "
          f"{metric(off, 'hydrad_engine_steps_total'):.0f} without")
    assert drafted > 0 and 0 < accepted <= drafted
    assert metric(off, "vllm:spec_decode_num_draft_tokens_total") == 0
    assert metric(on, "hydrad_engine_steps_total") < metric(off, "hydrad_engine_steps_total")
    assert metric(on, "vllm:kv_cache_usage_perc") == 0  # every block back once idle
    ads = {a["name"]: a for a in requests.get(on.url + "/v1/adapters").json()["data"]}
    rates = [a["speculative"]["acceptance_rate"] for a in ads.values() if "speculative" in a]
    assert rates and all(0 <= x <= 1 for x in rates)


def test_request_can_turn_drafts_off(pair):
    on, _ = pair
    before = metric(on, "vllm:spec_decode_num_draft_tokens_total")
    b = {"model": "base", "prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    r1 = requests.post(on.url + "/v1/completions", json=dict(b, speculative=False), timeout=300)
    assert r1.status_code == 200
    assert metric(on, "vllm:spec_decode_num_draft_tokens_total") == before
    r2 = requests.post(on.url + "/v1/completions", json=b, timeout=300)
    assert metric(on, "vllm:spec_decode_num_draft_tokens_total") > before
    assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]
    r = requests.post(on.url + "/v1/completions", json=dict(b, speculative="no"), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative"


# ---- sampling: the distribution is the target's ----

N_SAMPLES = 1200
VOCAB = 512


def ngram_draft(toks, k, max_n=4):
    """Independent transcription of prompt lookup: what followed the latest earlier occurrence of
    the longest suffix (4 down to 1 tokens) that occurs earlier, up to k tokens."""
    for n in range(min(max_n, len(toks) - 1), 0, -1):
        suf = toks[-n:]
        for i in range(len(toks) - n - 1, -1, -1):
            if toks[i:i + n] == suf:
                return toks[i + n:i + n + k]
    return []


@pytest.fixture(scope="module")
def tiny_pair(start_server, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    subprocess.run([BIN, "mkmodel", "--shape", "tiny", "--type", "f16", "--seed", "3", "--vocab-from", "none",
                    "-o", p], check=True, capture_output=True)
    common = ["-m", p, "--max-seqs", "32"]
    return (start_server(*common, "--speculative", "ngram", "--spec-max-draft", "4"),
            start_server(*common, "--speculative", "none"))


def sample(srv, seed=None):
    prompt = list(range(1, VOCAB))  # every token once (0 left out): after any token, a draft exists
    b = {"model": "base", "prompt": prompt, "max_tokens": 3, "temperature": 1.0, "top_k": 8,
         "ignore_eos": True, "logprobs": 0}
    if seed is not None:
        b["seed"] = seed
    r = requests.post(srv.url + "/v1/completions", json=b, timeout=120)
    assert r.status_code == 200, r.text
    return tuple(r.json()["choices"][0]["logprobs"]["tokens"])


def chi2_p(a, b):
    keys = sorted(set(a) | set(b))
    ca, cb = Counter(a), Counter(b)
    return chi2_contingency(np.array([[ca[k] for k in keys], [cb[k] for k in keys]]))[1]


def test_sampling_distribution_unchanged(tiny_pair):
    on, off = tiny_pair
    # seeded: the very same tokens (each token is one draw from the request's generator either way)
    for seed in range(8):
        assert sample(on, seed) == sample(off, seed)
    with cf.ThreadPoolExecutor(16) as ex:
        s_on = list(ex.map(lambda _: sample(on), range(N_SAMPLES)))
        s_off = list(ex.map(lambda _: sample(off), range(N_SAMPLES)))
    assert metric(on, "vllm:spec_decode_num_accepted_tokens_total") > 0  # drafts were verified
    for pos in range(3):
        p = chi2_p([s[pos] for s in s_on], [s[pos] for s in s_off])
        print(f"\n# token {pos + 1}: chi-square p = {p:.3f} (with vs without drafts)")
        assert p > 1e-3, (pos, p)
    # unseeded requests draw independent streams: 32 sampled tokens from 16 at once never coincide (texts,
    # not ids: byte tokens that are not UTF-8 all print as U+FFFD, so 8 tokens could coincide by chance)
    # (before, requests in one second whose state reused freed memory shared a seed)
    b = {"model": "base", "prompt": [1, 2, 3], "max_tokens": 32, "temperature": 1.0, "top_k": 8, "ignore_eos": True}
    with cf.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda _: requests.post(off.url + "/v1/completions", json=b).json()["choices"][0]["text"],
                           range(16)))
    assert len(set(outs)) == 16, outs
    # the wrong rule the test must catch: always accepting makes token 2 the draft after token 1
    text = {i: requests.post(off.url + "/detokenize", json={"tokens": [i]}, timeout=30).json()["prompt"]
            for i in range(VOCAB)}
    ids = Counter(text.values())
    id_of = {t: i for i, t in text.items() if ids[t] == 1}
    prompt = list(range(1, VOCAB))
    firsts = [s for s in s_off if s[0] in id_of]
    wrong = [text[ngram_draft(prompt + [id_of[s[0]]], 1)[0]] for s in firsts]
    right = [s[1] for s in firsts]
    p = chi2_p(wrong, right)
    print(f"# always-accept rule vs the target, token 2 ({len(firsts)} samples): p = {p:.2e}")
    assert len(firsts) > N_SAMPLES // 2 and p < 1e-6
