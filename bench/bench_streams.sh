#!/usr/bin/env bash
# bench_streams.sh - CPU decode speed at 1, 8, 16 and 32 concurrent streams (DESIGN.md section 7):
# hydrad serve against llama.cpp's llama-server (pinned, bench/build_llamacpp.sh) on the same GGUF
# and threads. For every concurrency level each server is started fresh on a free port, warmed up,
# given PER_STREAM x N streaming requests (hydrad-bench serve, closed loop, N in flight, short
# prompts, fixed-length outputs with ignore_eos) and stopped; hydrad and llama-server alternate
# level by level. Per-stream decode tok/s is 1000 / mean TPOT; aggregate is output tok/s over the
# run. With REPS > 1 every figure is the median of the interleaved repetitions. Appends a table to
# the results file. Env: MODEL, THREADS (nproc), STREAMS ("1 8 16 32"), PER_STREAM (3), IN_LEN (32),
# OUT_LEN (64), REPS (3), RESULTS (bench/results/<date>-<machine>.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/bench_lib.sh
STREAMS=${STREAMS:-1 8 16 32}
PER_STREAM=${PER_STREAM:-3}
IN_LEN=${IN_LEN:-32}
OUT_LEN=${OUT_LEN:-64}
REPS=${REPS:-3}
MAXS=0
for n in $STREAMS; do [ "$n" -gt "$MAXS" ] && MAXS=$n; done
# context per llama-server slot: the prompt (words are about one token each; leave room) + output
SLOT_CTX=$(( (IN_LEN * 2 + OUT_LEN + 63) / 64 * 64 ))
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_streams: $b missing (make)" >&2; exit 1; }; done
LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=bench/results/tmp/streams-$STAMP
mkdir -p "$WORK"
SRV=""
trap 'stop_pid "$SRV"' EXIT
T0=$(date +%s)

start_server() { # start_server ENGINE PORT: starts it in the background into SRV, waits for /health
    local engine=$1 port=$2
    if [ "$engine" = hydrad ]; then
        bin/hydrad serve -m "$MODEL" --port "$port" --threads "$THREADS" --max-seqs "$MAXS" \
            >>"$WORK/hydrad.log" 2>&1 &
    else
        "$LLAMA_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" -np "$MAXS" \
            -c $((MAXS * SLOT_CTX)) >>"$WORK/llama-server.log" 2>&1 &
    fi
    SRV=$!
    wait_http "http://127.0.0.1:$port/health" "$SRV" || { tail -20 "$WORK/$engine.log" >&2; exit 1; }
}

run_level() { # run_level ENGINE N REP: one fresh server, a warm-up, then the timed closed loop
    local engine=$1 n=$2 rep=$3 port url out
    port=$(free_port)
    url="http://127.0.0.1:$port"
    start_server "$engine" "$port"
    # warm-up (its own seed, so no timed prompt is already cached by either server)
    bin/hydrad-bench serve --url "$url" --num-prompts 2 --max-concurrency 2 --input-len 8 --output-len 4 \
        --seed 9999 --quiet >/dev/null || true
    out="$WORK/$engine-$n-$rep"
    # the seed follows the level and repetition: both engines get the same prompts at a level
    bin/hydrad-bench serve --url "$url" --max-concurrency "$n" --num-prompts $((PER_STREAM * n)) \
        --input-len "$IN_LEN" --output-len "$OUT_LEN" --seed $((n * 100 + rep)) --quiet \
        --label "$engine x$n" --result-json "$out.json" >"$out.md" ||
        echo "bench_streams: $engine x$n had failed requests (see $out.md)" >&2
    echo "$engine $n $rep $(loadavg | cut -d' ' -f1)" >>"$WORK/loads.txt"
    stop_pid "$SRV"
    SRV=""
    echo "bench_streams: [$(( $(date +%s) - T0 ))s] $engine x$n rep $rep: mean TPOT $(jget "$out.json" mean_tpot_ms) ms," \
        "$(jget "$out.json" output_throughput) out tok/s, failed $(jget "$out.json" failed)" >&2
}

