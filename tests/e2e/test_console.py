"""test_console.py - the web console (server/ui/, served at / by server/srv_ui.c) in a real headless
Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a real `hydrad serve` with
the default model and the two trained adapters: streaming chat equal to the API's greedy answer,
raw completions, the router view against the API's token_heads, stop freeing the sequence, adapter
load/unload and the server's refusals verbatim, the API and admin keys, model output with markup
shown as text, the live charts. The checks of what hydrad serves (CSP, no inline script, --no-ui)
need no browser. Browser tests skip with the reason when Chromium, its driver or Selenium is absent.
A failing browser test leaves failure.png, failure.html and console.json in its tmp_path.
HY_CONSOLE_SHOTS=DIR also writes the README's screenshots (console-playground.png,
console-adapters.png) into DIR."""
from __future__ import annotations

import functools
import http.client
import json
import os
import re
import shutil
import sys
import time
import warnings
from html.parser import HTMLParser

import pytest
import requests

from conftest import ROOT, SERVED, mkadapter

TRAINED = os.path.join(ROOT, "tests", "fixtures", "adapters", "trained")
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    SELENIUM = True
except ImportError:
    SELENIUM = False

NO_BROWSER = (None if SELENIUM and CHROMIUM and DRIVER else
              "no browser for the console tests: " + ", ".join(
                  n for n, ok in (("selenium (tests/requirements.txt)", SELENIUM), ("chromium", CHROMIUM),
                                  ("chromedriver (Debian: chromium-driver)", DRIVER)) if not ok)
              + " missing; scripts/bootstrap.sh installs them")
if NO_BROWSER:
    warnings.warn(NO_BROWSER)
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")

USER_KEY, ADMIN_KEY = "console-user-key", "console-admin-key"
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


# ---------- servers ----------

@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    """A --adapter-root holding two seeded adapters the UI loads at run time."""
    root = tmp_path_factory.mktemp("console-adapters")
    mkadapter(root / "extra", seed=41, r=4, K=3, targets="q_proj,v_proj")
    mkadapter(root / "extra2", seed=42, r=2, K=2, targets="k_proj,o_proj")
    return root


def adapters_args(root):
    return ["--adapter", f"hydra={TRAINED}/hydra", "--adapter", f"lora={TRAINED}/lora", "--adapter-root", str(root),
            "--max-seqs", "4"]


@pytest.fixture(scope="module")
def srv(start_server, adapter_root):
    return start_server(*adapters_args(adapter_root))


@pytest.fixture(scope="module")
def key_srv(start_server, adapter_root):
    return start_server(*adapters_args(adapter_root), "--api-key", USER_KEY, "--admin-key", ADMIN_KEY,
                        "--metrics-auth")


