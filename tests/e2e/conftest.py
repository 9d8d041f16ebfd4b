"""conftest.py - end-to-end fixtures: start a real `hydrad serve` on a free port per test module
(black box over HTTP), build test adapters with scripts/make_test_adapter.py, and hand out
official `openai` clients. HYDRAD_BIN overrides bin/hydrad; HY_MODEL the model."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("HYDRAD_BIN", os.path.join(ROOT, "bin", "hydrad"))
MODEL = os.path.join(ROOT, os.environ.get("HY_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
SERVED = "base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [BIN, "serve", "-m", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", SERVED, "--threads", "2", "--http-threads", "4"] + list(args)
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"hydrad serve exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("hydrad serve did not become healthy in 60 s")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(*args) -> Server; every server is stopped (SIGTERM) at module end
    and must exit with status 0."""
    servers = []

    def start(*args):
        if not os.path.exists(BIN):
            pytest.skip(f"{BIN} not built")
        log = tmp_path_factory.mktemp("srv") / "hydrad.log"
        s = Server(args, log)
        servers.append(s)
        return s

    yield start
    codes = [s.stop() for s in servers]
    assert all(c == 0 for c in codes), f"hydrad serve exit codes on SIGTERM: {codes}"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-seqs", "8", "--max-batch-tokens", "256")


def make_adapter(out_dir, seed, r=4, K=2, targets="q_proj,v_proj", ratio=1.0):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_adapter.py"), "--out", str(out_dir),
                    "--seed", str(seed), "--r", str(r), "--K", str(K), "--targets", targets,
                    "--ratio", str(ratio), "--base", MODEL], check=True, capture_output=True)
    return str(out_dir)


def body_of(kind, model, prompt, n):
    """A greedy completion ("completion") or chat ("chat") request body of n tokens."""
    b = {"model": model, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    if kind == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    return b


def path_of(kind):
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def mkadapter(out_dir, seed, r=4, K=2, targets="q_proj,v_proj", ratio=1.0):
    """A seeded random adapter directory written by `hydrad mkadapter` (ratio 1.0: the adapter
    moves each projection by about its own output, so greedy text differs from the base)."""
    p = subprocess.run([BIN, "mkadapter", "--out", str(out_dir), "--base", MODEL, "--seed", str(seed), "--r", str(r),
                        "--K", str(K), "--targets", targets, "--ratio", str(ratio)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return str(out_dir)
