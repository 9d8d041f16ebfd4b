#!/usr/bin/env bash
# bench_adapters.sh (make bench-adapters) - CPU decode cost of adapters through the real server and
# the load generator: 8 streams at --max-concurrency 8 with a fixed output length (ignore_eos), with
# no adapter, one adapter for all 8, and 8 different adapters in one batch (round robin); ratios
# to the no-adapter run, median of REPS interleaved runs. Appends to the results file.
# Env: MODEL, THREADS (nproc), REPS (2), OUT_LEN (64), IN_LEN (32), RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/bench_lib.sh
REPS=${REPS:-2}
OUT_LEN=${OUT_LEN:-64}
IN_LEN=${IN_LEN:-32}
CONC=8
PROMPTS=24 # three full batches of 8
ADIR=${ADAPTER_DIR:-bench/.cache/adapters}
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_adapters: $b missing (make)" >&2; exit 1; }; done
TMP=$(mktemp -d)
SRV=""
trap 'stop_pid "$SRV"; rm -rf "$TMP"' EXIT
mkdir -p "$ADIR"

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
bin/hydrad serve -m "$MODEL" --port "$PORT" --threads "$THREADS" --max-seqs "$CONC" \
    --adapter-root "$(realpath "$ADIR")" --max-loras 8 >"$TMP/server.log" 2>&1 &
SRV=$!
wait_http "$URL/health" "$SRV" || { cat "$TMP/server.log" >&2; exit 1; }

run() { # run NAME NUM_ADAPTERS REP
    local extra=()
    [ "$2" -gt 0 ] && extra=(--num-adapters "$2" --round-robin --make-adapters "$ADIR" --adapter-r 8 --adapter-K 3)
    bin/hydrad-bench serve --url "$URL" --num-prompts "$PROMPTS" --max-concurrency "$CONC" --input-len "$IN_LEN" \
        --output-len "$OUT_LEN" --seed "$3" --quiet --label "$1" --result-json "$TMP/$1-$3.json" "${extra[@]}" \
        >"$TMP/$1-$3.md"
}

LOAD0=$(loadavg)
echo "bench_adapters: $(cpu_model), $THREADS threads, load $LOAD0" >&2
# warm-up: makes and loads the adapters, faults in the model
run warm 8 0
for rep in $(seq "$REPS"); do
    for cfg in "none 0" "one 1" "eight 8"; do
        set -- $cfg
        run "$1" "$2" "$rep"
        echo "bench_adapters: rep $rep $1: $(jget "$TMP/$1-$rep.json" output_throughput) out tok/s, TPOT $(jget "$TMP/$1-$rep.json" mean_tpot_ms) ms" >&2
    done
done
LOAD1=$(loadavg)

decode_rate() { # aggregate decode tok/s of the batch: CONC streams, one token each per mean TPOT
    for rep in $(seq "$REPS"); do $PY -c "import json; j=json.load(open('$TMP/$1-$rep.json')); print($CONC*1000.0/j['mean_tpot_ms'])"; done | median
}
outtp() { for rep in $(seq "$REPS"); do jget "$TMP/$1-$rep.json" output_throughput; done | median; }
errors() { for rep in $(seq "$REPS"); do jget "$TMP/$1-$rep.json" failed; done | $PY -c 'import sys; print(int(sum(float(x) for x in sys.stdin.read().split())))'; }

results_init
{
    echo
    echo "## CPU adapters: decode with 0, 1 and 8 adapters in a batch of $CONC, $(date '+%Y-%m-%d %H:%M')"
    echo
    echo "$(cpu_model), $THREADS threads; $MODEL; \`hydrad serve --max-seqs $CONC\` and \`hydrad-bench serve"
    echo "--max-concurrency $CONC --num-prompts $PROMPTS --input-len $IN_LEN --output-len $OUT_LEN\` (ignore_eos); adapters"
    echo "made by \`hydrad mkadapter\` (r 8, K 3, q_proj+v_proj), round robin so a batch holds 8 different ones."
    echo "Median of $REPS interleaved runs; load average before $LOAD0, after $LOAD1."
    echo
    echo "| adapters in the batch | decode tok/s ($CONC x 1000 / mean TPOT ms) | ratio to none | output tok/s (with prefill) | ratio to none | failed requests |"
    echo "|---|---|---|---|---|---|"
    D0=$(decode_rate none)
    O0=$(outtp none)
    for cfg in none one eight; do
        D=$(decode_rate $cfg)
        O=$(outtp $cfg)
        name=$([ $cfg = none ] && echo "none (base model)" || ([ $cfg = one ] && echo "1 (same adapter x8)" || echo "8 different"))
        echo "| $name | $D | $(ratio "$D" "$D0") | $O | $(ratio "$O" "$O0") | $(errors $cfg) |"
    done
} | tee -a "$RESULTS"
echo "bench_adapters: appended to $RESULTS" >&2
