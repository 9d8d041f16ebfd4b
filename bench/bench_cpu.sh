#!/usr/bin/env bash
# bench_cpu.sh (make bench-cpu) - hydrad vs llama.cpp (pinned llama-bench from
# bench/build_llamacpp.sh) on the same GGUF and threads: prefill tok/s of a 128-token prompt and
# decode tok/s of 128 tokens after it, median of REPS interleaved runs; appends to the results file.
# Env: MODEL, THREADS (nproc), REPS (3), RESULTS (bench/results/<date>-<machine>.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/bench_lib.sh
REPS=${REPS:-3}
NP=128
NG=128
LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
[ -x bin/hydrad ] || { echo "bench_cpu: bin/hydrad missing (make)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# A prompt of common words, one token each with SmolLM2's BPE (the run prints the real count).
# --ignore-eos makes hydrad decode exactly NG tokens, as llama-bench's tg does.
PROMPT=$($PY - "$NP" <<'PY'
import random, sys
words = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an had they you were their one all we can her has there been if more when will would "
         "who so no she other its may these what them than some him time into only do could new about two").split()
r = random.Random(7)
print(" ".join(r.choice(words) for _ in range(int(sys.argv[1]))))
PY
)

LOAD0=$(loadavg)
echo "bench_cpu: $(cpu_model), $(cpu_cores) cores, $THREADS threads, model $MODEL, load $LOAD0" >&2
for i in $(seq "$REPS"); do
    bin/hydrad generate -m "$MODEL" -p "$PROMPT" -n "$NG" --ignore-eos --threads "$THREADS" --temp 0 >/dev/null 2>"$TMP/hy.err" ||
        { cat "$TMP/hy.err" >&2; exit 1; }
    line=$(grep -E 'prefill [0-9]+ tokens' "$TMP/hy.err" | tail -1)
    echo "$line" | sed -E 's/.*prefill ([0-9]+) tokens.*\(([0-9.]+) tok\/s\).*decode ([0-9]+) tokens.*\(([0-9.]+) tok\/s\).*/\1 \2 \3 \4/' >>"$TMP/hy.txt"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$NP" -n 0 -r 1 -o csv 2>/dev/null | tail -1 >>"$TMP/lp.csv"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$NG" -d "$NP" -r 1 -o csv 2>/dev/null | tail -1 >>"$TMP/lg.csv"
    echo "bench_cpu: rep $i/$REPS: hydrad $(tail -1 "$TMP/hy.txt")" >&2
done
LOAD1=$(loadavg)

HDR=$("$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 1 -n 0 -r 1 -o csv 2>/dev/null | head -1)
avg_ts() { $PY -c "
import csv, sys, io
hdr = next(csv.reader(io.StringIO('''$HDR''')))
i = hdr.index('avg_ts')
for row in csv.reader(open('$1')): print(row[i])
"; }
HY_PN=$(awk '{print $1}' "$TMP/hy.txt" | median)
HY_P=$(awk '{print $2}' "$TMP/hy.txt" | median)
HY_GN=$(awk '{print $3}' "$TMP/hy.txt" | median)
HY_G=$(awk '{print $4}' "$TMP/hy.txt" | median)
LL_P=$(avg_ts "$TMP/lp.csv" | median)
LL_G=$(avg_ts "$TMP/lg.csv" | median)
RP=$(ratio "$HY_P" "$LL_P")
RG=$(ratio "$HY_G" "$LL_G")

results_init
{
    echo
    echo "## CPU: hydrad vs llama.cpp, $(date '+%Y-%m-%d %H:%M')"
    echo
    echo "$(cpu_model), $(cpu_cores) cores, $THREADS threads; $MODEL; median of $REPS interleaved runs;"
    echo "load average before $LOAD0, after $LOAD1. llama.cpp: llama-bench as vendored by llama-cpp-python 0.3.36."
    echo
    echo "| engine | prefill tok/s ($NP-token prompt) | decode tok/s ($NG tokens after it) |"
    echo "|---|---|---|"
    echo "| hydrad generate | $HY_P | $HY_G |"
    echo "| llama.cpp llama-bench (pp$NP, tg$NG @ depth $NP) | $LL_P | $LL_G |"
    echo "| **hydrad / llama.cpp** | **$RP** | **$RG** |"
    echo
    echo "hydrad's prompt was $HY_PN tokens (common words, one token each); it decoded $HY_GN steps after the"
    echo "first sampled token (--ignore-eos), timed like llama-bench's tg at depth $NP."
} | tee -a "$RESULTS"
echo "bench_cpu: appended to $RESULTS" >&2
