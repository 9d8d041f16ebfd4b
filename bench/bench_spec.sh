#!/usr/bin/env bash
# bench_spec.sh - speculative decoding (prompt lookup) on the CPU (issue 20): decode tok/s with
# --speculative ngram vs none, the default model with one adapter (r 8, K 3, q/v; hydrad mkadapter,
# ratio 0.05), at 1 and 8 streams, on a copy-heavy workload (spelling correction of a ~200-token
# paragraph, a list reformatted as JSON, a code edit) and on open-ended chat (bench/spec_bench.py);
# then llama.cpp's prompt-lookup decoding (llama-lookup, same GGUF, threads and draft length) on the
# copy-heavy prompts at 1 stream against hydrad on the base model. Targets: >= 1.8x at 1 stream on
# copy, >= 0.97x on chat. Both servers stay up and are asked in turn (one idles while the other
# runs), REPS times per cell; the table gives medians (this VM's single-stream speed drifts by
# +-25 % from minute to minute, so only interleaved pairs compare).
# Env: MODEL, THREADS (nproc), DRAFT (4), MAX_TOKENS (256), ROUNDS (1), REPS (3), RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
OWN_RESULTS=${RESULTS:-}
source bench/bench_lib.sh
DRAFT=${DRAFT:-4}
MAX_TOKENS=${MAX_TOKENS:-256}
ROUNDS=${ROUNDS:-1}
REPS=${REPS:-3}
[ -n "$OWN_RESULTS" ] || RESULTS=${RESULTS%.md}-spec.md
for b in bin/hydrad; do [ -x "$b" ] || { echo "bench_spec: $b missing (make)" >&2; exit 1; }; done
WORK=$(mktemp -d)
declare -A SRV URL
trap 'stop_pid "${SRV[none]:-}"; stop_pid "${SRV[ngram]:-}"; rm -rf "$WORK"' EXIT
bin/hydrad mkadapter --base "$MODEL" --out "$WORK/ad" --seed 11 --r 8 --K 3 --targets q_proj,v_proj --ratio 0.05 \
    >/dev/null 2>&1

# serve MODE: a server with the adapter, speculation MODE (ngram|none)
serve() {
    local port
    port=$(free_port)
    bin/hydrad serve -m "$MODEL" --port "$port" --threads "$THREADS" --served-model-name base --adapter "ad=$WORK/ad" \
        --speculative "$1" --spec-max-draft "$DRAFT" --max-seqs 16 >"$WORK/srv-$1.log" 2>&1 &
    SRV[$1]=$!
    wait_http "http://127.0.0.1:$port/health" "${SRV[$1]}" || { cat "$WORK/srv-$1.log" >&2; exit 1; }
    URL[$1]="http://127.0.0.1:$port"
}

results_init
echo "bench_spec: $(cpu_model), $THREADS threads, draft $DRAFT, $REPS interleaved reps, load $(loadavg)" >&2
serve none
serve ngram
for r in $(seq "$REPS"); do
    for w in copy chat; do
        for n in 1 8; do
            for mode in none ngram; do
                echo "bench_spec: rep $r, $mode $w $n stream(s)" >&2
                $PY bench/spec_bench.py --url "${URL[$mode]}" --model ad --workload "$w" --streams "$n" \
                    --rounds "$ROUNDS" --max-tokens "$MAX_TOKENS" >"$WORK/$mode-$w-$n-$r.json"
            done
        done
    done
done
$PY bench/spec_bench.py --url "${URL[ngram]}" --model base --workload copy --streams 1 --max-tokens "$MAX_TOKENS" \
    >"$WORK/base-copy.json"
stop_pid "${SRV[none]}"
stop_pid "${SRV[ngram]}"

# llama.cpp's prompt lookup on the copy prompts (chat template applied as hydrad applies it)
PEER=""
if LLAMA_BIN=$(bash bench/build_llamacpp.sh 2>"$WORK/peer.log" | tail -1) && [ -x "$LLAMA_BIN/llama-lookup" ]; then
    $PY - "$LLAMA_BIN/llama-lookup" "$MODEL" "$THREADS" "$DRAFT" "$MAX_TOKENS" >"$WORK/peer.json" <<'EOF' || true