LOAD0=$(loadavg)
echo "bench_streams: $(cpu_model), $(cpu_cores) cores, $THREADS threads, model $MODEL, load $LOAD0" >&2
for rep in $(seq "$REPS"); do
    for n in $STREAMS; do
        # alternate which engine goes first, so neither always runs on the warmer machine
        if [ $(( (rep + n) % 2 )) -eq 0 ]; then order="hydrad llama-server"; else order="llama-server hydrad"; fi
        for engine in $order; do run_level "$engine" "$n" "$rep"; done
    done
done
LOAD1=$(loadavg)

results_init
$PY - "$WORK" "$STREAMS" "$REPS" <<'PY' >"$WORK/table.md"
import json, os, statistics, sys
work, streams, reps = sys.argv[1], [int(x) for x in sys.argv[2].split()], int(sys.argv[3])
loads = {}
for line in open(os.path.join(work, "loads.txt")):
    e, n, r, a = line.split()
    loads.setdefault((e, int(n)), []).append(a)
def runs(engine, n):
    out = []
    for r in range(1, reps + 1):
        p = os.path.join(work, f"{engine}-{n}-{r}.json")
        if os.path.exists(p):
            out.append(json.load(open(p)))
    return out
def med(js, f):
    v = [f(j) for j in js]
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")
per_stream = lambda j: 1000.0 / j["mean_tpot_ms"] if j["mean_tpot_ms"] else float("nan")
aggregate = lambda j: j["output_throughput"]
rat = lambda a, b: a / b if b == b and b > 0 else float("nan")
print("| streams | decode tok/s per stream: hydrad | llama.cpp | **hydrad / llama.cpp** "
      "| aggregate out tok/s: hydrad | llama.cpp | **hydrad / llama.cpp** | done/failed hydrad, llama.cpp | load 1m |")
print("|---|---|---|---|---|---|---|---|---|")
for n in streams:
    hy, ll = runs("hydrad", n), runs("llama-server", n)
    hs, ls, ha, la = med(hy, per_stream), med(ll, per_stream), med(hy, aggregate), med(ll, aggregate)
    df = lambda js: "%d/%d" % (sum(j["completed"] for j in js), sum(j["failed"] for j in js))
    ld = " ".join(loads.get(("hydrad", n), []) + loads.get(("llama-server", n), []))
    print(f"| {n} | {hs:.1f} | {ls:.1f} | **{rat(hs, ls):.2f}** | {ha:.1f} | {la:.1f} | **{rat(ha, la):.2f}** "
          f"| {df(hy)}, {df(ll)} | {ld} |")
PY

{
    echo
    echo "## CPU decode at concurrent streams: hydrad vs llama.cpp, $(date '+%Y-%m-%d %H:%M') ($(( $(date +%s) - T0 )) s)"
    echo
    echo "$(cpu_model), $(cpu_cores) cores, $THREADS threads; $MODEL. For each level N, each server is started fresh,"
    echo "warmed up, and sent $PER_STREAM x N streaming /v1/completions requests by \`hydrad-bench serve\` with N in flight"
    echo "(closed loop); prompts of $IN_LEN words (about one token each, same prompts for both servers), $OUT_LEN output"
    echo "tokens (ignore_eos, greedy). hydrad serve --max-seqs $MAXS; llama-server -np $MAXS -c $((MAXS * SLOT_CTX))"
    echo "(llama-cpp-python 0.3.36's llama.cpp). The two alternate level by level; $([ "$REPS" -gt 1 ] && echo "median of $REPS repetitions" || echo "one run per cell")."
    echo "Per-stream decode tok/s = 1000 / mean TPOT; aggregate = output tokens / run time (prefill included)."
    peer_build
    echo "Load average before $LOAD0, after $LOAD1; the last column is the 1-minute load after each run,"
    echo "hydrad's runs first, then llama-server's (the machine is shared)."
    echo
    cat "$WORK/table.md"
} | tee -a "$RESULTS"
echo "bench_streams: appended to $RESULTS; raw JSON in $WORK" >&2
