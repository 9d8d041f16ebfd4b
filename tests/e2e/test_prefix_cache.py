"""test_prefix_cache.py - automatic prefix caching (issue 17) end to end: greedy outputs are the
same token for token with the cache on (default) and off (--no-prefix-cache) over the base model
and 8 seeded random adapters, chat and completions, text and token-id prompts (16k, 16k+1 and
under 16 tokens), sent concurrently; no K/V is reused across adapters, adapter reloads under one
name, cache_salt values or hydra router controls; eviction under a small KV cache keeps answers
right and the block gauges consistent; n > 1 and streamed usage report cached_tokens."""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import time

import pytest
import requests

from conftest import SERVED, mkadapter

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
BLOCK = 16
N_ADAPTERS = 8
MODELS = [SERVED] + [f"a{i}" for i in range(N_ADAPTERS)]

SYSTEMS = [
    "You are a careful assistant for a public library. Answer questions about opening hours, borrowing rules, "
    "late fees and the reading rooms. Be brief and polite, quote the rule you rely on, and never invent a rule "
    "that the library does not have. If a question is about something else, say that you only help with the library.",
    "You are a cooking helper. Recipes use metric units, oven temperatures in degrees Celsius and times in minutes. "
    "Suggest substitutes for common allergens such as nuts, eggs and milk when asked, and warn about raw meat, "
    "raw eggs and food left out of the fridge. Keep every answer to a few short steps.",
    "You are a tutor for secondary-school physics. Explain with one simple example and one formula at most, "
    "use SI units, check the student's arithmetic when they give numbers, and ask a short question back at the "
    "end so that the student keeps thinking about the topic instead of copying the answer.",
    "You are the support desk of a small web-hosting company. Customers ask about domains, e-mail, certificates "
    "and backups. Ask for the domain name when it is missing, never ask for passwords, and explain each command "
    "you suggest in one sentence. Escalate billing questions to a human colleague.",
    "You are a travel planner for rail journeys in Europe. Prefer direct trains, mention the typical journey time, "
    "whether seat reservations are needed and when night trains exist. Prices change often, so give ranges rather "
    "than exact figures, and remind travellers to check the operator's own timetable.",
    "You are a gardening adviser for temperate climates. Give the month for sowing, planting out and harvest, the "
    "spacing between plants and how much sun and water they need. Suggest organic remedies for pests first and "
    "mention when a plant is poisonous to cats, dogs or children.",
]
QUESTIONS = [
    "What should I do first?", "Can you give me a short example?", "Why does that happen?",
    "Is there a cheaper way?", "How long does it usually take?", "What is the most common mistake?",
    "Could you explain it to a beginner?", "What would you recommend for tomorrow?",
    "Which option is the safest?", "How do I know it worked?", "What if I only have ten minutes?",
    "Is it different in winter?", "What do experts disagree about?", "Can children do this too?",
    "What tools do I need?", "Where can I read more?",
]


def post(srv, path, body, status=200):
    r = requests.post(srv.url + path, json=body, timeout=300)
    assert r.status_code == status, (path, body, r.status_code, r.text)
    return r.json()


def tokenize(srv, prompt):
    return post(srv, "/tokenize", {"model": SERVED, "prompt": prompt})["tokens"]


def result(j):
    """(texts of every choice, completion_tokens, cached_tokens, prompt_tokens) of an answer."""
    texts = [c["message"]["content"] if "message" in c else c["text"] for c in j["choices"]]
    u = j["usage"]
    return texts, u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens"]


def metrics(srv):
    """/metrics as {name without labels: value}."""
    out = {}
    for line in requests.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name)] = float(value)
    return out


def kv_consistent(srv, idle):
    m = metrics(srv)
    used, cached, total = m["hydrad_kv_blocks_used"], m["hydrad_kv_blocks_cached"], m["hydrad_kv_blocks_total"]
    assert used >= 0 and cached >= 0 and used + cached <= total, m
    if idle:
        assert used == 0, m
    return m