import json, re, subprocess, sys
sys.path.insert(0, "bench")
import spec_bench
exe, model, threads, draft, n = sys.argv[1:]
tok = sec = acc = drafted = 0.0
for p in spec_bench.WORKLOADS["copy"]:
    text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
    out = subprocess.run([exe, "-m", model, "-p", text, "-n", n, "--temp", "0", "-t", threads,
                          "--spec-draft-n-max", draft], capture_output=True, text=True, timeout=600).stderr
    m = re.search(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds", out)
    tok, sec = tok + float(m.group(1)), sec + float(m.group(2))
    drafted += float(re.search(r"n_drafted\s+=\s+(\d+)", out).group(1))
    acc += float(re.search(r"n_accept\s+=\s+(\d+)", out).group(1))
print(json.dumps({"decode_tok_s": tok / sec, "acceptance": acc / max(1.0, drafted)}))
EOF
    [ -s "$WORK/peer.json" ] && PEER="$LLAMA_BIN"
fi

row() { # workload streams: medians over the reps; the ratio of each interleaved pair in brackets
    $PY - "$WORK" "$1" "$2" "$REPS" <<'EOF'
import json, statistics, sys
work, w, n, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
get = lambda m, r: json.load(open(f"{work}/{m}-{w}-{n}-{r}.json"))
off = [get("none", r)["decode_tok_s"] for r in range(1, reps + 1)]
on = [get("ngram", r)["decode_tok_s"] for r in range(1, reps + 1)]
acc = [get("ngram", r)["acceptance"] for r in range(1, reps + 1)]
pairs = ", ".join("%.2f" % (b / a) for a, b in zip(off, on))
print(f"| {w} | {n} | {statistics.median(off):.1f} | {statistics.median(on):.1f} | "
      f"**{statistics.median([b / a for a, b in zip(off, on)]):.2f}x** ({pairs}) | {statistics.median(acc):.2f} |")
EOF
}
{
    echo
    echo "## Speculative decoding (\`bash bench/bench_spec.sh\`), $(date -u +%H:%M) UTC, load $(loadavg)"
    echo
    echo "$(cpu_model), $THREADS threads, hydrad $(git rev-parse --short HEAD); prompt lookup, drafts of up to $DRAFT"
    echo "tokens; greedy chat completions of up to $MAX_TOKENS tokens through one adapter (r 8, K 3, q/v); decode"
    echo "tok/s = tokens after each answer's first over the time after its first token (bench/spec_bench.py)."
    echo
    echo "Medians of $REPS interleaved reps (none, then ngram, cell by cell); the ratio is the median of the"
    echo "reps' ratios, each rep's in brackets."
    echo
    echo "| workload | streams | none tok/s | ngram tok/s | ratio | acceptance |"
    echo "|---|---|---|---|---|---|"
    row copy 1; row copy 8; row chat 1; row chat 8
    echo
    echo "Targets: copy at 1 stream >= 1.8x; chat >= 0.97x."
    if [ -n "$PEER" ]; then
        echo "llama.cpp llama-lookup (same GGUF, $THREADS threads, draft $DRAFT, base model, copy prompts, 1 stream):"
        echo "$(jget "$WORK/peer.json" decode_tok_s) tok/s, acceptance $(jget "$WORK/peer.json" acceptance); hydrad ngram on the base"
        echo "model: $(jget "$WORK/base-copy.json" decode_tok_s) tok/s, acceptance $(jget "$WORK/base-copy.json" acceptance):"
        echo "$(ratio "$(jget "$WORK/base-copy.json" decode_tok_s)" "$(jget "$WORK/peer.json" decode_tok_s)")x. $(peer_build)"
    else
        echo "llama.cpp's llama-lookup was not run (no build; see bench/build_llamacpp.sh)."
    fi
} | tee -a "$RESULTS"
