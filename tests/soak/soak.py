"""soak.py - the sanitizer soak (issue 23): an ASan + UBSan hydrad (tests/soak/soak.mk builds it) under
steady mixed load for --seconds, with adapters loaded and unloaded under it, then checks that nothing
was lost, leaked or slowed down. `make soak` (SOAK_S, default 3600 s; off CI), `make test-soak` (180 s).

Load: the default model, 32 client threads in a closed loop (each sends its next request when the
last one ends), each request drawn at random: /v1/completions or /v1/chat/completions, streamed or
not (streams ask for include_usage), n 1 or 2, one or two prompts (completions), the base model or
one of 8 adapters (a0-a4 HydraLoRA K 2-4, a5-a7 plain LoRA), greedy or temperature 0.8 with a seed
from a small set, max_tokens 2-16, ignore_eos or not. About a third of the requests hang up at a
random moment (streams after a random number of chunks, whole answers by a read timeout). One
request in six is sent as a pair, streamed and not, same body, one after the other. An admin loop
acts every 0.5 s in a 4-step cycle: unload the "victim" ai (clients are using it: they get 404 until
it is back, counted as "gone", not lost), load ai again from the same directory, load a spare sj,
unload sj (the victim and spare rotate).

Pass criteria (all printed as figures; exit status 1 on any miss):
  lost = 0      every request that was not cancelled is whole: HTTP 200 (or 404 for the victim
                while unloaded: "gone"); a whole answer has every choice with a finish_reason
                (stop/length) and text; a stream parses chunk by chunk, gives every choice one
                finish_reason, its usage chunk, then `data: [DONE]`; usage.completion_tokens is
                n x max_tokens when ignore_eos and no cancel. Client threads must all return.
  garbled = 0   same body (model, prompt, n, max_tokens, seed or greedy; streamed or not) -> same
                texts and token counts, over the whole run (the pairs guarantee samples; requests
                that repeat a body by chance count too). Adapters are always reloaded from the same
                directory, so a name keeps its weights.
  admin = 0     admin calls that failed (every load and unload must answer 200).
  sanitizer = 0 ASan/UBSan/LSan reports: files under the run directory (ASAN_OPTIONS and
                UBSAN_OPTIONS log_path) and "ERROR: AddressSanitizer", "runtime error:",
                "ERROR: LeakSanitizer" in the server's stderr; LSan runs at exit (detect_leaks=1).
  exit = 0      SIGTERM after the run: the server drains and exits 0.
  kv idle = 0   hydrad_kv_blocks_used (server/metrics.c; cached prefix blocks are counted apart in
                hydrad_kv_blocks_cached) and vllm:num_requests_running/waiting back to 0 within
                30 s once the clients stop.
  rss           VmRSS growth after warm-up (the first third of the run, at most 10 min): VmRSS is
                read every second from /proc/PID/status; the samples after warm-up are cut in
                two halves and the growth is median(second) - median(first), over the time
                between the halves' centres. Medians, not a fitted slope: VmRSS swings by +-15 MB
                from second to second (adapter loads, a 32-sequence batch's buffers, ASan's
                allocator), which moves a least-squares slope over 2 minutes by tens of MB / 10
                min (printed for information). Full soak: under 1.0 MB / 10 min. Short run
                (--short): its halves are 60 s apart, where 1 MB / 10 min is 0.1 MB, and the
                medians of two clean 180-s runs on the loaded VM moved by +4 and -16 MB (ASan's
                allocator gives free pages back to the system every 5 s, so VmRSS follows the
                live heap, which follows the work in flight); it allows 24 MB between its halves.
                That catches only a gross leak (~400 KB per request or ~200 KB per admin call at
                the ~1 request and 2 admin calls a second of the loaded VM: a leaked adapter copy
                or KV pool, not a leaked string); the full soak's 1 MB / 10 min is the real RSS
                check, and LSan at exit catches unreachable leaks of any size in both. Two things
                grow VmRSS for a while without leaking, so both are sized to be full within
                warm-up: the KV cache (the allocator hands out never-used
                blocks before it evicts cached prefixes, so its pages are touched one block at
                a time until every block has been used once: the default 728 blocks took more
                than 3 minutes here, 192 blocks more than 2; --kv-blocks 96 (1536 tokens, room
                for ~20 of the 32 clients' sequences at once, so KV-full admission waits and
                preemption are part of the load) fills in well under a minute) and ASan's
                quarantine of freed memory (quarantine_size_mb=16; the default 256 MB would take
                many minutes to fill).
  latency       p99 end-to-end latency of the requests started in the last 10 % of the run within
                1.2x of those started in the first 10 % (whole requests only; cancelled ones
                excluded). The short run instead compares per-token latency (end-to-end latency /
                tokens per choice: max_tokens is drawn from 2-16, so end-to-end latency mixes
                sizes) at p90 over the first and last 25 %, limit 2x: on the shared 2-core VM
                (load 12-15 from other jobs) the server gets about a third of a core and
                completes ~0.7 requests a second, so a 10 % window holds ~10-35 requests (p99 is
                then their maximum), and a request's time is mostly its wait for admission
                (adapter device slots, KV blocks), which varies a lot with the random mix: four
                clean runs gave p90 ratios 0.36, 0.72, 0.80 and 1.11. The figures of the
                full criterion and the server's CPU seconds per token (a slowdown of the server
                itself raises it; another job's load does not) are printed beside it. The first
                window holds the start-up burst (32 requests at once) and the last one's requests
                finish while the clients stop, so the criterion catches a server that slows down
                by itself (growing lists, fragmentation, stuck sequences), not a small drift.

Usage: python tests/soak/soak.py --bin tests/soak/bin/hydrad [--model M] [--seconds S] [--short]
       [--clients 32] [--run-dir DIR] [--seed 1]
The run directory (default tests/soak/runs/<time>) keeps the server log, sanitizer logs, the
samples (samples.jsonl) and the per-request records (requests.jsonl).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVED = "base"
ADMIN_KEY = "soak-admin"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "List three uses of copper and explain each one in a sentence.",
    "Water boils at a temperature of",
    "Translate to French: the cat sleeps on the warm windowsill all afternoon.",
    "In the year 1492,",
]
SEEDS = [1, 2, 3]
MAX_TOKENS = [2, 4, 8, 12, 16]
# (name, K, r, targets): K 0 is plain PEFT LoRA
ADAPTERS = [("a0", 2, 4, "q_proj,v_proj"), ("a1", 3, 8, "q_proj,k_proj,v_proj,o_proj"),
            ("a2", 4, 4, "gate_proj,up_proj,down_proj"), ("a3", 2, 8, "o_proj,down_proj"),
            ("a4", 3, 4, "q_proj,v_proj,gate_proj"), ("a5", 0, 8, "q_proj,v_proj"),
            ("a6", 0, 4, "k_proj,o_proj,up_proj"), ("a7", 0, 16, "v_proj")]
SPARES = [("s0", 2, 4, "q_proj"), ("s1", 0, 4, "v_proj"), ("s2", 4, 8, "q_proj,v_proj"),
          ("s3", 0, 8, "down_proj")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    """The q-quantile (0..1) of xs, nearest rank; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs) + 0.5)) - 1))]