def metrics(url, key=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    out = {}
    for line in requests.get(url + "/metrics", headers=h, timeout=10).text.splitlines():
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(ms, name):
    return sum(v for k, v in ms.items() if k == name or k.startswith(name + "{"))


# ---------- what hydrad serves (no browser) ----------

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.inline_script = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_data(self, data):
        if getattr(self, "_in_script", False) and data.strip():
            self.inline_script.append(data)

    def handle_endtag(self, tag):
        self._in_script = False


def test_page_served_with_csp_and_no_inline_script(srv, key_srv):
    r = requests.get(srv.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers.get("Content-Security-Policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives.get("default-src") == ["'none'"], csp
    assert directives.get("script-src") == ["'self'"], csp  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives.get("style-src") == ["'self'"], csp
    assert directives.get("connect-src") == ["'self'"], csp
    assert r.headers.get("X-Content-Type-Options") == "nosniff"
    p = _Tags()
    p.feed(r.text)
    assert not p.inline_script, "inline <script> in index.html"
    on_attrs = [(t, a) for t, a in p.tags if any(k.startswith("on") for k in a)]
    assert not on_attrs, f"inline event handlers: {on_attrs}"
    assets = [a.get("src") or a.get("href") for t, a in p.tags if t in ("script", "link")]
    assert "/ui/app.js" in assets and "/ui/style.css" in assets
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in assets:
        a = requests.get(srv.url + path, timeout=10)
        assert a.status_code == 200, path
        assert a.headers["Content-Type"].startswith(types[os.path.splitext(path)[1]]), (path, a.headers)
        assert "Content-Security-Policy" in a.headers
        if path.endswith(".js"):  # the modules the entry imports are served too
            for dep in re.findall(r"from '\./([\w.-]+)'", a.text):
                assert requests.get(f"{srv.url}/ui/{dep}", timeout=10).status_code == 200, dep
    assert requests.get(srv.url + "/ui/nope.js", timeout=10).status_code == 404
    for raw in ("/ui/../Makefile", "/ui/%2e%2e/Makefile", "/ui/", "/ui"):  # only embedded names are served
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        c.request("GET", raw)
        r2 = c.getresponse()
        assert r2.status == (200 if raw in ("/ui/", "/ui") else 404), raw
        assert "hydrad console" in r2.read().decode() or r2.status == 404
        c.close()
    # the page itself needs no key (it asks for one); the data behind it does
    assert requests.get(key_srv.url + "/", timeout=10).status_code == 200
    assert requests.get(key_srv.url + "/v1/models", timeout=10).status_code == 401
    assert requests.get(key_srv.url + "/v1/adapters", timeout=10).status_code == 401


def test_no_ui_flag_and_startup_url(start_server, srv):
    srv.log.flush()
    with open(srv.log.name) as f:
        assert f"web console on http://127.0.0.1:{srv.port}/" in f.read()
    off = start_server("--no-ui")
    for path in ("/", "/ui/app.js"):
        assert requests.get(off.url + path, timeout=10).status_code == 404
    assert requests.get(off.url + "/v1/models", timeout=10).status_code == 200
    off.log.flush()
    with open(off.log.name) as f:
        assert "web console" not in f.read()


# ---------- the browser ----------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
              "--disable-extensions", "--window-size=1360,900", "--force-device-scale-factor=1",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=o, service=Service(DRIVER))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def screenshots_on_failure(fn):
    """Save failure.png/.html/console.json under the test's tmp_path when the test fails."""
    @functools.wraps(fn)
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception:
            d, out = kw.get("browser"), kw.get("tmp_path")
            if d is not None and out is not None:
                try:
                    d.save_screenshot(str(out / "failure.png"))
                    (out / "failure.html").write_text(d.page_source)
                    (out / "console.json").write_text(json.dumps(d.get_log("browser"), indent=1))
                    print(f"console test failed: screenshot, page and console log in {out}", file=sys.stderr)
                except WebDriverException as e:
                    print(f"console test failed; no screenshot: {e}", file=sys.stderr)
            raise
    return run


def shot(d, name):
    """The README's screenshots, only when HY_CONSOLE_SHOTS names a directory."""
    out = os.environ.get("HY_CONSOLE_SHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        d.save_screenshot(os.path.join(out, name))


def wait(d, cond, timeout=20, msg=""):
    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond(), msg)


def js(d, script, *args):
    return d.execute_script(script, *args)


def open_console(d, server, tab="playground", models=3):
    d.get(f"{server.url}/#{tab}")
    wait(d, lambda: js(d, "return document.body.dataset.ready") == "1", msg="app.js did not start")
    if models:
        wait(d, lambda: js(d, "return document.getElementById('model').options.length") == models,
             msg="model picker not filled")


def settings(d, **kw):
    """Set playground controls by id (value for inputs/selects, bool for checkboxes), firing change."""
    for k, v in kw.items():
        js(d, """const e = document.getElementById(arguments[0]);
                 if (e.type === 'checkbox') e.checked = arguments[1]; else e.value = arguments[1];
                 e.dispatchEvent(new Event('change', {bubbles: true}));""", k.replace("_", "-"), v)


def clear_conversation(d):
    d.find_element(By.ID, "clear").click()
    wait(d, lambda: js(d, "return document.querySelectorAll('#conversation .msg').length") == 0)


def n_msgs(d):
    return js(d, "return document.querySelectorAll('#conversation .msg').length")


def send(d, text):
    """Type a prompt, click Send; returns the message count before."""
    before = n_msgs(d)
    box = d.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    d.find_element(By.ID, "send").click()
    wait(d, lambda: n_msgs(d) == before + 2, msg="no answer bubble")
    return before


def last_answer(d, timeout=60):
    wait(d, lambda: js(d, "return document.querySelector('#conversation .msg:last-child').dataset.state") != "streaming",
         timeout=timeout, msg="answer still streaming")
    return js(d, """const m = document.querySelector('#conversation .msg:last-child');
        return {state: m.dataset.state, chunks: Number(m.dataset.chunks || 0),
                text: m.querySelector('.content').textContent, stats: m.querySelector('.stats').textContent,
                spans: [...m.querySelectorAll('.content span.tok[data-head]')].map(s => [Number(s.dataset.tok),
                        Number(s.dataset.head), s.textContent, getComputedStyle(s).borderBottomColor]),
                legend: [...m.querySelectorAll('.router-legend .head')].map(h => [Number(h.dataset.head),
                        Number(h.dataset.share)])};""")


def chat_api(server, body, key=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    r = requests.post(server.url + "/v1/chat/completions", json=body, headers=h, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def severe(d):
    return [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]


# ---------- browser tests ----------

@needs_browser
@screenshots_on_failure
def test_page_loads_without_console_errors(browser, srv, tmp_path):
    d = browser
    d.get("about:blank")
    d.get_log("browser")  # drop what earlier pages logged
    open_console(d, srv)
    ids = js(d, "return [...document.getElementById('model').options].map(o => o.value)")
    assert ids == [SERVED, "hydra", "lora"]
    d.find_element(By.ID, "tab-adapters").click()
    wait(d, lambda: js(d, "return document.querySelectorAll('#adapters-body tr').length") == 2)
    rows = js(d, "return [...document.querySelectorAll('#adapters-body tr')].map(r => [r.dataset.name, "
                 "r.querySelector('.K').textContent, r.querySelector('.state').textContent])")
    assert sorted(rows) == [["hydra", "4", "ready"], ["lora", "1", "ready"]]
    d.find_element(By.ID, "tab-live").click()
    wait(d, lambda: int(js(d, "return document.getElementById('view-live').dataset.samples || 0")) >= 1)
    assert js(d, "return document.getElementById('live-kv-total').textContent") == str(
        int(metric(metrics(srv.url), "hydrad_kv_blocks_total")))
    d.find_element(By.ID, "tab-playground").click()
    errors = severe(d)
    assert not errors, f"console errors: {errors}"


@needs_browser
@screenshots_on_failure
def test_chat_streams_the_api_answer(browser, srv, tmp_path):
    d = browser
    open_console(d, srv)
    clear_conversation(d)
    settings(d, model=SERVED, mode="chat", system="", temperature="0", top_p="1", max_tokens="24", seed="7",
             ignore_eos=False, format="text")
    send(d, "What is the capital of France?")
    a = last_answer(d)
    want = chat_api(srv, {"model": SERVED, "temperature": 0, "top_p": 1, "max_tokens": 24, "seed": 7,
                          "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert a["state"] == "done"
    assert a["text"] == want["choices"][0]["message"]["content"]
    assert a["chunks"] >= 3, "the answer did not arrive as a stream"
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens", a["stats"]), a["stats"]
    assert f"{want['usage']['completion_tokens']} tokens" in a["stats"]
    # a second turn carries the first (and the system prompt) like the API would
    system = "You are a pirate. Speak like a pirate."
    settings(d, system=system)
    send(d, "And of Italy?")
    b = last_answer(d)
    turns = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": a["text"]}, {"role": "user", "content": "And of Italy?"}]
    body = {"model": SERVED, "temperature": 0, "top_p": 1, "max_tokens": 24, "seed": 7}
    want2 = chat_api(srv, {**body, "messages": [{"role": "system", "content": system}] + turns})
    assert b["text"] == want2["choices"][0]["message"]["content"]
    # (both the system prompt and the first turn change this answer, so both must have been sent)
    assert chat_api(srv, {**body, "messages": turns})["choices"][0]["message"]["content"] != b["text"]
    assert chat_api(srv, {**body, "messages": [{"role": "system", "content": system}] + turns[2:]}
                    )["choices"][0]["message"]["content"] != b["text"]
    # the conversation survives a reload (localStorage)
    d.refresh()
    open_console(d, srv)
    texts = js(d, "return [...document.querySelectorAll('#conversation .msg .content')].map(c => c.textContent)")
    assert texts == ["What is the capital of France?", a["text"], "And of Italy?", b["text"]]
    assert js(d, "return JSON.parse(localStorage.getItem('hydrad.conversation')).messages.length") == 4


@needs_browser
@screenshots_on_failure
def test_raw_completion_and_json_mode(browser, srv, tmp_path):
    d = browser
    open_console(d, srv)
    clear_conversation(d)
    settings(d, model="lora", mode="completion", temperature="0", max_tokens="12", seed="", ignore_eos=False,
             format="text", router=False)
    send(d, "The capital of France is")
    a = last_answer(d)
    r = requests.post(srv.url + "/v1/completions", json={"model": "lora", "prompt": "The capital of France is",
                                                         "temperature": 0, "max_tokens": 12}, timeout=60).json()
    assert a["text"] == r["choices"][0]["text"]
    assert js(d, "return document.querySelector('#conversation .msg:last-child').classList.contains('completion')")
    settings(d, model=SERVED, mode="chat", format="json_object", max_tokens="48")
    send(d, "Give me a JSON object with a key colour.")
    j = last_answer(d)
    assert isinstance(json.loads(j["text"]), dict), j["text"]
    settings(d, format="json_schema")
    assert js(d, "return document.getElementById('schema').hidden") is False
    settings(d, schema="{not json")
    before = n_msgs(d)
    d.find_element(By.ID, "prompt").send_keys("x")
    d.find_element(By.ID, "send").click()
    wait(d, lambda: "JSON schema" in js(d, "return document.getElementById('chat-error').textContent"))
    assert n_msgs(d) == before
    settings(d, format="text")


@needs_browser
@screenshots_on_failure
def test_router_view_colours_tokens_by_head(browser, srv, tmp_path):
    d = browser
    open_console(d, srv)
    clear_conversation(d)
    prompt = "Reverse the order of these words: lemon, rocket, violin, meadow"
    settings(d, model="hydra", mode="chat", system="", temperature="0", max_tokens="32", seed="1",
             ignore_eos=False, format="text", router=True)
    send(d, prompt)
    a = last_answer(d)
    want = chat_api(srv, {"model": "hydra", "temperature": 0, "max_tokens": 32, "seed": 1,
                          "messages": [{"role": "user", "content": prompt}], "hydra": {"return_router": True}})
    heads = want["choices"][0]["hydra"]["router"]["token_heads"]
    assert a["text"] == want["choices"][0]["message"]["content"]
    assert len(set(heads)) >= 2, f"the router did not switch heads on this prompt: {heads}"
    # every token of the text is a span coloured by the head the API reports for that token
    assert "".join(s[2] for s in a["spans"]) == a["text"]
    assert [s[0] for s in a["spans"]] == list(range(len(a["spans"])))
    assert [s[1] for s in a["spans"]] == heads[:len(a["spans"])]
    assert len(a["spans"]) >= len(heads) - 1  # the last head may be <|im_end|>'s, which has no text
    palette = {0: "rgb(230, 25, 75)", 1: "rgb(60, 180, 75)", 2: "rgb(67, 99, 216)", 3: "rgb(245, 130, 49)"}
    for _, h, _, colour in a["spans"]:
        assert colour == palette[h]
    # the legend's per-head share is the API's
    n = len(heads)
    assert [(h, round(100 * heads.count(h) / n, 1)) for h in range(4)] == [(h, s) for h, s in a["legend"]]
    shot(d, "console-playground.png")


@needs_browser
@screenshots_on_failure
def test_stop_button_frees_the_sequence(browser, srv, tmp_path):
    d = browser
    open_console(d, srv)
    clear_conversation(d)
    m0 = metrics(srv.url)
    settings(d, model=SERVED, mode="chat", temperature="1", max_tokens="3000", seed="", ignore_eos=True,
             format="text")
    send(d, "Tell me a very long story.")
    wait(d, lambda: len(js(d, "return document.querySelector('#conversation .msg:last-child .content').textContent"))
         > 40, msg="nothing streamed")
    assert metric(metrics(srv.url), "vllm:num_requests_running") == 1
    d.find_element(By.ID, "stop").click()
    a = last_answer(d)
    assert a["state"] == "stopped" and "stopped" in a["stats"]
    assert js(d, "return document.getElementById('send').disabled") is False
    assert js(d, "return document.getElementById('stop').disabled") is True

    def freed():
        m = metrics(srv.url)
        return (metric(m, "vllm:num_requests_running") == 0 and metric(m, "hydrad_kv_blocks_used") == 0
                and metric(m, "hydrad_requests_cancelled_total") == metric(m0, "hydrad_requests_cancelled_total") + 1)
    wait(d, freed, timeout=10, msg="the sequence was not freed after stop")
    g1 = metric(metrics(srv.url), "hydrad_generation_tokens_total")
    time.sleep(0.5)
    g2 = metric(metrics(srv.url), "hydrad_generation_tokens_total")
    assert g1 == g2, "tokens still being generated after stop"
    assert g2 - metric(m0, "hydrad_generation_tokens_total") < 2500
    settings(d, ignore_eos=False, temperature="0.7", max_tokens="256")


@needs_browser
@screenshots_on_failure
def test_load_and_unload_adapter(browser, srv, adapter_root, tmp_path):
    d = browser
    open_console(d, srv, tab="adapters")
    wait(d, lambda: js(d, "return document.querySelectorAll('#adapters-body tr').length") == 2)
    d.find_element(By.ID, "load-name").send_keys("extra")
    d.find_element(By.ID, "load-path").send_keys(str(adapter_root / "extra"))
    d.find_element(By.ID, "load-btn").click()
    row = "document.querySelector('#adapters-body tr[data-name=\"extra\"]')"
    wait(d, lambda: js(d, f"return !!{row}"), msg="loaded adapter not in the table")
    cells = js(d, f"return Object.fromEntries([...{row}.children].map(c => [c.className, c.textContent]))")
    assert (cells["state"], cells["K"], cells["r"], cells["targets"]) == ("ready", "3", "4", "q_proj, v_proj")
    assert js(d, "return document.getElementById('adapter-notice').textContent") == "loaded extra"
    assert js(d, "return document.getElementById('adapter-error').textContent") == ""
    assert "extra" in [a["name"] for a in requests.get(srv.url + "/v1/adapters", timeout=10).json()["data"]]
    options = "return [...document.getElementById('model').options].map(o => o.value)"
    wait(d, lambda: "extra" in js(d, options), msg="loaded adapter not in the model picker")
    # hydra has run in earlier tests: its mean gates are bars
    bars = js(d, "return [...document.querySelectorAll('#adapters-body tr[data-name=\"hydra\"] .gates .bar')]"
                 ".map(b => Number(b.dataset.gate))")
    if bars:
        assert len(bars) == 4 and abs(sum(bars) - 1) < 0.01
    shot(d, "console-adapters.png")
    js(d, f"{row}.querySelector('button.unload').click()")
    wait(d, lambda: not js(d, f"return !!{row}"), msg="unloaded adapter still in the table")
    wait(d, lambda: "extra" not in js(d, options), msg="unloaded adapter still in the model picker")
    assert js(d, "return document.getElementById('adapter-notice').textContent") == "unloaded extra"
    assert "extra" not in [a["name"] for a in requests.get(srv.url + "/v1/adapters", timeout=10).json()["data"]]


@needs_browser
@screenshots_on_failure
def test_bad_path_shows_the_server_message(browser, srv, adapter_root, tmp_path):
    d = browser
    open_console(d, srv, tab="adapters")
    for name, path in (("bad", "/etc"), ("bad", str(adapter_root / "missing"))):
        want = requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=30)
        assert 400 <= want.status_code < 500
        for i, v in (("load-name", name), ("load-path", path), ("load-sha", "")):
            d.find_element(By.ID, i).clear()
            d.find_element(By.ID, i).send_keys(v)
        d.find_element(By.ID, "load-btn").click()
        err = "return document.getElementById('adapter-error').textContent"
        wait(d, lambda: js(d, err) != "", msg="no error shown")
        assert js(d, err) == want.json()["error"]["message"]
    # a malformed sha256 is refused by the server the same way
    d.find_element(By.ID, "load-sha").send_keys("abc")
    d.find_element(By.ID, "load-btn").click()
    wait(d, lambda: js(d, "return document.getElementById('adapter-error').textContent") == "sha256 must be 64 hex digits")
    assert js(d, "return document.querySelectorAll('#adapters-body tr').length") == 2


@needs_browser
@screenshots_on_failure
def test_api_key_required_and_admin_key_asked(browser, key_srv, adapter_root, tmp_path):
    d = browser
    open_console(d, key_srv, tab="playground", models=0)
    wait(d, lambda: js(d, "return !document.getElementById('auth').hidden"), msg="no key prompt")
    assert "API key" in js(d, "return document.getElementById('key-label').textContent")
    time.sleep(0.5)
    # no data reached the page
    assert js(d, "return document.getElementById('model').options.length") == 0
    assert js(d, "return document.querySelectorAll('#adapters-body tr').length") == 0
    assert js(d, "return document.getElementById('view-live').dataset.samples") is None
    assert js(d, "return document.querySelectorAll('#conversation .msg').length") == 0
    d.find_element(By.ID, "key-input").send_keys(USER_KEY)
    d.find_element(By.ID, "key-save").click()
    wait(d, lambda: js(d, "return document.getElementById('model').options.length") == 3, msg="key not used")
    assert js(d, "return sessionStorage.getItem('hydrad.apiKey')") == USER_KEY
    assert USER_KEY not in json.dumps(js(d, "return {...localStorage}"))
    # the user key cannot load adapters: the page asks for the admin key and tries again with it
    d.find_element(By.ID, "tab-adapters").click()
    wait(d, lambda: js(d, "return document.querySelectorAll('#adapters-body tr').length") == 2)
    d.find_element(By.ID, "load-name").send_keys("extra2")
    d.find_element(By.ID, "load-path").send_keys(str(adapter_root / "extra2"))
    d.find_element(By.ID, "load-btn").click()
    wait(d, lambda: js(d, "return document.getElementById('auth').dataset.mode") == "admin"
         and js(d, "return !document.getElementById('auth').hidden"), msg="no admin key prompt")
    assert "Incorrect API key provided." in js(d, "return document.getElementById('key-label').textContent")
    d.find_element(By.ID, "key-input").send_keys(ADMIN_KEY)
    d.find_element(By.ID, "key-save").click()
    wait(d, lambda: js(d, "return !!document.querySelector('#adapters-body tr[data-name=\"extra2\"]')"),
         msg="admin load did not happen")
    assert js(d, "return sessionStorage.getItem('hydrad.adminKey')") == ADMIN_KEY
    # admins see the adapters' server paths
    wait(d, lambda: js(d, "return document.querySelector('#adapters-body tr[data-name=\"extra2\"] .path').textContent")
         .endswith("extra2"))


@needs_browser
@screenshots_on_failure
def test_model_output_with_markup_is_text(browser, srv, tmp_path):
    d = browser
    open_console(d, srv)
    clear_conversation(d)
    schema = json.dumps({"type": "string", "enum": [XSS]})
    for model in (SERVED, "hydra"):  # plain text nodes, and the router view's token spans
        settings(d, model=model, mode="chat", temperature="0", max_tokens="96", seed="", ignore_eos=False,
                 format="json_schema", schema=schema, router=True)
        send(d, "Say something.")
        a = last_answer(d)
        assert a["text"] == json.dumps(XSS), a["text"]
    for reload in (False, True):  # live rendering, then the conversation rebuilt from localStorage
        if reload:
            d.refresh()
            open_console(d, srv)
        assert js(d, "return document.querySelectorAll('#conversation script, #conversation img').length") == 0
        assert js(d, "return document.querySelectorAll('script').length") == 1  # only app.js
        assert js(d, "return window.__pwned === undefined")
        assert js(d, "return document.querySelectorAll('#conversation .msg .content')[1].textContent") == json.dumps(XSS)
    settings(d, format="text")


@needs_browser
@screenshots_on_failure
def test_live_view_charts(browser, srv, tmp_path):
    d = browser
    severe(d)  # drop what earlier pages logged
    open_console(d, srv, tab="live")
    n0 = int(js(d, "return document.getElementById('view-live').dataset.samples || 0"))
    g0 = float(js(d, "return document.getElementById('view-live').dataset.generated || 0"))
    for _ in range(2):
        r = requests.post(srv.url + "/v1/completions", json={"model": "lora", "prompt": "Once upon a time",
                                                             "max_tokens": 16, "temperature": 0, "ignore_eos": True},
                          timeout=60)
        assert r.status_code == 200
    want = metrics(srv.url)
    lora = want['hydrad_adapter_requests_total{adapter="lora"}']
    wait(d, lambda: float(js(d, "return document.getElementById('view-live').dataset.generated || 0")) >= g0 + 32,
         timeout=10, msg="live view did not poll /metrics")
    assert int(js(d, "return document.getElementById('view-live').dataset.samples")) > n0
    series = js(d, "return Object.fromEntries([...document.querySelectorAll('#legend-adapters .series')]"
                   ".map(s => [s.dataset.label, Number(s.dataset.value)]))")
    assert series.get("lora") == lora
    assert js(d, "return document.getElementById('live-kv-total').textContent") == str(
        int(metric(want, "hydrad_kv_blocks_total")))
    # the charts are drawn: some pixels of the adapter chart are not blank
    inked = js(d, """const c = document.getElementById('chart-adapters');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n;""")
    assert inked > 100
    assert not [e for e in severe(d) if srv.url in e.get("message", "")]
