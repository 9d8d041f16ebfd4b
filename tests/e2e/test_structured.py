"""test_structured.py - structured outputs and tool calling of a real hydrad serve (black box over
HTTP), base model and the trained adapters mixed in one batch: JSON Schemas (flat, nested with
arrays, enums, anyOf, $ref recursion, a pydantic model through the openai client's `parse`;
oneOf with overlapping branches must stay exact or be refused) and json_object at temperature 1.0,
every finished output checked by an independent validator (jsonschema) and for compact
whitespace; n > 1, streaming, and more distinct schemas at once than the server keeps compiled;
tools (required / named / auto / none, parallel or not, streamed deltas reassembled equal to the
whole answer, tool history accepted); logit_bias (-100 moves the greedy token to the runner-up,
+100 forces one, a forbidden token stays forbidden under a schema); a constrained greedy request
unchanged inside a mixed batch of 32; the `grammar` field; and the 400s (unsupported schema
keyword with its JSON pointer, bad grammar with line and column, unsupported parameters,
logit_bias range and vocabulary) next to harmless parameters that are accepted.

The default model (SmolLM2-135M) writes poor JSON on its own: validity here comes from the
constraint. Strings and arrays carry maxLength / maxItems and prompts often show an example, so
most answers finish within max_tokens; answers cut by max_tokens ("length") cannot be validated
and are only counted, and a minimum share of finished answers is required so that the checks see
enough outputs. Sampled requests carry a seed, so a run on one machine is repeatable."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import sys
from typing import Literal, Optional

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from conftest import MODEL, ROOT, SERVED

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gguf_tokenizer import encode_plain, load_hf_tokenizer  # noqa: E402

FIX = os.path.join(ROOT, "tests/fixtures/adapters/trained")
MODELS = (SERVED, "hydra", "lora")
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
PER_SCHEMA = 50
WORKERS = 32
MAX_TOKENS = 100
MIN_FINISHED = 0.7  # share of answers that must finish ("stop" / "tool_calls") for a check to count


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("--adapter", f"lora={FIX}/lora", "--adapter", f"hydra={FIX}/hydra",
                        "--max-seqs", "32", "--max-batch-tokens", "512")


# ---------- helpers ----------

def post(srv, path, body, status=200):
    r = requests.post(srv.url + path, json=body, timeout=300)
    assert r.status_code == status, f"{path} {json.dumps(body)[:400]} -> {r.status_code} {r.text[:400]}"
    return r.json()


def post_all(srv, jobs, workers=WORKERS):
    """[(path, body)] posted concurrently; the responses in order."""
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: post(srv, *j), jobs))


def err_of(srv, path, body, status=400):
    r = requests.post(srv.url + path, json=body, timeout=60)
    assert r.status_code == status, f"{json.dumps(body)[:300]} -> {r.status_code} {r.text[:300]}"
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"}, e
    return e


def chat(model, prompt, max_tokens=MAX_TOKENS, temperature=1.0, **kw):
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, **kw}


def compl(model, prompt, max_tokens=MAX_TOKENS, temperature=1.0, **kw):
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **kw}


def text_of(resp):
    c = resp["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


def ws_outside_strings(s):
    """Positions of whitespace outside JSON strings (compact output has none)."""
    out, in_str, esc = [], False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in " \t\r\n":
            out.append(i)
    return out


def obj(props, required=None, **kw):
    s = {"type": "object", "properties": props, "required": list(props) if required is None else required,
         "additionalProperties": False}
    s.update(kw)
    return s


STR = lambda n: {"type": "string", "maxLength": n}  # noqa: E731

# name -> (schema, prompts): requests alternate between the prompts. The tiny model copies a
# given example often; the examples keep answers short (recursion in particular: without one the
# model nests "kids" until max_tokens), the plain prompts give variety.
SCHEMAS = {
    "flat": (obj({"name": STR(24), "age": {"type": "integer", "minimum": 0, "maximum": 130},
                  "active": {"type": "boolean"}}),
             ["Describe a person as JSON with a name, an age and whether they are active.",
              "Who are you? Answer in JSON."]),
    "nested": (obj({
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "tags": {"type": "array", "items": STR(8), "maxItems": 3},
        "lines": {"type": "array", "maxItems": 2,
                  "items": obj({"sku": STR(10), "qty": {"type": "integer", "minimum": 1, "maximum": 999}})},
        "meta": obj({"ok": {"type": "boolean"}, "note": STR(12)}, required=["ok"]),
    }, required=["id", "tags", "lines", "meta"]),
        ['Write an order as JSON, for example '
         '{"id":7,"tags":["new"],"lines":[{"sku":"A1","qty":2}],"meta":{"ok":true}}',
         'Write a shop order as JSON, e.g. {"id":31,"tags":[],"lines":[],"meta":{"ok":false,"note":"late"}}']),
    "enums": (obj({
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "level": {"enum": [1, 2, 3, None, "max"]},
        "kind": {"const": "shirt"},
    }), ["Pick a shirt: its color, size and level, as JSON.", "I want a large blue shirt, level max."]),
    "anyof": (obj({
        "value": {"anyOf": [{"type": "integer", "minimum": -100, "maximum": 100}, STR(12), {"type": "null"}]},
        "shape": {"anyOf": [obj({"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 50}}),
                            obj({"kind": {"const": "rect"}, "w": {"type": "integer", "minimum": 1, "maximum": 50},
                                 "h": {"type": "integer", "minimum": 1, "maximum": 50}})]},
    }), ["Give a value (a number, a word or null) and a shape (a circle or a rectangle) as JSON.",
         "Give the word hello as value and a rectangle (rect) 3 wide and 4 high as shape, in JSON."]),
    "tree": ({"$defs": {"node": obj({"v": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}})},
              "$ref": "#/$defs/node"},
             ['Write a tree of at most three numbers as JSON, for example '
              '{"v":1,"kids":[{"v":2,"kids":[]},{"v":3,"kids":[]}]}',
              'A tree with two nodes as JSON, like {"v":5,"kids":[{"v":8,"kids":[]}]}']),
}
SCHEMA_MAX_TOKENS = 100


class Item(BaseModel):
    name: str = Field(max_length=16)
    qty: int = Field(ge=1, le=99)


class Order(BaseModel):
    customer: str = Field(max_length=20)
    items: list[Item] = Field(min_length=1, max_length=3)
    priority: Literal["low", "normal", "high"]
    gift: bool
    note: Optional[str] = Field(max_length=24)


PYDANTIC_PROMPTS = ['Write a gift order as JSON, e.g. {"customer":"Bo","items":[{"name":"pen","qty":1}],'
                    '"priority":"low","gift":true,"note":null}', "Order two books for Ann, urgently, as JSON."]


def rf_schema(name):
    schema = SCHEMAS[name][0]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---------- 1. JSON Schemas, 50 requests each, base + adapters in one concurrent batch ----------

JSON_OBJECT_PROMPTS = ['Describe your favourite book as JSON, e.g. {"title":"Dune","year":1965}',
                       'The weather as a JSON object, like {"city":"Oslo","temp":-3,"rain":false}',
                       'Three fruits as JSON: {"fruits":["apple","pear","fig"]}', "Say hello."]
N_COMPL = 12  # requests per format on /v1/completions
N_JSON_OBJECT = 30


@pytest.fixture(scope="module")
def schema_batch(srv):
    """One concurrent batch (fewer idle slots than one batch per check): the six schemas' 50
    requests each (5 over HTTP, the pydantic one through the openai client's `parse`), 30
    json_object chat requests, and json_schema / json_object on /v1/completions (12 each).
    name -> [(model, finish_reason, content, parsed)]."""
    # its own client: the conftest one times out after 120 s, and on 2 busy cores a request of
    # this batch may take longer
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def raw(name, i):
        m = MODELS[i % 3]
        if name == "json_object":
            path, body = CHAT, chat(m, JSON_OBJECT_PROMPTS[i % 4], response_format={"type": "json_object"})
        elif name == "compl_schema":
            path, body = COMPL, compl(m, "A person as JSON (name, age, active):\n", response_format=rf_schema("flat"))
        elif name == "compl_object":
            path, body = COMPL, compl(m, 'A book as a JSON object, e.g. {"title":"Dune","year":1965}:\n',
                                      response_format={"type": "json_object"})
        else:
            path, body = CHAT, chat(m, SCHEMAS[name][1][i % 2], response_format=rf_schema(name))
        r = post(srv, path, {**body, "max_tokens": SCHEMA_MAX_TOKENS, "seed": i})
        return m, r["choices"][0]["finish_reason"], text_of(r), None

    def parsed(i):
        try:
            r = client.chat.completions.parse(
                model=MODELS[i % 3], messages=[{"role": "user", "content": PYDANTIC_PROMPTS[i % 2]}],
                response_format=Order, max_tokens=SCHEMA_MAX_TOKENS, temperature=1.0, seed=i)
        except openai.LengthFinishReasonError as e:
            c = e.completion.choices[0]
            return MODELS[i % 3], c.finish_reason, c.message.content, None
        c = r.choices[0]
        return MODELS[i % 3], c.finish_reason, c.message.content, c.message.parsed

    jobs = [(n, i) for i in range(PER_SCHEMA) for n in list(SCHEMAS) + ["pydantic"]]
    jobs += [("json_object", i) for i in range(N_JSON_OBJECT)]
    jobs += [(n, i) for i in range(N_COMPL) for n in ("compl_schema", "compl_object")]
    with cf.ThreadPoolExecutor(WORKERS) as ex:
        futs = [(n, ex.submit(parsed, i) if n == "pydantic" else ex.submit(raw, n, i)) for n, i in jobs]
        out = {}
        for n, f in futs:
            out.setdefault(n, []).append(f.result())
    return out


def check_finished(outs, schema, what, min_share=MIN_FINISHED):
    """outs: [(model, finish_reason, text)]. Every answer that finished ("stop") is compact JSON
    valid against schema (None: any JSON object); a minimum share must finish. All problems are
    collected and reported together."""
    bad, finished = [], 0
    for model, finish, text in outs:
        assert finish in ("stop", "length"), (what, model, finish, text)
        if finish != "stop":
            continue
        finished += 1
        try:
            v = json.loads(text)
        except (TypeError, ValueError) as e:
            bad.append((model, text, f"not JSON: {e}"))
            continue
        try:
            if schema is None:
                assert isinstance(v, dict), "not a JSON object"
            else:
                jsonschema.validate(v, schema)
        except (AssertionError, jsonschema.ValidationError) as e:
            bad.append((model, text, str(e).splitlines()[0]))
            continue
        if ws_outside_strings(text):
            bad.append((model, text, "whitespace outside strings"))
    assert not bad, f"{what}: {len(bad)} of {finished} finished outputs invalid, e.g. {bad[:3]}"
    print(f"{what}: {finished}/{len(outs)} finished, all valid")
    assert finished >= min_share * len(outs), \
        f"{what}: only {finished} of {len(outs)} finished (the rest hit max_tokens)"
    return finished


def check_json_outputs(resps, schema, what):
    return check_finished([(r["model"], r["choices"][0]["finish_reason"], text_of(r)) for r in resps], schema, what)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(schema_batch, name):
    schema = SCHEMAS[name][0]
    jsonschema.Draft202012Validator.check_schema(schema)
    outs = schema_batch[name]
    assert len(outs) == PER_SCHEMA and {m for m, *_ in outs} == set(MODELS)
    # recursion: the model sometimes nests until max_tokens, a lower share finishes
    check_finished([o[:3] for o in outs], schema, name, min_share=0.6 if name == "tree" else MIN_FINISHED)


def test_pydantic_parse(schema_batch):
    """The openai client's `parse` sends the pydantic model as a strict json_schema and parses the
    answer back; each finished answer is validated again with jsonschema against pydantic's own
    schema (the `parse` result is the client's view, not an independent check)."""
    outs = schema_batch["pydantic"]
    check_finished([o[:3] for o in outs], Order.model_json_schema(), "pydantic")
    for model, finish, text, p in outs:
        if finish == "stop":
            assert isinstance(p, Order) and p == Order.model_validate_json(text), (model, text, p)


def test_completions_endpoint(schema_batch):
    """response_format json_schema and json_object on /v1/completions too."""
    check_finished([o[:3] for o in schema_batch["compl_schema"]], SCHEMAS["flat"][0], "completions json_schema")
    # unbounded strings: more answers run to max_tokens
    check_finished([o[:3] for o in schema_batch["compl_object"]], None, "completions json_object", min_share=0.35)


def test_oneof_is_exact_or_refused(srv):
    """oneOf means exactly one branch. With overlapping branches (0..10 matches both) a plain
    union is wrong, so the server must keep outputs valid or refuse (400 naming oneOf and its JSON
    pointer) - never loosen it to anyOf. Branches that exclude each other (disjoint types, a tagged
    union as pydantic emits) are served, and outputs validate, oneOf checked by jsonschema."""
    overlap = obj({"v": {"oneOf": [{"type": "integer", "minimum": -20, "maximum": 10},
                                   {"type": "integer", "minimum": 0, "maximum": 20}]}})
    disjoint = obj({
        "v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 99}, STR(8), {"type": "null"}]},
        "pet": {"oneOf": [obj({"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}}),
                          obj({"kind": {"const": "dog"}, "good": {"type": "boolean"}})]},
    })
    jobs = []
    for name, schema in (("overlap", overlap), ("disjoint", disjoint)):
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        r = requests.post(srv.url + CHAT, json=chat(SERVED, "x", max_tokens=2, response_format=rf), timeout=60)
        if name == "overlap" and r.status_code == 400:
            e = r.json()["error"]
            assert "oneOf" in e["message"] and "/properties/v" in e["message"], e
            continue
        assert r.status_code == 200, r.text
        jobs += [(CHAT, chat(MODELS[i % 3], "Pick a value v and a pet as JSON.", max_tokens=40, seed=i,
                             response_format=rf)) for i in range(12)]
    resps = post_all(srv, jobs)
    for k in range(0, len(resps), 12):
        name = jobs[k][1]["response_format"]["json_schema"]["name"]
        check_json_outputs(resps[k:k + 12], overlap if name == "overlap" else disjoint, f"oneOf {name}")


def test_n_choices_and_streaming(srv):
    """n=3 gives three constrained choices; a streamed constrained answer (seeded, temperature 1)
    reassembles to the whole one."""
    schema = SCHEMAS["flat"][0]
    r = post(srv, CHAT, chat("hydra", "A person as JSON.", max_tokens=SCHEMA_MAX_TOKENS, n=3, seed=3,
                             response_format=rf_schema("flat")))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    check_finished([(r["model"], c["finish_reason"], c["message"]["content"]) for c in r["choices"]], schema, "n=3",
                   min_share=1.0)
    for model in MODELS:
        b = chat(model, "A person as JSON.", max_tokens=SCHEMA_MAX_TOKENS, seed=11, response_format=rf_schema("flat"))
        whole = post(srv, CHAT, b)["choices"][0]
        chunks = stream_chunks(srv, b)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert (text, finish) == (whole["message"]["content"], [whole["finish_reason"]]), (model, text, whole)


def test_many_distinct_schemas_at_once(srv):
    """40 different schemas in one batch (more than the server keeps compiled): each request
    constrained by its own schema."""
    def schema(k):
        return obj({f"f{k}": {"type": "integer", "minimum": k, "maximum": k + 3}, "ok": {"type": "boolean"}})
    jobs = [(CHAT, chat(MODELS[k % 3], "Fill the form as JSON.", max_tokens=30,
                        response_format={"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema(k)}}))
            for k in range(40)]
    bad = []
    for k, r in enumerate(post_all(srv, jobs)):
        c = r["choices"][0]
        if c["finish_reason"] != "stop":
            bad.append((k, c))
            continue
        try:
            jsonschema.validate(json.loads(c["message"]["content"]), schema(k))
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((k, c["message"]["content"], str(e).splitlines()[0]))
    assert not bad, bad[:5]


# ---------- 2. json_object ----------

def test_json_object(schema_batch):
    # strings are unbounded here: more answers run to max_tokens than under the schemas
    check_finished([o[:3] for o in schema_batch["json_object"]], None, "json_object", min_share=0.5)


def test_text_format_is_unconstrained(srv):
    """{"type": "text"} is the default: same greedy answer as no response_format."""
    b = chat(SERVED, "Tell me about cats.", max_tokens=24, temperature=0)
    assert text_of(post(srv, CHAT, {**b, "response_format": {"type": "text"}})) == text_of(post(srv, CHAT, b))


# ---------- 3. tools ----------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": obj({"city": STR(30), "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": obj({"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                           "b": {"type": "integer", "minimum": -1000, "maximum": 1000}})}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_PROMPTS = ["What is the weather in Paris?", "What is 17 plus 25?", "Is it cold in Oslo today?",
                "Add 3 and 4 please."]


def check_calls(msg, names=None):
    """A message that is a tool call: content null, each call well-formed, arguments valid."""
    assert msg["content"] is None, msg
    calls = msg["tool_calls"]
    assert isinstance(calls, list) and calls, msg
    ids = set()
    for c in calls:
        assert c["type"] == "function" and isinstance(c["id"], str) and c["id"], c
        ids.add(c["id"])
        name = c["function"]["name"]
        assert name in (names or PARAMS), c
        args = c["function"]["arguments"]
        assert isinstance(args, str), c
        jsonschema.validate(json.loads(args), PARAMS[name])
        assert not ws_outside_strings(args), args
    assert len(ids) == len(calls), calls
    return calls


TOOL_MAX_TOKENS = 120


def assistant_call(call_id, name, args):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": name, "arguments": json.dumps(args, separators=(",", ":"))}}]}


# Earlier turns answered with tool calls: the tiny model then calls on its own under `auto`.
FEW_SHOT_CALLS = [
    {"role": "user", "content": "What is the weather in Rome?"},
    assistant_call("c1", "get_weather", {"city": "Rome", "unit": "celsius"}),
    {"role": "user", "content": "What is 1 plus 2?"}, assistant_call("c2", "add", {"a": 1, "b": 2}),
    {"role": "user", "content": "Is it hot in Cairo?"},
    assistant_call("c3", "get_weather", {"city": "Cairo", "unit": "celsius"}),
]
FORCED = {  # name -> (tool_choice, names allowed, parallel_tool_calls)
    "required": ("required", None, True),
    "required_single": ("required", None, False),
    "named_add": ({"type": "function", "function": {"name": "add"}}, ["add"], True),
    "named_weather_single": ({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"], False),
}
N_TOOL = 9  # requests per tool_choice variant


@pytest.fixture(scope="module")
def tool_batch(srv):
    """Every tool_choice variant's requests in one concurrent batch: name -> responses. `auto`:
    without history the tiny model answers in text, so half its requests carry earlier turns
    answered with calls (FEW_SHOT_CALLS), and those mostly call. `none` comes after such a
    history too."""
    jobs, names = [], []
    for i in range(N_TOOL):
        m = MODELS[i % 3]
        for name, (choice, _, parallel) in FORCED.items():
            names.append(name)
            jobs.append((CHAT, chat(m, TOOL_PROMPTS[i % 4], tools=TOOLS, tool_choice=choice,
                                    parallel_tool_calls=parallel, max_tokens=TOOL_MAX_TOKENS, seed=i)))
        b = chat(m, TOOL_PROMPTS[i % 4], tools=TOOLS, tool_choice="auto", max_tokens=TOOL_MAX_TOKENS, seed=i)
        if i % 2:
            b["messages"] = FEW_SHOT_CALLS + b["messages"]
        names.append("auto")
        jobs.append((CHAT, b))
    for m in MODELS:
        names.append("none")
        jobs.append((CHAT, chat(m, "What is 5 plus 6?", tools=TOOLS, tool_choice="none", max_tokens=40,
                                messages=FEW_SHOT_CALLS + [{"role": "user", "content": "What is 5 plus 6?"}])))
    out = {}
    for n, r in zip(names, post_all(srv, jobs)):
        out.setdefault(n, []).append(r)
    return out


@pytest.mark.parametrize("name", list(FORCED))
def test_tool_choice_forced(tool_batch, name):
    """required / named: always a call (unless cut by max_tokens), arguments valid for the tool.
    With parallel calls the model often repeats its call until max_tokens: a lower share must finish."""
    _, names, parallel = FORCED[name]
    resps = tool_batch[name]
    called = 0
    for r in resps:
        c = r["choices"][0]
        assert c["finish_reason"] in ("tool_calls", "length"), c
        if c["finish_reason"] == "length":
            assert c["message"]["content"].startswith("<tool_call>["), c  # cut inside the call
            continue
        calls = check_calls(c["message"], names)
        if not parallel:
            assert len(calls) == 1, calls
        called += 1
    print(f"tool_choice {name}: {called}/{len(resps)} complete calls")
    assert called >= (0.5 if parallel else MIN_FINISHED) * len(resps)


def test_tool_choice_auto_and_none(tool_batch):
    """auto: text or a valid call, and both happen; none: never a call, even after calls in the
    history."""
    kinds = {"text": 0, "call": 0, "length": 0}
    for r in tool_batch["auto"]:
        c = r["choices"][0]
        m = c["message"]
        if c["finish_reason"] == "tool_calls":
            check_calls(m)
            kinds["call"] += 1
        else:
            assert c["finish_reason"] in ("stop", "length"), c
            assert not m.get("tool_calls"), m
            assert isinstance(m["content"], str), m
            kinds["length" if c["finish_reason"] == "length" else "text"] += 1
    print("tool_choice auto:", kinds)
    assert kinds["call"] >= 1 and kinds["text"] >= 1, kinds  # both branches seen
    for r in tool_batch["none"]:
        c = r["choices"][0]
        assert c["finish_reason"] in ("stop", "length") and not c["message"].get("tool_calls"), c
        assert isinstance(c["message"]["content"], str), c


def test_tool_call_via_openai_client(srv):
    r = srv.client().chat.completions.create(
        model="hydra", messages=[{"role": "user", "content": "What is 2 plus 2?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=MAX_TOKENS, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    assert c.message.tool_calls[0].function.name == "add"
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), PARAMS["add"])


def stream_chunks(srv, body):
    r = requests.post(srv.url + CHAT, json={**body, "stream": True}, stream=True, timeout=300)
    assert r.status_code == 200, r.text
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def reassemble(chunks):
    """Streamed tool-call deltas back into [(name, arguments)], checking the delta shapes: the
    first delta of a call has index, id, type and function.name; later ones argument fragments."""
    calls, content, finish = {}, "", None
    for ch in chunks:
        for c in ch["choices"]:
            d = c.get("delta", {})
            content += d.get("content") or ""
            for t in d.get("tool_calls") or []:
                i = t["index"]
                if i not in calls:
                    assert t.get("id") and t.get("type") == "function" and t["function"].get("name"), t
                    calls[i] = {"id": t["id"], "name": t["function"]["name"], "args": ""}
                else:
                    assert "id" not in t and "name" not in t.get("function", {}), t
                calls[i]["args"] += t["function"].get("arguments") or ""
            if c.get("finish_reason"):
                finish = c["finish_reason"]
    assert sorted(calls) == list(range(len(calls))), calls
    return [(calls[i]["name"], calls[i]["args"]) for i in sorted(calls)], content, finish


def test_streamed_tool_calls_equal_whole(srv):
    """The same request (temperature 0.8, fixed seed) streamed and whole: the deltas reassembled
    give the same calls. The three models' requests run together, whole ones then streamed ones."""
    bodies = [chat(m, TOOL_PROMPTS[k], temperature=0.8, seed=1234 + k, tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=m == "hydra", max_tokens=TOOL_MAX_TOKENS) for k, m in enumerate(MODELS)]
    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        wholes = list(ex.map(lambda b: post(srv, CHAT, b)["choices"][0], bodies))
        streams = list(ex.map(lambda b: reassemble(stream_chunks(srv, b)), bodies))
    compared = 0
    for b, whole, (calls, content, finish) in zip(bodies, wholes, streams):
        assert finish == whole["finish_reason"], (b["model"], finish, whole)
        if finish == "length":
            continue
        assert finish == "tool_calls" and content == "", (finish, content)
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in check_calls(whole["message"])]
        assert calls == want, (b["model"], calls, want)
        compared += 1
    assert compared >= 2, wholes


def test_tool_history_accepted(srv):
    history = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\":21}"},
    ]
    for choice in ("auto", "none"):
        r = post(srv, CHAT, {"model": "lora", "messages": history, "tools": TOOLS, "tool_choice": choice,
                             "max_tokens": 40, "temperature": 0})
        assert r["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    r = post(srv, CHAT, {"model": SERVED, "messages": history[1:] + [{"role": "user", "content": "And in Rome?"}],
                         "tools": TOOLS, "tool_choice": "required", "max_tokens": MAX_TOKENS, "temperature": 0})
    if r["choices"][0]["finish_reason"] != "length":
        check_calls(r["choices"][0]["message"])
    e = err_of(srv, CHAT, {"model": SERVED, "messages": history[:3] + [{"role": "tool", "content": "x"}]})
    assert e["param"] == "messages"


# ---------- 4. logit_bias ----------

@pytest.fixture(scope="module")
def hf_tok():
    return load_hf_tokenizer(MODEL)


def token_id(tok, text):
    ids = encode_plain(tok, text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_logit_bias(srv, hf_tok, path):
    prompt = "The capital of France is"
    mk = (lambda **kw: compl(SERVED, prompt, temperature=0, **kw)) if path == COMPL else \
        (lambda **kw: chat(SERVED, prompt, temperature=0, **kw))
    lp = {"logprobs": 5} if path == COMPL else {"logprobs": True, "top_logprobs": 5}
    r = post(srv, path, mk(max_tokens=1, **lp))["choices"][0]
    if path == COMPL:
        first = r["logprobs"]["tokens"][0]
        ranked = sorted(r["logprobs"]["top_logprobs"][0].items(), key=lambda kv: -kv[1])
        ranked = [t for t, _ in ranked]
    else:
        first = r["logprobs"]["content"][0]["token"]
        tops = sorted(r["logprobs"]["content"][0]["top_logprobs"], key=lambda t: -t["logprob"])
        ranked = [t["token"] for t in tops]
    assert ranked[0] == first
    tid = token_id(hf_tok, first)
    # -100 on the greedy token: the greedy choice becomes the runner-up
    r2 = post(srv, path, mk(max_tokens=1, logit_bias={str(tid): -100}, **lp))["choices"][0]
    first2 = r2["logprobs"]["tokens"][0] if path == COMPL else r2["logprobs"]["content"][0]["token"]
    assert first2 != first and first2 == ranked[1], (first, first2, ranked)
    # +100 on an unlikely token forces it, at every step
    forced = " banana"
    fid = token_id(hf_tok, forced)
    assert forced not in ranked
    r3 = post(srv, path, mk(max_tokens=3, logit_bias={str(fid): 100}))
    assert text_of(r3) == forced * 3, text_of(r3)
    # a small bias changes nothing greedy here
    r4 = post(srv, path, mk(max_tokens=1, logit_bias={str(fid): 0.5}))
    assert text_of(r4) == first


def test_logit_bias_with_schema(srv, hf_tok):
    """logit_bias under a grammar: +100 on a token the grammar forbids changes nothing (the mask
    wins), +100 on `true` / `false` decides a boolean field."""
    rf = {"type": "json_schema", "json_schema": {"name": "b", "schema": obj({"ok": {"type": "boolean"}})}}
    ban, tru, fal = (token_id(hf_tok, t) for t in (" banana", "true", "false"))
    for model in MODELS:
        b = chat(model, "Is the sky blue?", temperature=0, response_format=rf)
        plain = post(srv, CHAT, b)
        assert plain["choices"][0]["finish_reason"] == "stop" and json.loads(text_of(plain))["ok"] in (True, False)
        assert text_of(post(srv, CHAT, {**b, "logit_bias": {str(ban): 100}})) == text_of(plain)
        for tid, want in ((tru, '{"ok":true}'), (fal, '{"ok":false}')):
            r = post(srv, CHAT, {**b, "logit_bias": {str(tid): 100, str(ban): 100}})
            assert r["choices"][0]["finish_reason"] == "stop" and text_of(r) == want, (model, want, text_of(r))


# ---------- 5. batch invariance ----------

def test_constrained_request_batch_invariant(srv):
    """A greedy json_schema request per model gives the same content alone and (twice) inside a
    concurrent batch of 32 mixing schemas, json_object, tools, grammars and free text."""
    schema = SCHEMAS["nested"][0]
    targets = [chat(m, SCHEMAS["nested"][1][1], temperature=0, seed=7, response_format=rf_schema("nested"))
               for m in MODELS]
    alone = [text_of(post(srv, CHAT, b)) for b in targets]
    for t in alone:  # these finish within max_tokens (else the comparison proves less)
        jsonschema.validate(json.loads(t), schema)
    others = []
    for i in range(32 - 2 * len(targets)):
        m = MODELS[i % 3]
        kind = i % 5
        if kind == 0:
            others.append((CHAT, chat(m, "Say something.", max_tokens=60, response_format={"type": "json_object"})))
        elif kind == 1:
            others.append((CHAT, chat(m, "Tell me a story.", max_tokens=60)))
        elif kind == 2:
            others.append((CHAT, chat(m, TOOL_PROMPTS[i % 4], max_tokens=60, tools=TOOLS, tool_choice="required")))
        elif kind == 3:
            others.append((COMPL, compl(m, "Answer yes or no:", max_tokens=60, grammar='root ::= ("yes" | "no") "!"?')))
        else:
            others.append((CHAT, chat(m, "A person.", max_tokens=60, response_format=rf_schema("flat"), seed=i)))
    jobs = list(others)
    for k, b in enumerate(targets * 2):  # each target twice, spread through the batch
        jobs.insert(5 * k + 1, (CHAT, b))
    resps = post_all(srv, jobs, workers=32)
    mixed = {}
    for (path, b), r in zip(jobs, resps):
        if b in targets:
            mixed.setdefault(targets.index(b), []).append(text_of(r))
    assert len(mixed) == 3 and all(len(v) == 2 for v in mixed.values())
    for k, t in enumerate(alone):
        assert mixed[k] == [t, t], (MODELS[k], t, mixed[k])


# ---------- 6. errors ----------

UNSUPPORTED_KW = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                            "uniqueItems": True}},
                  "required": ["tags"], "additionalProperties": False}


@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_unsupported_schema_keyword(srv, path):
    mk = chat if path == CHAT else compl
    rf = {"type": "json_schema", "json_schema": {"name": "u", "schema": UNSUPPORTED_KW, "strict": True}}
    e = err_of(srv, path, mk(SERVED, "x", max_tokens=5, response_format=rf))
    assert e["type"] == "invalid_request_error", e
    assert "uniqueItems" in e["message"] and "/properties/tags" in e["message"], e
    assert e["param"].startswith("response_format"), e


def test_unsupported_keyword_in_tool_parameters(srv):
    tools = [TOOLS[0], {"type": "function", "function": {"name": "tag", "parameters": UNSUPPORTED_KW}}]
    e = err_of(srv, CHAT, chat(SERVED, "x", max_tokens=5, tools=tools, tool_choice="required"))
    assert e["type"] == "invalid_request_error", e
    assert "uniqueItems" in e["message"] and "/properties/tags" in e["message"], e
    assert e["param"].startswith("tools[1]"), e


@pytest.mark.parametrize("path", [CHAT, COMPL])
@pytest.mark.parametrize("grammar,line", [
    ('root ::= ("yes" | "no"', None),
    ('root ::= item\nitem ::= "x" @@\n', 2),
    ('root ::= missing\n', None),
    ('root ::= root "a" | "b"\n', None),  # left recursion
])
def test_bad_grammar(srv, path, grammar, line):
    mk = chat if path == CHAT else compl
    e = err_of(srv, path, mk(SERVED, "x", max_tokens=5, grammar=grammar))
    assert e["type"] == "invalid_request_error" and e["param"] == "grammar", e
    m = re.search(r"line (\d+),? column (\d+)", e["message"])
    assert m, e
    if line is not None:
        assert int(m.group(1)) == line, e
    assert requests.get(srv.url + "/health").status_code == 200


UNSUPPORTED = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto",
    "prediction": {"type": "content", "content": "x"}, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "web_search_options": {}, "reasoning_effort": "low",
    "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a", "b"],
    "guided_grammar": 'root ::= "a"', "structured_outputs": {"json": {"type": "object"}}, "min_tokens": 4,
    "stop_token_ids": [2], "bad_words": ["x"], "allowed_token_ids": [1, 2],
}


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_unsupported_parameter(srv, field):
    for path, mk in ((CHAT, chat), (COMPL, compl)):
        e = err_of(srv, path, {**mk(SERVED, "x", max_tokens=2), field: UNSUPPORTED[field]})
        assert e["code"] == "unsupported_parameter" and e["param"] == field and field in e["message"], e


@pytest.mark.parametrize("field,value", [("suffix", "tail"), ("best_of", 2), ("tools", TOOLS),
                                         ("tool_choice", "required")])
def test_unsupported_completions_parameter(srv, field, value):
    e = err_of(srv, COMPL, {**compl(SERVED, "x", max_tokens=2), field: value})
    assert e["code"] == "unsupported_parameter" and e["param"] == field, e


@pytest.mark.parametrize("field,value", [("echo", False), ("suffix", ""), ("best_of", 1)])
def test_completions_neutral_values_accepted(srv, field, value):
    post(srv, COMPL, {**compl(SERVED, "x", max_tokens=2), field: value})


def test_harmless_parameters_accepted(srv):
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    b = chat(SERVED, "Hello", max_tokens=8, temperature=0)
    assert text_of(post(srv, CHAT, {**b, **harmless})) == text_of(post(srv, CHAT, b))
    c = compl(SERVED, "Hello", max_tokens=8, temperature=0)
    assert text_of(post(srv, COMPL, {**c, **harmless})) == text_of(post(srv, COMPL, c))


@pytest.mark.parametrize("bias", [{"5": 101}, {"5": -100.5}, {"5": "x"}, {"abc": 1}, {"-1": 1},
                                  {"99999999": 1}, {"49152": 1}, [1, 2]])
def test_logit_bias_errors(srv, bias):
    for path, mk in ((CHAT, chat), (COMPL, compl)):
        e = err_of(srv, path, mk(SERVED, "x", max_tokens=2, logit_bias=bias))
        assert e["param"] == "logit_bias" and e["type"] == "invalid_request_error", e


def test_logit_bias_bounds_accepted(srv):
    post(srv, COMPL, compl(SERVED, "x", max_tokens=2, logit_bias={"5": 100, "6": -100, "49151": 0}))


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar"),
    ({"grammar": ""}, "grammar"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_struct_fields(srv, body, param):
    e = err_of(srv, CHAT, {**chat(SERVED, "x", max_tokens=2), **body})
    assert e["type"] == "invalid_request_error" and e["param"].startswith(param), e


# ---------- 7. grammar field ----------

def test_grammar_yes_no(srv):
    g = 'root ::= ("yes" | "no")'
    jobs = []
    for i in range(24):
        m = MODELS[i % 3]
        if i % 2:
            jobs.append((CHAT, chat(m, "Is water wet? Answer yes or no.", max_tokens=10, grammar=g)))
        else:
            jobs.append((COMPL, compl(m, "Question: is water wet?\nAnswer:", max_tokens=10, grammar=g)))
    outs = [(r["choices"][0]["finish_reason"], text_of(r)) for r in post_all(srv, jobs)]
    assert all(o in (("stop", "yes"), ("stop", "no")) for o in outs), outs


def test_grammar_repetition(srv):
    g = '# a code\nroot ::= [0-9]{3} "-" [a-z]{2,4} ("!" | "?")?\n'
    jobs = [(COMPL, compl(MODELS[i % 3], "Code:", max_tokens=20, grammar=g)) for i in range(12)]
    for r in post_all(srv, jobs):
        c = r["choices"][0]
        assert c["finish_reason"] == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}[!?]?", c["text"]), c