def slope(ts, ys):
    """Least-squares slope dy/dt; 0 with fewer than two points."""
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else 0.0


class Soak:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.records = []          # one dict per request (see client())
        self.problems = []         # (kind, detail): lost / garbled / admin
        self.texts = {}            # body key -> (texts, completion_tokens, first request id)
        self.inflight = {}         # model -> requests in flight
        self.gone = {}             # adapter name -> [[unload sent, reload answered or None], ...]
        self.admin_ops = {"load": 0, "unload": 0, "unload_in_use": 0}
        self.samples = []
        self.next_id = 0

    # ---- set-up -----------------------------------------------------------------------------
    def env(self):
        e = dict(os.environ)
        # log_path: every report lands in a file of the run directory (checked at the end);
        # quarantine 16 MB: see the header (rss)
        e["ASAN_OPTIONS"] = (f"log_path={self.run}/asan:detect_leaks=1:quarantine_size_mb=16:"
                             "abort_on_error=0:print_summary=1")
        e["UBSAN_OPTIONS"] = f"log_path={self.run}/ubsan:print_stacktrace=1:halt_on_error=1"
        e["LSAN_OPTIONS"] = f"log_path={self.run}/lsan"
        return e

    def make_adapters(self):
        self.root = os.path.join(self.run, "adapters")
        self.dirs = {}
        os.makedirs(self.root, exist_ok=True)
        for i, (name, K, r, targets) in enumerate(ADAPTERS + SPARES):
            d = os.path.join(self.root, name)
            p = subprocess.run([self.a.bin, "mkadapter", "--out", d, "--base", self.a.model, "--seed", str(500 + i),
                                "--r", str(r), "--K", str(K), "--targets", targets, "--ratio", "1.0"],
                               capture_output=True, text=True, timeout=300, env=self.env())
            if p.returncode != 0:
                sys.exit(f"mkadapter {name} failed: {p.stderr}")
            self.dirs[name] = d

    def start_server(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [self.a.bin, "serve", "-m", self.a.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", SERVED, "--threads", str(self.a.threads), "--http-threads", "4",
               "--max-seqs", "32", "--max-batch-tokens", "256", "--kv-blocks", str(self.a.kv_blocks),
               "--adapter-root", self.root,
               "--admin-key", ADMIN_KEY, "--drain-timeout", "60"]
        for name, *_ in ADAPTERS:
            cmd += ["--adapter", f"{name}={self.dirs[name]}"]
        self.log_path = os.path.join(self.run, "hydrad.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"hydrad serve exited with {self.proc.returncode}:\n{self.log.read()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.proc.kill()
        sys.exit("hydrad serve did not become healthy in 180 s")

    # ---- clients ----------------------------------------------------------------------------
    def draw(self, rng):
        """A random request: (path, body, stream, cancel_after_s or None)."""
        chat = rng.random() < 0.5
        model = rng.choice([SERVED] + [n for n, *_ in ADAPTERS])
        n = 2 if rng.random() < 0.25 else 1
        body = {"model": model, "max_tokens": rng.choice(MAX_TOKENS), "n": n}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.choice(SEEDS))
        if rng.random() < 0.5:
            body["ignore_eos"] = True
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        elif rng.random() < 0.2:
            body["prompt"] = rng.sample(PROMPTS, 2)
        else:
            body["prompt"] = rng.choice(PROMPTS)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return path, body

    @staticmethod
    def key(path, body):
        return json.dumps([path, {k: v for k, v in body.items() if k not in ("stream", "stream_options")}],
                          sort_keys=True)

    def send(self, rid, path, body, stream, cancel):
        """One request; returns its record. cancel: seconds after which the client hangs up (None:
        never)."""
        rec = {"id": rid, "path": path, "model": body["model"], "stream": stream, "n": body["n"],
               "max_tokens": body["max_tokens"], "cancel": cancel is not None, "t0": time.time() - self.t_start}
        b = dict(body)
        if stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        with self.lock:
            self.inflight[body["model"]] = self.inflight.get(body["model"], 0) + 1
        t0 = time.time()
        try:
            if stream:
                self.do_stream(path, b, cancel, rec, t0)
            else:
                self.do_whole(path, b, cancel, rec, t0)
        except (requests.ConnectionError, requests.Timeout, socket.timeout) as e:
            if cancel is not None and time.time() - t0 >= cancel - 0.01:
                rec["outcome"] = "cancelled"
            else:
                rec["outcome"] = "lost"
                rec["why"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            with self.lock:
                self.inflight[body["model"]] -= 1
        rec["lat"] = time.time() - t0
        return rec

    def was_gone(self, model, t0):
        """Whether the admin loop had `model` unloaded at some moment since t0 (time.time())."""
        with self.lock:
            return any(s <= time.time() and (e is None or e >= t0) for s, e in self.gone.get(model, []))

    def check_status(self, r, rec, body, t0):
        if r.status_code == 200:
            return True
        if r.status_code == 404 and self.was_gone(body["model"], t0):
            rec["outcome"] = "gone"  # the victim, unloaded by the admin loop before this one started
        else:
            rec["outcome"] = "lost"
            rec["why"] = f"HTTP {r.status_code}: {r.text[:300]}"
        return False

    def do_whole(self, path, b, cancel, rec, t0):
        timeout = (30, max(0.05, cancel) if cancel is not None else 600)
        r = requests.post(self.url + path, json=b, timeout=timeout)
        if not self.check_status(r, rec, b, t0):
            return
        try:
            j = r.json()
        except ValueError:
            rec.update(outcome="lost", why=f"not JSON: {r.text[:200]}")
            return
        texts, fins = {}, {}
        for c in j.get("choices", []):
            t = c["message"]["content"] if "message" in c else c.get("text")
            texts[c["index"]] = t
            fins[c["index"]] = c.get("finish_reason")
        self.finish(rec, b, texts, fins, (j.get("usage") or {}).get("completion_tokens"), t0)

    def do_stream(self, path, b, cancel, rec, t0):
        timeout = (30, max(0.05, cancel) if cancel is not None else 600)
        with requests.post(self.url + path, json=b, timeout=timeout, stream=True) as r:
            if not self.check_status(r, rec, b, t0):
                return
            texts, fins, usage, done, bad = {}, {}, None, False, None
            for line in r.iter_lines():
                if cancel is not None and time.time() - t0 >= cancel:
                    rec["outcome"] = "cancelled"
                    return  # leaving the with block closes the connection
                if not line:
                    continue
                if not line.startswith(b"data: "):
                    bad = f"not an SSE data line: {line[:100]!r}"
                    break
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                if done:
                    bad = "data after [DONE]"
                    break
                try:
                    ch = json.loads(data)
                except ValueError:
                    bad = f"chunk not JSON: {data[:100]!r}"
                    break
                if "error" in ch:
                    bad = f"error event: {data[:300]!r}"
                    break
                if rec.get("ttft") is None:
                    rec["ttft"] = time.time() - t0
                for c in ch.get("choices") or []:
                    i = c["index"]
                    if i in fins:
                        bad = f"chunk for choice {i} after its finish_reason"
                        break
                    piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                    texts[i] = texts.get(i, "") + (piece or "")
                    if c.get("finish_reason"):
                        fins[i] = c["finish_reason"]
                if ch.get("usage"):
                    usage = ch["usage"].get("completion_tokens")
            if bad is None and not done:
                bad = "stream ended without [DONE]"
            if bad is None and usage is None:
                bad = "no usage chunk"
            if bad:
                rec.update(outcome="lost", why=bad)
                return
            self.finish(rec, b, texts, fins, usage, t0)

    def finish(self, rec, b, texts, fins, ctoks, t0):
        """Check a whole answer (streamed or not) and compare it with earlier answers to the same body."""
        rec["lat"] = time.time() - t0
        want = b["n"] * (len(b["prompt"]) if isinstance(b.get("prompt"), list) else 1)
        why = None
        if sorted(texts) != list(range(want)):
            why = f"choices {sorted(texts)}, want {want}"
        elif any(fins.get(i) not in ("stop", "length") for i in range(want)):
            why = f"finish_reasons {fins}"
        elif any(not isinstance(texts[i], str) for i in range(want)):
            why = "a choice without text"
        elif not isinstance(ctoks, int) or ctoks < 0:
            why = f"usage.completion_tokens {ctoks!r}"
        elif b.get("ignore_eos") and ctoks != want * b["max_tokens"]:
            why = f"completion_tokens {ctoks} != {want} x {b['max_tokens']} with ignore_eos"
        elif b.get("ignore_eos") and any(fins[i] != "length" for i in range(want)):
            why = f"finish_reasons {fins} with ignore_eos"
        elif b.get("ignore_eos") and any(texts[i] == "" for i in range(want)):
            why = "an empty text with ignore_eos"
        if why:
            rec.update(outcome="lost", why=why)
            return
        rec.update(outcome="ok", ctoks=ctoks, per_tok=rec["lat"] / max(1.0, ctoks / want))
        got = ([texts[i] for i in range(want)], ctoks)
        k = self.key(rec["path"], {k: v for k, v in b.items()})
        with self.lock:
            prev = self.texts.get(k)
            if prev is None:
                self.texts[k] = (got, rec["id"])
            else:
                rec["compared"] = True
                if prev[0] != got:
                    rec["outcome"] = "garbled"
                    rec["why"] = f"differs from request {prev[1]}: {got!r} vs {prev[0]!r}"[:600]

    def client(self, ci):
        rng = random.Random(self.a.seed * 1000 + ci)
        while not self.stop.is_set():
            path, body = self.draw(rng)
            pair = rng.random() < 1 / 6
            plan = [(True, None), (False, None)] if pair else [(rng.random() < 0.5, None)]
            if not pair and rng.random() < 1 / 3:
                # hang up at a random point: between 0 and a bit more than such a request takes here
                plan = [(plan[0][0], rng.uniform(0.0, 0.4 * body["max_tokens"]))]
            for stream, cancel in plan:
                with self.lock:
                    rid = self.next_id
                    self.next_id += 1
                rec = self.send(rid, path, body, stream, cancel)
                rec["pair"] = pair
                with self.lock:
                    self.records.append(rec)
                    if rec["outcome"] in ("lost", "garbled"):
                        self.problems.append((rec["outcome"], rec))

    # ---- admin loop ---------------------------------------------------------------------------
    def admin(self, path, body):
        try:
            r = requests.post(self.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              timeout=120)
            return r.status_code, r.text[:300]
        except requests.RequestException as e:
            return -1, str(e)[:300]

    def admin_loop(self):
        step = 0
        t_next = time.time()
        while not self.stop.is_set():
            cyc, phase = divmod(step, 4)
            victim = ADAPTERS[cyc % len(ADAPTERS)][0]
            spare = SPARES[cyc % len(SPARES)][0]
            if phase == 0:
                with self.lock:
                    in_use = self.inflight.get(victim, 0)
                    self.gone.setdefault(victim, []).append([time.time(), None])
                code, txt = self.admin("/v1/unload_lora_adapter", {"lora_name": victim})
                self.admin_ops["unload"] += 1
                self.admin_ops["unload_in_use"] += in_use > 0
            elif phase == 1:
                code, txt = self.admin("/v1/load_lora_adapter", {"lora_name": victim, "lora_path": self.dirs[victim]})
                self.admin_ops["load"] += 1
                if code == 200:
                    with self.lock:
                        self.gone[victim][-1][1] = time.time()
            elif phase == 2:
                code, txt = self.admin("/v1/load_lora_adapter", {"lora_name": spare, "lora_path": self.dirs[spare]})
                self.admin_ops["load"] += 1
            else:
                code, txt = self.admin("/v1/unload_lora_adapter", {"lora_name": spare})
                self.admin_ops["unload"] += 1
            if code != 200:
                with self.lock:
                    self.problems.append(("admin", {"step": step, "code": code, "text": txt}))
            step += 1
            t_next += 0.5
            self.stop.wait(max(0.0, t_next - time.time()))
        # leave every client adapter loaded (the victim of an unfinished cycle comes back)
        if step % 4 == 1:
            victim = ADAPTERS[(step // 4) % len(ADAPTERS)][0]
            code, txt = self.admin("/v1/load_lora_adapter", {"lora_name": victim, "lora_path": self.dirs[victim]})
            with self.lock:
                if code != 200:
                    self.problems.append(("admin", {"step": step, "code": code, "text": txt}))
                self.gone[victim][-1][1] = time.time()

    # ---- samples ------------------------------------------------------------------------------
    def metrics(self):
        t = requests.get(self.url + "/metrics", timeout=30).text
        out = {}
        for name in ("hydrad_kv_blocks_used", "hydrad_kv_blocks_cached", "vllm:num_requests_running",
                     "vllm:num_requests_waiting"):
            m = re.search(r"^" + re.escape(name) + r"(\{[^}]*\})? ([0-9.eE+-]+)$", t, re.M)
            out[name] = float(m.group(2)) if m else None
        return out

    def proc_status(self):
        st = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    st[k] = int(v.split()[0]) / 1024.0  # MB
        with open(f"/proc/{self.proc.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        st["cpu"] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        return st

    def sampler(self):
        while not self.stop.is_set():
            try:
                s = {"t": time.time() - self.t_start, "load": os.getloadavg()[0]}
                s.update(self.proc_status())
                s.update(self.metrics())
                self.samples.append(s)
            except (OSError, requests.RequestException, ValueError):
                pass
            self.stop.wait(1.0)

    # ---- the run ------------------------------------------------------------------------------
    def run_load(self):
        self.t_start = time.time()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.a.clients)]
        threads += [threading.Thread(target=self.sampler, daemon=True)]
        if not self.a.no_admin:
            threads.append(threading.Thread(target=self.admin_loop, daemon=True))
        for t in threads:
            t.start()
        last = 0
        while time.time() - self.t_start < self.a.seconds:
            time.sleep(1)
            el = time.time() - self.t_start
            if el - last >= self.a.progress:
                last = el
                with self.lock:
                    done = len(self.records)
                    bad = len(self.problems)
                s = self.samples[-1] if self.samples else {}
                print(f"  {el:6.0f} s  requests {done:5d}  problems {bad}  VmRSS {s.get('VmRSS', 0):.1f} MB  "
                      f"kv {s.get('hydrad_kv_blocks_used')}  load {os.getloadavg()[0]:.1f}", flush=True)
        self.t_end = time.time() - self.t_start
        self.stop.set()
        deadline = time.time() + self.a.drain
        for t in threads:
            t.join(max(0.1, deadline - time.time()))
        self.hung = sum(t.is_alive() for t in threads)

    def idle_check(self):
        """Seconds until KV blocks used and running/waiting requests are all 0 (None: not within 30 s)."""
        t0 = time.time()
        last = None
        while time.time() - t0 < 30:
            try:
                last = self.metrics()
                if (last["hydrad_kv_blocks_used"] == 0 and last["vllm:num_requests_running"] == 0
                        and last["vllm:num_requests_waiting"] == 0):
                    return time.time() - t0, last
            except requests.RequestException:
                pass
            time.sleep(0.2)
        return None, last

    def stop_server(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed after 120 s"

    def sanitizer_reports(self):
        files = [f for f in glob.glob(os.path.join(self.run, "*san*")) if os.path.isfile(f)]
        self.log.seek(0)
        text = self.log.read()
        hits = [ln for ln in text.splitlines()
                if "ERROR: AddressSanitizer" in ln or "runtime error:" in ln or "ERROR: LeakSanitizer" in ln]
        return files, hits

    def main(self):
        a = self.a
        self.run = os.path.abspath(a.run_dir or os.path.join(ROOT, "tests", "soak", "runs",
                                                             time.strftime("%Y%m%d-%H%M%S")))
        os.makedirs(self.run, exist_ok=True)
        print(f"soak: {a.seconds} s, {a.clients} clients, bin {a.bin}, run dir {self.run}", flush=True)
        t = self.t_wall = time.time()
        self.make_adapters()
        self.start_server()
        print(f"  adapters made and server healthy in {time.time() - t:.1f} s (pid {self.proc.pid})", flush=True)
        self.run_load()
        idle_s, idle_m = self.idle_check()
        code = self.stop_server()
        files, hits = self.sanitizer_reports()
        with open(os.path.join(self.run, "samples.jsonl"), "w") as f:
            for s in self.samples:
                f.write(json.dumps(s) + "\n")
        with open(os.path.join(self.run, "requests.jsonl"), "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        return self.report(idle_s, idle_m, code, files, hits)

    def cpu_at(self, t):
        """The server's CPU seconds at run time t, interpolated between samples."""
        ss = self.samples
        lo, hi = 0, len(ss) - 1
        if t <= ss[0]["t"]:
            return ss[0]["cpu"]
        if t >= ss[-1]["t"]:
            return ss[-1]["cpu"]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ss[mid]["t"] <= t:
                lo = mid
            else:
                hi = mid
        a, b = ss[lo], ss[hi]
        return a["cpu"] + (b["cpu"] - a["cpu"]) * (t - a["t"]) / max(1e-9, b["t"] - a["t"])

    def window(self, lo, hi, field):
        out = []
        for r in self.records:
            if r["outcome"] != "ok" or not lo <= r["t0"] < hi:
                continue
            if field == "cpu_tok":  # server CPU seconds spent while the request ran, per token per choice
                out.append((self.cpu_at(r["t0"] + r["lat"]) - self.cpu_at(r["t0"])) * r["per_tok"] / r["lat"])
            else:
                out.append(r[field])
        return out

    def report(self, idle_s, idle_m, code, files, hits):
        a, T = self.a, self.t_end
        out = {}
        by = {}
        for r in self.records:
            by[r["outcome"]] = by.get(r["outcome"], 0) + 1
        ok = by.get("ok", 0)
        compared = sum(1 for r in self.records if r.get("compared"))
        pairs = sum(1 for r in self.records if r.get("pair") and r.get("compared"))
        toks = sum(r.get("ctoks", 0) for r in self.records)
        streams = sum(1 for r in self.records if r["outcome"] == "ok" and r["stream"])
        print(f"\nsoak figures ({T:.0f} s of load, {a.clients} clients, load average "
              f"{statistics.fmean(s['load'] for s in self.samples):.1f} mean / "
              f"{max(s['load'] for s in self.samples):.1f} max over the run):")
        print(f"  requests {len(self.records)}: whole {ok} ({streams} streamed), cancelled {by.get('cancelled', 0)}, "
              f"gone (victim unloaded, 404) {by.get('gone', 0)}, lost {by.get('lost', 0)}, "
              f"garbled {by.get('garbled', 0)}; {toks} tokens")
        print(f"  same-body comparisons {compared} ({pairs} of them the second of a stream/whole pair)")
        print(f"  admin: {self.admin_ops['load']} loads, {self.admin_ops['unload']} unloads "
              f"({self.admin_ops['unload_in_use']} of an adapter with requests in flight), "
              f"{sum(1 for p in self.problems if p[0] == 'admin')} failed")
        out["lost"] = (by.get("lost", 0) + self.hung == 0, f"lost {by.get('lost', 0)}, hung client threads {self.hung}")
        out["garbled"] = (by.get("garbled", 0) == 0 and compared > 0,
                          f"garbled {by.get('garbled', 0)} of {compared} comparisons")
        nadmin = sum(1 for p in self.problems if p[0] == "admin")
        out["admin"] = (nadmin == 0, f"failed admin calls {nadmin}")
        out["sanitizer"] = (not files and not hits, f"report files {len(files)}, stderr lines {len(hits)}")
        out["exit"] = (code == 0, f"exit status on SIGTERM {code}")
        out["kv idle"] = (idle_s is not None,
                          f"KV blocks used, running, waiting 0 after {idle_s:.1f} s" if idle_s is not None
                          else f"not idle within 30 s: {idle_m}")
        # RSS after warm-up: the medians of the two halves of what follows it
        warm = min(T / 3, 600.0)
        pts = [(s["t"], s["VmRSS"], s["RssAnon"]) for s in self.samples if s["t"] >= warm and "VmRSS" in s]
        h1, h2 = pts[:len(pts) // 2], pts[len(pts) // 2:]
        gap = statistics.fmean(p[0] for p in h2) - statistics.fmean(p[0] for p in h1)
        grow = statistics.median(p[1] for p in h2) - statistics.median(p[1] for p in h1)
        grow_anon = statistics.median(p[2] for p in h2) - statistics.median(p[2] for p in h1)
        rate = grow / gap * 600
        fit = slope([p[0] for p in pts], [p[1] for p in pts]) * 600
        print(f"  VmRSS: {self.samples[0]['VmRSS']:.1f} MB at start, median {statistics.median(p[1] for p in h1):.1f} "
              f"in the first half after warm-up ({warm:.0f} s), {statistics.median(p[1] for p in h2):.1f} in the "
              f"second ({gap:.0f} s later): {grow:+.2f} MB = {rate:+.2f} MB / 10 min (RssAnon {grow_anon:+.2f} MB; "
              f"least-squares slope {fit:+.2f} MB / 10 min, range {min(p[1] for p in pts):.1f}-"
              f"{max(p[1] for p in pts):.1f})")
        if a.short:
            out["rss"] = (grow < 24.0, f"VmRSS growth {grow:+.2f} MB over {gap:.0f} s after warm-up, limit 24 MB")
        else:
            out["rss"] = (rate < 1.0, f"VmRSS growth {rate:+.2f} MB / 10 min after warm-up, limit 1.0")
        # latency windows
        for frac, q, field, lim_l, label in ((0.10, 0.99, "lat", 1.2, "e2e p99, 10 % windows"),
                                            (0.10, 0.99, "per_tok", 1.2, "per-token p99, 10 % windows"),
                                            (0.25, 0.90, "per_tok", 2.0, "per-token p90, 25 % windows"),
                                            (0.25, 0.90, "cpu_tok", 1.5, "server-CPU-time per token p90, 25 % windows")):
            w1, w2 = self.window(0, frac * T, field), self.window((1 - frac) * T, T + 1, field)
            p1, p2 = pct(w1, q), pct(w2, q)
            ratio = p2 / p1 if p1 and p2 else None
            cpu = self.cpu_per_token(frac, T)
            ms = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
            print(f"  latency {label}: first {ms(p1)} ({len(w1)} requests), last "
                  f"{ms(p2)} ({len(w2)}), ratio {ratio and round(ratio, 3)}; "
                  f"server CPU ms/token {cpu[0]:.1f} -> {cpu[1]:.1f}; load avg {cpu[2]:.1f} -> {cpu[3]:.1f}")
            crit = (field == "per_tok" and frac == 0.25) if a.short else (field == "lat")
            if crit:
                out["latency"] = (ratio is not None and ratio <= lim_l, f"{label}: ratio {ratio and round(ratio, 3)}, "
                                                                         f"limit {lim_l}")
        print("\npass criteria:")
        for k, (good, why) in out.items():
            print(f"  {'PASS' if good else 'FAIL'}  {k:10s} {why}")
        for kind, p in self.problems[:10]:
            print(f"  {kind}: {json.dumps(p)[:600]}")
        for f in files[:5]:
            print(f"  sanitizer report {f}:\n" + open(f, errors="replace").read()[:3000])
        for h in hits[:10]:
            print(f"  stderr: {h}")
        print(f"run dir: {self.run}; {time.time() - self.t_wall:.0f} s in all (adapters, start-up, load, drain, "
              "shut-down)")
        return 0 if all(g for g, _ in out.values()) else 1

    def cpu_per_token(self, frac, T):
        """(first, last) server CPU ms per generated token and mean load average in the windows."""
        res = []
        loads = []
        for lo, hi in ((0, frac * T), ((1 - frac) * T, T)):
            ss = [s for s in self.samples if lo <= s["t"] <= hi and "cpu" in s]
            toks = sum(r.get("ctoks", 0) for r in self.records if r["outcome"] == "ok" and lo <= r["t0"] < hi)
            res.append((ss[-1]["cpu"] - ss[0]["cpu"]) * 1000 / toks if len(ss) > 1 and toks else 0.0)
            loads.append(statistics.fmean(s["load"] for s in ss) if ss else 0.0)
        return res[0], res[1], loads[0], loads[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default=os.path.join(ROOT, "tests", "soak", "bin", "hydrad"))
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--seconds", type=float, default=3600)
    p.add_argument("--short", action="store_true", help="the 180-s criteria (header: rss, latency)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="the server's compute threads")
    p.add_argument("--drain", type=float, default=120, help="seconds the clients get to finish at the end")
    p.add_argument("--progress", type=float, default=30, help="seconds between progress lines")
    p.add_argument("--kv-blocks", type=int, default=96, help="the server's KV cache in blocks of 16 tokens "
                   "(header: rss)")
    p.add_argument("--no-admin", action="store_true", help="no load/unload loop (to tell its effect apart)")
    p.add_argument("--run-dir")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    a.bin = os.path.abspath(a.bin)
    a.model = os.path.abspath(os.path.join(ROOT, a.model)) if not os.path.isabs(a.model) else a.model
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not built (make test-soak builds it)")
    sys.exit(Soak(a).main())


if __name__ == "__main__":
    main()
