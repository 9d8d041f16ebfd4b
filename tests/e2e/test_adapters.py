"""test_adapters.py - adapters over HTTP against a real hydrad serve: start-up --adapter, admin
load/unload (admin key, --adapter-root confinement), /v1/models and /v1/adapters listings,
requests routed by `model`, mixed base/adapter concurrency, 404 after unload, token counts in
/v1/adapters, and --adapter-scale 0 (server and `hydrad generate`) giving the base model's text."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess

import openai
import pytest
import requests

from conftest import BIN, MODEL, SERVED, make_adapter

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def env(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a1 = make_adapter(root / "a1", seed=1, r=4, K=2)
    a2 = make_adapter(root / "a2", seed=2, r=4, K=1, targets="q_proj,v_proj,o_proj")
    outside = make_adapter(tmp_path_factory.mktemp("outside") / "x", seed=3)
    os.symlink(outside, root / "escape")
    srv = start_server("--adapter", f"boot={a1}", "--adapter", f"off={a1}", "--adapter-scale", "off=0",
                       "--adapter-root", str(root), "--admin-key", "adm", "--max-loras", "2", "--max-seqs", "8")
    return srv, root, a1, a2, outside


def admin(srv, path, body, key="adm"):
    return requests.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"})


def gen(c, model, n=8):
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0).choices[0].text


def test_boot_adapter_listed_and_used(env):
    srv, *_ = env
    models = {m.id: m for m in srv.client().models.list().data}
    assert "boot" in models and models["boot"].parent == SERVED
    c = srv.client()
    assert gen(c, "boot") != gen(c, SERVED)  # ratio 1.0 adapter changes the greedy text
    assert gen(c, "boot") == gen(c, "boot")


def test_load_list_unload(env):
    srv, root, a1, a2, outside = env
    assert admin(srv, "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": a2}, key="bad").status_code == 401
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": a2})
    assert r.status_code == 200, r.text
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": a2})
    assert r.status_code == 400
    for bad in [outside, str(root / "escape"), str(root / ".." / "outside"), "/etc"]:
        r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["param"] == "lora_path"
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(root)})
    assert r.status_code == 400  # not an adapter directory
    c = srv.client()
    base, boot, two = gen(c, SERVED), gen(c, "boot"), gen(c, "two")
    assert two != base
    # mixed batch: base + two adapters at once give the same greedy texts as alone
    with cf.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda m: gen(c, m), [SERVED, "boot", "two"] * 2))
    assert got == [base, boot, two] * 2
    info = {a["name"]: a for a in requests.get(srv.url + "/v1/adapters").json()["data"]}
    assert info["two"]["K"] == 1 and info["two"]["r"] == 4 and info["two"]["state"] == "ready"
    assert info["two"]["targets"] == ["q_proj", "v_proj", "o_proj"]
    assert info["boot"]["K"] == 2 and info["boot"]["targets"] == ["q_proj", "v_proj"]
    assert info["boot"]["requests"] >= 4 and info["two"]["requests"] == 3
    assert info["boot"]["tokens"] > 0 and info["two"]["tokens"] > 0
    # tokens run through "two" by one more request: its prompt, then every sampled token but the last
    # (the last one is returned, never fed back)
    u = c.completions.create(model="two", prompt=PROMPT, max_tokens=8, temperature=0).usage
    info2 = {a["name"]: a for a in requests.get(srv.url + "/v1/adapters").json()["data"]}
    assert info2["two"]["tokens"] - info["two"]["tokens"] == u.prompt_tokens + u.completion_tokens - 1
    r = admin(srv, "/v1/unload_lora_adapter", {"lora_name": "two"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        gen(c, "two")
    assert "two" not in [m.id for m in c.models.list().data]
    assert admin(srv, "/v1/unload_lora_adapter", {"lora_name": "two"}).status_code == 404
    # the name can be reused after unloading
    assert admin(srv, "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": a2}).status_code == 200
    assert gen(c, "two") == two
    m = requests.get(srv.url + "/metrics").text
    assert 'max_lora="2"' in m


def test_file_links_out_of_root_refused(env):
    """A directory inside the root whose files are symlinks to files outside it is refused, and
    the error quotes no file content (an adapter_config.json linked to /etc/passwd)."""
    srv, root, a1, a2, outside = env
    d = root / "linked"
    d.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(os.path.join(outside, f), d / f)
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "linked", "lora_path": str(d)})
    assert r.status_code == 400 and "outside every --adapter-root" in r.json()["error"]["message"], r.text
    p = root / "passwd"
    p.mkdir()
    os.symlink("/etc/passwd", p / "adapter_config.json")
    os.symlink(os.path.join(a1, "adapter_model.safetensors"), p / "adapter_model.safetensors")
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "pw", "lora_path": str(p)})
    assert r.status_code == 400 and "outside every --adapter-root" in r.json()["error"]["message"], r.text
    assert "root:" not in r.text and "/bin/" not in r.text, r.text  # /etc/passwd's first line
    # a link that stays inside the root is fine
    ok = root / "inside"
    ok.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(os.path.join(a1, f), ok / f)
    assert admin(srv, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": str(ok)}).status_code == 200
    assert admin(srv, "/v1/unload_lora_adapter", {"lora_name": "inside"}).status_code == 200


def test_url_loading_refusals(env):
    srv, *_ = env
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "u1", "lora_path": "http://127.0.0.1:1/a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "u2", "lora_path": "https://127.0.0.1:1/a", "sha256": "xyz"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sha256"
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "u3", "lora_path": "https://127.0.0.1:1/a"})
    assert r.status_code == 400 and "127.0.0.1" in r.json()["error"]["message"]
    assert "u3" not in [m.id for m in srv.client().models.list().data]
    r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "u4", "lora_path": "https://127.0.0.1:1/" + "a" * 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"


def test_many_adapters_listed(start_server, tmp_path_factory):
    """More adapters than the listings once held (256) all show in /v1/models and /v1/adapters."""
    root = tmp_path_factory.mktemp("many")
    a = make_adapter(root / "a", seed=5, r=2, K=1, targets="v_proj")
    srv = start_server("--adapter-root", str(root), "--admin-key", "adm", "--max-cpu-loras", "300")
    names = [f"m{i}" for i in range(300)]
    for n in names:
        assert admin(srv, "/v1/load_lora_adapter", {"lora_name": n, "lora_path": a}).status_code == 200
    assert admin(srv, "/v1/load_lora_adapter", {"lora_name": "one-too-many", "lora_path": a}).status_code == 507
    models = [m.id for m in srv.client().models.list().data]
    assert models == [SERVED] + names
    listed = [x["name"] for x in requests.get(srv.url + "/v1/adapters").json()["data"]]
    assert listed == names


def test_scale_zero_is_base(env):
    srv, root, a1, *_ = env
    c = srv.client()
    assert gen(c, "off") == gen(c, SERVED) != gen(c, "boot")  # same weights as boot, scaled by 0


def test_generate_adapter_scale(env):
    _, _, a1, *_ = env

    def run(*extra):
        p = subprocess.run([BIN, "generate", "-m", MODEL, "-p", PROMPT, "-n", "8", "--temp", "0", "--threads", "2",
                            *extra], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    base = run()
    assert run("--adapter", a1) != base
    assert run("--adapter", a1, "--adapter-scale", "0") == base
    assert run("--adapter", a1, "--adapter-scale", "1") == run("--adapter", a1)


def test_url_allow_list_paths_and_metrics_auth(start_server, tmp_path_factory):
    """https adapter URLs only from --adapter-url-allow hosts, never to loopback through a name;
    server paths only for admins; /metrics behind the API key with --metrics-auth."""
    root = tmp_path_factory.mktemp("sec")
    a = make_adapter(root / "a", seed=9, r=2, K=2, targets="v_proj")
    srv = start_server("--adapter", f"a={a}", "--adapter-root", str(root), "--api-key", "user", "--admin-key", "adm",
                       "--adapter-url-allow", "localhost", "--adapter-url-allow", "models.example.org",
                       "--metrics-auth")
    for url, needle in (("https://localhost:1/x", "loopback"), ("https://127.0.0.1:1/x", "not in --adapter-url-allow"),
                        ("https://evil.example.org/x", "not in --adapter-url-allow"),
                        ("https://user@localhost/x", "no usable host")):
        r = admin(srv, "/v1/load_lora_adapter", {"lora_name": "u", "lora_path": url})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (url, r.text)
    user = {"Authorization": "Bearer user"}
    models = requests.get(srv.url + "/v1/models", headers=user).json()["data"]
    assert all(str(root) not in json.dumps(m) for m in models), models
    listed = requests.get(srv.url + "/v1/adapters", headers=user).json()["data"]
    assert listed and all("path" not in x for x in listed), listed
    listed = requests.get(srv.url + "/v1/adapters", headers={"Authorization": "Bearer adm"}).json()["data"]
    assert listed[0]["path"].startswith(str(root))
    assert requests.get(srv.url + "/metrics").status_code == 401
    assert requests.get(srv.url + "/metrics", headers=user).status_code == 200
