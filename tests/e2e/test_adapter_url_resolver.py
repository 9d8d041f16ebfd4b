"""test_adapter_url_resolver.py - adapters loaded on first use from a model store over https
(--adapter-resolver-url with a sha256 manifest; issue 18). A local TLS server (Python's http.server
with a certificate made here by the openssl command line, trusted through --adapter-url-ca) plays
the store and logs every GET, so the tests can count what hydrad fetched: concurrent first requests
for one name fetch it once, a name the manifest does not list is a 404 that fetches nothing, a
wrong sha256 is a 400 that leaves nothing cached, a store that cannot deliver is a 502, a manifest
edited while serving takes effect, an adapter unloaded and asked for again comes from the cache
without a download, and a store host missing from --adapter-url-allow stops the server at start-up."""
from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import http.server
import json
import os
import ssl
import subprocess
import threading
import time

import pytest
import requests

from conftest import BIN, MODEL, mkadapter
from test_adapters_scale import ask, metric, text

NAMES = ["u0", "u1", "u2", "late", "bad"]


def sha256_of(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class Store:
    """An https server over a directory of adapters; `gets` lists the paths asked for."""

    def __init__(self, root, cert, key):
        self.gets = []
        store = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                store.gets.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, name):
        return sum(1 for g in self.gets if g.startswith(f"/{name}/"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("urlstore")
    cert, key = d / "cert.pem", d / "key.pem"
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    root = d / "store"
    root.mkdir()
    for i, n in enumerate(NAMES):
        mkadapter(root / n, seed=300 + i, r=2, K=2, targets="q_proj,v_proj", ratio=1.0)
    manifest = d / "manifest.json"
    mf = {n: sha256_of(root / n / "adapter_model.safetensors") for n in ("u0", "u1", "u2")}
    mf["bad"] = "0" * 64  # the store's file does not have this digest
    mf["gone"] = "1" * 64  # listed, but the store has no such directory
    manifest.write_text(json.dumps(mf))
    store = Store(root, cert, key)
    yield {"dir": d, "root": root, "cert": cert, "manifest": manifest, "store": store, "cache": d / "cache"}
    store.httpd.shutdown()


def args_of(env, host="127.0.0.1"):
    return ["--adapter-resolver-url", f"https://{host}:{env['store'].port}/{{name}}/",
            "--adapter-resolver-manifest", str(env["manifest"]), "--adapter-url-allow", "127.0.0.1",
            "--adapter-url-ca", str(env["cert"]), "--adapter-cache", str(env["cache"]),
            "--max-loras", "4", "--max-cpu-loras", "8", "--max-seqs", "16"]


@pytest.fixture(scope="module")
def srv(start_server, env):
    return start_server(*args_of(env))


def test_concurrent_first_use_fetches_once_and_matches_a_local_load(srv, env, start_server):
    with cf.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda i: (NAMES[i % 2], ask(srv, NAMES[i % 2])), range(16)))
    for name, r in outs:
        assert r.status_code == 200, (name, r.text)
    st = env["store"]
    for n in ("u0", "u1"):  # the config and the weights, once each
        assert st.count(n) == 2, st.gets
    assert metric(srv, "hydrad_adapter_downloads_total") == 2
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == 2
    by_name = {}
    for name, r in outs:
        by_name.setdefault(name, set()).add(r.json()["choices"][0]["text"])
    assert all(len(v) == 1 for v in by_name.values()), by_name
    ref = start_server("--adapter", f"u0={env['root']}/u0", "--adapter", f"u1={env['root']}/u1")
    base = text(ref, "base")
    for n in ("u0", "u1"):
        got = next(iter(by_name[n]))
        assert got == text(ref, n) and got != base


def test_unlisted_name_is_404_and_fetches_nothing(srv, env):
    before = len(env["store"].gets)
    r = ask(srv, "late")  # in the store, not in the manifest
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert len(env["store"].gets) == before


def test_sha256_mismatch_is_400_and_caches_nothing(srv, env):
    fails = metric(srv, "hydrad_adapter_load_failures_total") or 0
    r = ask(srv, "bad")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "adapter_load_failed"
    assert "sha256 mismatch" in r.json()["error"]["message"]
    assert metric(srv, "hydrad_adapter_load_failures_total") == fails + 1
    weights = [f for _, _, fs in os.walk(env["cache"]) for f in fs if f.startswith("adapter_model")]
    assert len(weights) == 2, weights  # u0's and u1's; nothing of bad's, not even a temp file
    assert text(srv, "u0")  # still serving


def test_store_that_cannot_deliver_is_502(srv, env):
    r = ask(srv, "gone")
    assert r.status_code == 502, r.text
    assert "gone" in r.json()["error"]["message"]
    assert text(srv, "u1")


def test_manifest_edit_takes_effect(srv, env):
    mf = json.loads(env["manifest"].read_text())
    mf["late"] = sha256_of(env["root"] / "late" / "adapter_model.safetensors")
    env["manifest"].write_text(json.dumps(mf))
    t = time.time() + 5  # a modification time the server has not seen, whatever the clock's grain
    os.utime(env["manifest"], (t, t))
    r = ask(srv, "late")
    assert r.status_code == 200, r.text
    assert env["store"].count("late") == 2


def test_unloaded_adapter_comes_back_from_the_cache(srv, env):
    assert text(srv, "u2")
    downloads, gets = metric(srv, "hydrad_adapter_downloads_total"), env["store"].count("u2")
    loads = metric(srv, "hydrad_adapter_first_use_loads_total")
    first = text(srv, "u2")
    r = requests.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "u2"}, timeout=30)
    assert r.status_code == 200, r.text
    assert text(srv, "u2") == first
    assert metric(srv, "hydrad_adapter_first_use_loads_total") == loads + 1
    assert metric(srv, "hydrad_adapter_downloads_total") == downloads
    assert env["store"].count("u2") == gets


def test_store_host_must_be_allowed(env):
    p = subprocess.run([BIN, "serve", "-m", MODEL, "--port", "1", "--adapter-resolver-url",
                        f"https://127.0.0.2:{env['store'].port}/{{name}}/", "--adapter-resolver-manifest",
                        str(env["manifest"]), "--adapter-url-allow", "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "--adapter-resolver-url" in p.stderr and "not in --adapter-url-allow" in p.stderr, p.stderr
    p = subprocess.run([BIN, "serve", "-m", MODEL, "--port", "1", "--adapter-resolver-url",
                        f"https://127.0.0.1:{env['store'].port}/{{name}}/", "--adapter-url-allow", "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--adapter-resolver-manifest" in p.stderr, p.stderr