def max_reusable(prompt_tokens):
    """The most a prompt can reuse: whole blocks, the last prompt token always computed."""
    return BLOCK * ((prompt_tokens - 1) // BLOCK)


def request(kind, model, prompt, n_tok=12, **extra):
    """(path, body) of a greedy request; kind 'chat' takes (system, question), 'text' a string,
    'ids' a list of token ids."""
    b = {"model": model, "max_tokens": n_tok, "temperature": 0, "ignore_eos": True, **extra}
    if kind == "chat":
        b["messages"] = [{"role": "system", "content": prompt[0]}, {"role": "user", "content": prompt[1]}]
        return CHAT, b
    b["prompt"] = prompt
    return COMPL, b


@pytest.fixture(scope="module")
def env(start_server, tmp_path_factory):
    """Two servers with the same base model and adapters a0..a7 (plus x, at first a1's weights):
    `on` with the prefix cache, `off` without it (and with `alt`, the weights x is reloaded with)."""
    root = tmp_path_factory.mktemp("pc")
    shapes = [(2, 1, "q_proj,v_proj"), (4, 2, "q_proj,v_proj"), (4, 3, "q_proj,k_proj,v_proj,o_proj"),
              (2, 2, "v_proj,o_proj"), (4, 2, "q_proj,v_proj,gate_proj"), (2, 3, "q_proj,v_proj"),
              (4, 1, "o_proj,down_proj"), (2, 2, "k_proj,v_proj,up_proj")]
    dirs = [mkadapter(root / f"a{i}", 700 + i, r=r, K=K, targets=t, ratio=0.6 + 0.05 * i)
            for i, (r, K, t) in enumerate(shapes)]
    alt = mkadapter(root / "alt", 799, r=4, K=2, targets="q_proj,v_proj", ratio=1.0)
    common = [a for i, d in enumerate(dirs) for a in ("--adapter", f"a{i}={d}")]
    common += ["--adapter-root", str(root), "--admin-key", "adm", "--max-seqs", "16", "--max-batch-tokens", "512",
               "--max-loras", "12"]
    on = start_server(*common, "--adapter", f"x={dirs[1]}")
    off = start_server(*common, "--adapter", f"alt={alt}", "--no-prefix-cache")
    return on, off, dirs, alt


def identity_requests(srv):
    """64 greedy requests: 16 topics (model, system prompt, format) x 4 questions, in rounds so that
    the first 16 in flight are all different topics and later ones can reuse them; completions
    topics add token-id prompts cut to 16k and 16k+1 tokens, and some prompts are under one block."""
    reqs = []
    for t in range(16):
        model, system = MODELS[t % len(MODELS)], SYSTEMS[t % len(SYSTEMS)]
        qs = QUESTIONS[(t * 5) % len(QUESTIONS):] + QUESTIONS
        topic = []
        if t % 2 == 0:
            topic = [request("chat", model, (system, q)) for q in qs[:4]]
        else:
            text = system + "\n\nQuestion: " + qs[0] + "\nAnswer:"
            ids = tokenize(srv, text)
            m = len(ids) // BLOCK - 1
            topic = [request("text", model, text), request("ids", model, ids[:BLOCK * m]),
                     request("ids", model, ids[:BLOCK * m + 1]),
                     request("text", model, system + "\n\nQuestion: " + qs[1] + "\nAnswer:")]
        if t % 4 == 1:  # shorter than one block
            topic[3] = request("ids", model, ids[:5 + t % 11])
        if t % 4 == 2:  # no system message: the chat template's default one
            path, body = request("chat", model, (system, "Hi"))
            body["messages"] = body["messages"][1:]
            topic[3] = path, body
        reqs.append(topic)
    return [reqs[t][k] for k in range(4) for t in range(16)]


def run_all(srv, reqs, workers=16):
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda pb: result(post(srv, *pb)), reqs))


