#!/usr/bin/env bash
# bench_scoring.sh - prompt scoring on the CPU (issue 16): the same prompts sent 8 at a time as
# echo + logprobs requests with max_tokens 0 (every prompt token scored: logits at every position,
# log-softmax, the top alternative) and as plain requests with max_tokens 1 (prefill + one token,
# no prompt logits). Prints prompt tokens/s of each and their ratio, and, with BASELINE_BIN set to
# a hydrad built before prompt logprobs existed, the plain run on that binary too (plain requests
# must prefill as fast as before). Appends a table to bench/results/<date>-<machine>-scoring.md.
# Env: MODEL, THREADS (nproc), IN_LEN (256), PROMPTS (48), CONC (8), REPEAT (3), BASELINE_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
OWN_RESULTS=${RESULTS:-}
source bench/bench_lib.sh
IN_LEN=${IN_LEN:-256}
PROMPTS=${PROMPTS:-48}
CONC=${CONC:-8}
REPEAT=${REPEAT:-3}
[ -n "$OWN_RESULTS" ] || RESULTS=${RESULTS%.md}-scoring.md
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_scoring: $b missing (make)" >&2; exit 1; }; done
WORK=$(mktemp -d)
SRV=""
trap 'stop_pid "$SRV"; rm -rf "$WORK"' EXIT

# serve BIN [ARGS...]: start a server on a free port (URL in $URL, pid in $SRV). The prefix cache is
# off for hydrad's runs: the same prompts are sent REPEAT times, and this measures prefill, not reuse.
serve() {
    local port bin=$1
    shift
    port=$(free_port)
    "$bin" serve -m "$MODEL" --port "$port" --threads "$THREADS" --served-model-name base --max-seqs 16 \
        --max-batch-tokens 512 "$@" >"$WORK/srv.log" 2>&1 &
    SRV=$!
    URL="http://127.0.0.1:$port"
    wait_http "$URL/health" "$SRV" || { cat "$WORK/srv.log" >&2; exit 1; }
}

# one LABEL ARGS...: REPEAT runs of the same prompts; prints the median prompt tokens/s
one() {
    local label=$1
    shift
    for r in $(seq "$REPEAT"); do
        bin/hydrad-bench serve --url "$URL" --input-len "$IN_LEN" --num-prompts "$PROMPTS" --max-concurrency "$CONC" \
            --seed 7 --quiet --label "$label" --result-json "$WORK/$label-$r.json" "$@" >/dev/null
        $PY -c "import json; j=json.load(open('$WORK/$label-$r.json')); print(j['total_input_tokens'] / j['duration'])"
    done | median
}

results_init
echo "bench_scoring: $(cpu_model), $THREADS threads, $PROMPTS prompts of ~$IN_LEN tokens, $CONC in flight, load $(loadavg)" >&2
serve bin/hydrad --no-prefix-cache
plain=$(one plain --output-len 1)
score=$(one echo --echo --output-len 0)
plain2=$(one plain2 --output-len 1)
stop_pid "$SRV"
SRV=""
base="-"
if [ -n "${BASELINE_BIN:-}" ]; then
    serve "$BASELINE_BIN"
    base=$(one baseline --output-len 1)
    stop_pid "$SRV"
    SRV=""
fi
{
    echo
    echo "## Prompt scoring (\`bash bench/bench_scoring.sh\`), $(date -u +%H:%M) UTC, load $(loadavg)"
    echo
    echo "$(cpu_model), $THREADS threads, hydrad $(git rev-parse --short HEAD); $PROMPTS prompts of ~$IN_LEN tokens, $CONC in flight, median of $REPEAT runs."
    echo
    echo "| requests | prompt tokens/s |"
    echo "|---|---|"
    echo "| plain, max_tokens 1 (prefill + 1 token) | $plain |"
    echo "| echo + logprobs 1, max_tokens 0 (every prompt token scored) | $score |"
    echo "| plain again, after the scoring run | $plain2 |"
    [ "$base" != "-" ] && echo "| plain on the baseline binary ($BASELINE_BIN) | $base |"
    echo
    echo "Scoring / plain: $(ratio "$score" "$plain")x.$([ "$base" != "-" ] && echo " Plain now / plain on the baseline: $(ratio "$plain" "$base")x.")"
} | tee -a "$RESULTS"
