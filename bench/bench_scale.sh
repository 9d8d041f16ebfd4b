#!/usr/bin/env bash
# bench_scale.sh - adapters at scale on the CPU (issue 18): N adapters (default 2,000; r 8, K 3,
# q/v, fp16) written to disk once, loaded on first use through --adapter-resolver while requests
# arrive as a Poisson process and pick adapters by Zipf(1.1); against the same load on 1 adapter.
# Prints throughput, TTFT p50/p99 warm and cold (a request's first use of its adapter), first-use
# load latency from /metrics, evictions, and the ratios to the 1-adapter run; then the engine's
# step-time p99 while adapters load vs while loaded ones are used (bench/load_steps.py).
# Env: MODEL, THREADS (nproc), ADAPTERS (2000), RATE (2 req/s), DURATION (60 s), IN_LEN (64),
#      OUT_LEN (32), ZIPF (1.1), MAX_LORAS (8), MAX_CPU_LORAS (256), STEP_WINDOW (30 s), RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
OWN_RESULTS=${RESULTS:-}
source bench/bench_lib.sh
ADAPTERS=${ADAPTERS:-2000}
RATE=${RATE:-2}
DURATION=${DURATION:-60}
IN_LEN=${IN_LEN:-64}
OUT_LEN=${OUT_LEN:-32}
ZIPF=${ZIPF:-1.1}
MAX_LORAS=${MAX_LORAS:-8}
MAX_CPU_LORAS=${MAX_CPU_LORAS:-256}
[ -n "$OWN_RESULTS" ] || RESULTS=${RESULTS%.md}-scale.md
STORE=bench/.cache/scale-adapters
SUB="$STORE/r8-K3-q_proj,v_proj"
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_scale: $b missing (make)" >&2; exit 1; }; done
WORK=$(mktemp -d)
SRV=""
trap 'stop_pid "$SRV"; rm -rf "$WORK"' EXIT
mkdir -p "$SUB"

# run LABEL N_ADAPTERS: a fresh server (nothing loaded), one load-generator run
run() {
    local label=$1 n=$2 port
    port=$(free_port)
    bin/hydrad serve -m "$MODEL" --port "$port" --threads "$THREADS" --served-model-name base \
        --adapter-resolver "$SUB" --max-loras "$MAX_LORAS" --max-cpu-loras "$MAX_CPU_LORAS" --max-seqs 32 \
        >"$WORK/$label.log" 2>&1 &
    SRV=$!
    wait_http "http://127.0.0.1:$port/health" "$SRV" || { cat "$WORK/$label.log" >&2; exit 1; }
    bin/hydrad-bench serve --url "http://127.0.0.1:$port" --make-adapters "$STORE" --first-use --num-adapters "$n" \
        --adapter-dist "zipf:$ZIPF" --request-rate "$RATE" --duration "$DURATION" --num-prompts $((RATE * DURATION * 2)) \
        --input-len "$IN_LEN" --output-len "$OUT_LEN" --seed 5 --label "$label" --result-json "$WORK/$label.json" \
        >"$WORK/$label.md" || echo "bench_scale: $label had failed requests" >&2
    curl -s "http://127.0.0.1:$port/metrics" >"$WORK/$label.metrics"
    stop_pid "$SRV"
    SRV=""
}
metric() { awk -v m="$1" '$1 == m {print $2}' "$2"; }

# steps: the engine's step-time p99 while 20 first-use loads run vs while 20 loaded adapters are
# asked the same (bench/load_steps.py), 8 base-model streams decoding throughout
steps() {
    local port
    port=$(free_port)
    bin/hydrad serve -m "$MODEL" --port "$port" --threads "$THREADS" --served-model-name base \
        --adapter-resolver "$SUB" --max-loras 24 --max-cpu-loras "$MAX_CPU_LORAS" --max-seqs 32 \
        >"$WORK/steps.log" 2>&1 &
    SRV=$!
    wait_http "http://127.0.0.1:$port/health" "$SRV" || { cat "$WORK/steps.log" >&2; exit 1; }
    $PY bench/load_steps.py --url "http://127.0.0.1:$port" --window "${STEP_WINDOW:-30}" >"$WORK/steps.json"
    stop_pid "$SRV"
    SRV=""
}

results_init
echo "bench_scale: $(cpu_model), $THREADS threads, $ADAPTERS adapters, $RATE req/s for $DURATION s, load $(loadavg)" >&2
run one 1
run many "$ADAPTERS"
steps
one_thr=$(jget "$WORK/one.json" output_throughput)
many_thr=$(jget "$WORK/many.json" output_throughput)
loads=$(metric hydrad_adapter_first_use_loads_total "$WORK/many.metrics")
evict=$(metric hydrad_adapter_evictions_total "$WORK/many.metrics")
lsum=$(metric hydrad_adapter_load_seconds_sum "$WORK/many.metrics")
{
    echo
    echo "## Adapters at scale (\`bash bench/bench_scale.sh\`), $(date -u +%H:%M) UTC, load $(loadavg)"
    echo
    echo "$(cpu_model), $THREADS threads, hydrad $(git rev-parse --short HEAD); r 8, K 3, q/v, fp16 adapters loaded on"
    echo "first use (--adapter-resolver), Zipf $ZIPF over $ADAPTERS adapters vs 1 adapter; Poisson $RATE req/s for $DURATION s,"
    echo "~$IN_LEN-token prompts, $OUT_LEN tokens out; --max-loras $MAX_LORAS, --max-cpu-loras $MAX_CPU_LORAS."
    echo
    echo "| run | output tok/s | TTFT p50 | TTFT p99 | warm p99 | cold p50 | cold p99 (n) |"
    echo "|---|---|---|---|---|---|---|"
    for r in one many; do
        echo "| $r | $(jget "$WORK/$r.json" output_throughput) | $(jget "$WORK/$r.json" p50_ttft_ms) | $(jget "$WORK/$r.json" p99_ttft_ms) |" \
            "$(jget "$WORK/$r.json" p99_ttft_warm_ms) | $(jget "$WORK/$r.json" p50_ttft_cold_ms) | $(jget "$WORK/$r.json" p99_ttft_cold_ms) |"
    done
    echo
    echo "Throughput many / one: $(ratio "$many_thr" "$one_thr")x (target >= 0.9). First-use loads: $loads, mean load"
    echo "$($PY -c "print('%.1f' % (1e3 * float('${lsum:-0}') / max(1, float('${loads:-0}'))))") ms; evictions (host tier): $evict."
    echo
    echo "Engine step time with 8 base streams decoding, $(jget "$WORK/steps.json" window_s) s windows: 20 one-token requests"
    echo "to loaded adapters (warm: $(jget "$WORK/steps.json" warm_steps) steps, p50 $(jget "$WORK/steps.json" warm_p50_ms) ms,"
    echo "p99 $(jget "$WORK/steps.json" warm_p99_ms) ms) vs to 20 adapters loaded on first use meanwhile (cold:"
    echo "$(jget "$WORK/steps.json" cold_steps) steps, p50 $(jget "$WORK/steps.json" cold_p50_ms) ms, p99 $(jget "$WORK/steps.json" cold_p99_ms) ms):"
    echo "p99 ratio $(jget "$WORK/steps.json" p99_ratio)x (target <= 1.1)."
} | tee -a "$RESULTS"