def test_identity_on_off(env):
    """The 64 requests, 16 at a time, on both servers: the same texts and token counts; cached_tokens
    0 everywhere without the cache, whole blocks short of the last prompt token with it, > 0 on a
    good share; the prefix-cache counters add up to the usage figures; warm, every prompt reuses
    all its whole blocks and still answers the same."""
    on, off, *_ = env
    reqs = identity_requests(on)
    assert len(reqs) == 64
    lens = [len(b["prompt"]) for _, b in reqs if isinstance(b.get("prompt"), list)]
    assert any(n % BLOCK == 0 for n in lens) and any(n % BLOCK == 1 for n in lens) and any(n < BLOCK for n in lens)
    m0 = metrics(on)
    got_on = run_all(on, reqs)
    m1 = kv_consistent(on, idle=True)
    got_off = run_all(off, reqs)
    for (path, body), a, b in zip(reqs, got_on, got_off):
        assert a[0] == b[0] and a[1] == b[1] == 12 and a[3] == b[3], (path, body, a, b)
        assert b[2] == 0, (body, b)
        assert a[2] % BLOCK == 0 and 0 <= a[2] <= max_reusable(a[3]), (body, a)
    hits = [a[2] for a in got_on]
    print(f"cached_tokens > 0 on {sum(h > 0 for h in hits)}/64 requests, {sum(hits)} tokens reused of "
          f"{sum(a[3] for a in got_on)}")
    assert sum(h > 0 for h in hits) >= 32, hits  # measured 40: rounds 2-4 but the 8 that cannot share
    # the counters add up to the usage figures (every request here has n = 1)
    assert m1["vllm:prefix_cache_hits_total"] - m0["vllm:prefix_cache_hits_total"] == sum(hits)
    assert m1["vllm:prefix_cache_queries_total"] - m0["vllm:prefix_cache_queries_total"] == sum(a[3] for a in got_on)
    assert m1["hydrad_kv_blocks_cached"] > 0
    moff = metrics(off)
    assert moff["vllm:prefix_cache_hits_total"] == 0 and moff["hydrad_kv_blocks_cached"] == 0, moff
    # one request of each topic again, warm: every prompt reuses all its whole blocks
    again = run_all(on, reqs[48:])
    for (path, body), a, b in zip(reqs[48:], again, got_on[48:]):
        assert a[:2] == b[:2], (body, a, b)
        assert a[2] == max_reusable(a[3]), (body, a)


def ask(srv, kind, model, prompt, n_tok=12, **extra):
    return result(post(srv, *request(kind, model, prompt, n_tok, **extra)))


def admin(srv, path, body):
    r = requests.post(srv.url + path, json=body, headers={"Authorization": "Bearer adm"}, timeout=60)
    assert r.status_code == 200, (path, body, r.text)


def long_prompt(tag):
    """A prompt of about 90 tokens that no other test sends (tag makes its first block unique)."""
    return f"[{tag}] " + SYSTEMS[2] + "\n\nQuestion: " + QUESTIONS[3] + "\nAnswer:"


def tagged_chat(tag, i, question):
    """(system, question) of a chat whose system message no other test sends."""
    return f"[{tag}] " + SYSTEMS[i], question


def test_no_reuse_across_adapters_and_reloads(env):
    """The same prompt on x (a1's weights), a2, the base model: each answers as it does alone on the
    uncached server and reuses nothing of the others; x again reuses all it can. x reloaded with
    other weights (alt) reuses nothing of its old K/V, answers as alt does, then hits; reloaded
    with its first weights again it still starts cold (the key is the load, not the name)."""
    on, off, dirs, alt = env
    p = long_prompt("adapters")
    want = {m: ask(off, "text", m, p, 8) for m in ("a1", "a2", SERVED, "alt")}
    assert len({w[0][0] for w in want.values()}) == 4, want  # four models, four different answers

    def check(model, as_model, cached):
        got = ask(on, "text", model, p, 8)
        assert got[:2] == want[as_model][:2], (model, as_model, got, want[as_model])
        if cached == "max":
            cached = max_reusable(got[3])
        assert got[2] == cached, (model, as_model, got)

    check("x", "a1", 0)
    check("a2", "a2", 0)
    check(SERVED, SERVED, 0)
    check("x", "a1", "max")
    check("a1", "a1", 0)  # the same weights under another name are another load
    check(SERVED, SERVED, "max")
    admin(on, "/v1/unload_lora_adapter", {"lora_name": "x"})
    admin(on, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": alt})
    check("x", "alt", 0)
    check("x", "alt", "max")
    admin(on, "/v1/unload_lora_adapter", {"lora_name": "x"})
    admin(on, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": dirs[1]})
    check("x", "a1", 0)
    check("x", "a1", "max")
    kv_consistent(on, idle=True)


def test_cache_salt(env):
    """Requests with different cache_salt values (or none) never share blocks; the same salt does.
    Both endpoints; the answers never change."""
    on, off, *_ = env
    p = long_prompt("salt")
    chat = tagged_chat("salt", 4, "Which night trains leave from Vienna?")
    for kind, prompt, model in (("text", p, "a3"), ("chat", chat, SERVED)):
        want = ask(off, kind, model, prompt, 6, cache_salt="s1")
        assert want[2] == 0
        seq = [("s1", 0), ("s1", "max"), ("s2", 0), (None, 0), ("s2", "max"), (None, "max"), ("s1", "max"),
               ("s3", 0)]
        for salt, cached in seq:
            extra = {"cache_salt": salt} if salt else {}
            got = ask(on, kind, model, prompt, 6, **extra)
            assert got[:2] == want[:2], (kind, salt, got, want)
            assert got[2] == (max_reusable(got[3]) if cached == "max" else 0), (kind, salt, got)
    for bad in ("", 7, ["a"], {"s": 1}):  # null is the same as absent (vLLM: Optional[str])
        path, body = request("text", SERVED, p, cache_salt=bad)
        assert requests.post(on.url + path, json=body, timeout=60).status_code == 400, bad


def test_router_control_not_shared(env):
    """A request with a hydra router control reuses no block computed without it (nor under another
    control), answers as the uncached server does, and hits once warm itself; the router view
    (return_router) changes no K/V, so it reuses plain blocks and reports the same view."""
    on, off, *_ = env
    p = long_prompt("hydra")
    model = "a2"  # K = 3
    controls = [{"force_head": 0}, {"mask_heads": [2]}, {"temperature": 3.0}, {"top_k": 1}]
    plain = ask(off, "text", model, p, 8)
    got = ask(on, "text", model, p, 8)
    assert got[:3] == plain[:2] + (0,)
    for ctl in controls:
        want = ask(off, "text", model, p, 8, hydra=ctl)
        got = ask(on, "text", model, p, 8, hydra=ctl)
        assert got[:2] == want[:2] and got[2] == 0, (ctl, got, want)
        got = ask(on, "text", model, p, 8, hydra=ctl)
        assert got[:2] == want[:2] and got[2] == max_reusable(got[3]), (ctl, got, want)
        if "force_head" in ctl:  # it changes the K/V, so reusing plain blocks would change the answer
            assert want[0] != plain[0], (ctl, want, plain)
    # the view: same text and router view as the uncached server, reusing the plain blocks
    body = {"model": model, "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "hydra": {"return_router": True}}
    a, b = post(on, COMPL, body), post(off, COMPL, body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    va, vb = a["choices"][0]["hydra"]["router"], b["choices"][0]["hydra"]["router"]
    assert va["token_heads"] == vb["token_heads"] and len(va["token_heads"]) == 6, (va, vb)
    assert va["mean_gate"] == pytest.approx(vb["mean_gate"], abs=1e-5), (va, vb)
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == max_reusable(a["usage"]["prompt_tokens"])


def test_n_samples_share_prefill(env):
    """n = 3 on a fresh prompt: the later samples wait for the first one's prefill and reuse its
    whole blocks; prompt_tokens counts the prompt 3 times."""
    on, off, *_ = env
    p = long_prompt("n3")
    want = ask(off, "text", "a4", p, n=3)
    got = ask(on, "text", "a4", p, n=3)
    n_prompt = got[3] // 3
    assert got[3] == 3 * n_prompt and got[:2] == want[:2] and len(set(got[0])) == 1
    assert got[2] >= 2 * max_reusable(n_prompt), got
    chat = tagged_chat("n3", 1, "How do I replace eggs in a sponge cake?")
    want = ask(off, "chat", SERVED, chat, n=3)
    got = ask(on, "chat", SERVED, chat, n=3)
    assert got[:2] == want[:2] and got[2] >= 2 * max_reusable(got[3] // 3), got
    kv_consistent(on, idle=True)


def stream_usage(srv, path, body):
    r = requests.post(srv.url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      stream=True, timeout=120)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1]["choices"] == [] and all(c.get("usage") is None for c in chunks[:-1])
    return chunks[-1]["usage"]


def test_streamed_usage(env):
    """stream_options.include_usage: the final chunk's prompt_tokens_details.cached_tokens equals
    the non-streamed figure for the same warm prompt, on both endpoints."""
    on, *_ = env
    chat = tagged_chat("stream", 0, "Can I renew a loan online?")
    for kind, prompt in (("text", long_prompt("stream")), ("chat", chat)):
        path, body = request(kind, "a5", prompt, 4)
        cold = post(on, path, body)["usage"]
        warm = post(on, path, body)["usage"]
        streamed = stream_usage(on, path, body)
        assert cold["prompt_tokens_details"]["cached_tokens"] == 0
        assert warm["prompt_tokens_details"]["cached_tokens"] == max_reusable(warm["prompt_tokens"]) > 0
        assert streamed == warm, (streamed, warm)


def test_eviction_small_cache(env, start_server):
    """A 160-block KV cache and 200 distinct prompts of 113 tokens (4 preambles of 6 blocks on two
    models, then 17 tokens of each prompt's own: 200 full blocks no other prompt shares, 248 in
    all), 8 at a time: nothing fails, the gauges stay consistent while it runs (used + cached <=
    total) and after it (used 0, cached > 0), the last prompts are still cached whole, the first
    ones' own blocks were evicted (least recently used) and they are recomputed to the same
    answers, which the uncached server gives too. Prompts share preambles only to keep the prefill
    work small."""
    _, off, dirs, _ = env
    srv = start_server("--kv-blocks", "160", "--max-seqs", "8", "--adapter", f"a0={dirs[0]}")
    assert metrics(srv)["hydrad_kv_blocks_total"] == 160
    rng = random.Random(17)
    words = [w.strip(".,") for s in SYSTEMS for w in s.split()]
    pre = [tokenize(srv, SYSTEMS[i] + " " + SYSTEMS[i + 1])[:6 * BLOCK] for i in range(4)]
    prompts = []
    for i in range(200):
        own = tokenize(srv, f"\n\nRecord {i}: " + " ".join(rng.choice(words) for _ in range(20)))
        assert len(own) >= BLOCK + 1
        prompts.append((MODELS[i % 2], pre[i // 2 % 4] + own[:BLOCK + 1]))
    assert len({tuple(p[1]) for p in prompts}) == 200
    samples, stop = [], []

    def watch():
        while not stop:
            m = metrics(srv)
            samples.append((m["hydrad_kv_blocks_used"], m["hydrad_kv_blocks_cached"], m["hydrad_kv_blocks_total"]))
            time.sleep(0.1)

    def send(mp):
        return ask(srv, "ids", mp[0], mp[1], 2)

    m0 = metrics(srv)
    with cf.ThreadPoolExecutor(9) as ex:
        w = ex.submit(watch)
        try:
            first = list(ex.map(send, prompts))
        finally:
            stop.append(1)
        w.result()
    m1 = kv_consistent(srv, idle=True)
    assert len(samples) > 5 and all(u + c <= t for u, c, t in samples), samples
    assert max(u for u, _, _ in samples) > 0 and max(c for _, c, _ in samples) > 80, samples
    assert m1["hydrad_kv_blocks_cached"] > 0
    assert m1["vllm:prefix_cache_hits_total"] > m0["vllm:prefix_cache_hits_total"]
    assert all(f[3] == 113 and f[1] == 2 for f in first)
    for i in (199, 198, 197):  # most recently used: still cached whole
        got = send(prompts[i])
        assert got[:2] == first[i][:2] and got[2] == max_reusable(113) == 112, (i, got)
    kv_consistent(srv, idle=True)
    for i in range(5):  # their own blocks were evicted long ago: the shared preamble is all they reuse
        got = send(prompts[i])
        assert got[:2] == first[i][:2] and got[2] <= 6 * BLOCK, (i, got, first[i])
    for i in (0, 1, 2, 3, 4, 197, 198, 199):
        assert ask(off, "ids", prompts[i][0], prompts[i][1], 2)[:2] == first[i][:2], i
    kv_consistent(srv, idle=True)
    with cf.ThreadPoolExecutor(8) as ex:  # once more under load: nothing failed, same answers
        again = list(ex.map(send, prompts[100:124]))
    assert [a[:2] for a in again] == [f[:2] for f in first[100:124]]
    m = kv_consistent(srv, idle=True)
    assert m["hydrad_kv_blocks_cached"] > 0
