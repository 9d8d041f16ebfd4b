#!/usr/bin/env bash
# bench_cpu.sh (make bench-cpu) - hydrad vs llama.cpp (pinned llama-bench from
# bench/build_llamacpp.sh) on the same GGUF and threads: prefill tok/s of a 128-token prompt and
# decode tok/s of 128 tokens after it, median of REPS interleaved runs; appends to the results file.
# Each rep also measures the host's read bandwidth (hydrad-bench membw, same threads), so hydrad's
# decode step is printed as a multiple of the bandwidth floor: the weight bytes a decode step reads
# over the measured bandwidth (DESIGN.md section 7). The results name the llama.cpp build that ran
# (native or portable, bench/build_llamacpp.sh's build-info.txt).
# Env: MODEL, THREADS (nproc), REPS (3), RESULTS (bench/results/<date>-<machine>.md), BIN (bin: the
# directory of hydrad and hydrad-bench; `make BUILD=b2 BIN=b2bin bench-cpu` passes it).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/bench_lib.sh
REPS=${REPS:-3}
NP=128
NG=128
LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
HY_BIN=${BIN:-bin}
for b in "$HY_BIN/hydrad" "$HY_BIN/hydrad-bench"; do [ -x "$b" ] || { echo "bench_cpu: $b missing (make)" >&2; exit 1; }; done
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
    "$HY_BIN/hydrad" generate -m "$MODEL" -p "$PROMPT" -n "$NG" --ignore-eos --threads "$THREADS" --temp 0 >/dev/null 2>"$TMP/hy.err" ||
        { cat "$TMP/hy.err" >&2; exit 1; }
    line=$(grep -E 'prefill [0-9]+ tokens' "$TMP/hy.err" | tail -1)
    echo "$line" | sed -E 's/.*prefill ([0-9]+) tokens.*\(([0-9.]+) tok\/s\).*decode ([0-9]+) tokens.*\(([0-9.]+) tok\/s\).*/\1 \2 \3 \4/' >>"$TMP/hy.txt"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$NP" -n 0 -r 1 -o csv 2>/dev/null | tail -1 >>"$TMP/lp.csv"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$NG" -d "$NP" -r 1 -o csv 2>/dev/null | tail -1 >>"$TMP/lg.csv"
    "$HY_BIN/hydrad-bench" membw --threads "$THREADS" --passes 5 --model "$MODEL" >"$TMP/bw.out"
    echo "$(awk '$1 == "bandwidth_gbps" {print $2}' "$TMP/bw.out") $(cut -d' ' -f1 /proc/loadavg)" >>"$TMP/bw.txt"
    echo "bench_cpu: rep $i/$REPS: hydrad $(tail -1 "$TMP/hy.txt"); $(head -1 "$TMP/bw.out")" >&2
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
BW=$(awk '{print $1}' "$TMP/bw.txt" | median)
BW_ALL=$(awk '{print $1}' "$TMP/bw.txt" | tr '\n' ' ' | sed 's/ $//')
LOADS=$(awk '{print $2}' "$TMP/bw.txt" | tr '\n' ' ' | sed 's/ $//')
WBYTES=$(awk '$1 == "weight_bytes_per_token" {print $2}' "$TMP/bw.out")
KVPOS=$(awk '$1 == "kv_bytes_per_position" {print $2}' "$TMP/bw.out")
BUF=$(awk '$1 == "buffer_mib" {print $2}' "$TMP/bw.out")
# floor = weight bytes / bandwidth; multiple = measured ms per token / floor ms.
read -r FLOOR_MS HY_MS LL_MS HY_X LL_X KV_DEPTH FLOOR_KV_MS HY_X_KV <<<"$($PY -c "
bw, w, kv, hy, ll, np, ng = $BW * 1e9, $WBYTES, $KVPOS, $HY_G, $LL_G, $NP, $NG
floor = 1e3 * w / bw
depth = np + ng / 2
floor_kv = 1e3 * (w + kv * depth) / bw
print('%.2f %.2f %.2f %.2f %.2f %d %.2f %.2f' % (floor, 1e3 / hy, 1e3 / ll, 1e3 / hy / floor, 1e3 / ll / floor,
                                          depth, floor_kv, 1e3 / hy / floor_kv))
")"
CPU_PROC=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)

results_init
{
    echo
    echo "## CPU: hydrad vs llama.cpp, $(date '+%Y-%m-%d %H:%M')"
    echo
    echo "$CPU_PROC (/proc/cpuinfo), $(cpu_cores) cores, $THREADS threads; $MODEL; hydrad $HY_BIN/ at"
    echo "$(git rev-parse --short HEAD 2>/dev/null || echo '?'); median of $REPS interleaved runs. Load average (1, 5, 15 min) before $LOAD0,"
    echo "after $LOAD1; 1-minute load at each rep: $LOADS."
    peer_build
    echo
    echo "| engine | prefill tok/s ($NP-token prompt) | decode tok/s ($NG tokens after it) | decode ms/token | **x bandwidth floor** |"
    echo "|---|---|---|---|---|"
    echo "| hydrad generate | $HY_P | $HY_G | $HY_MS | **$HY_X** |"
    echo "| llama.cpp llama-bench (pp$NP, tg$NG @ depth $NP) | $LL_P | $LL_G | $LL_MS | $LL_X |"
    echo "| **hydrad / llama.cpp** | **$RP** | **$RG** | | |"
    echo
    echo "Bandwidth floor: a decode step reads $WBYTES weight bytes (every tensor of the GGUF once; a tied"
    echo "output matrix counts whole, an untied token_embd one row); read bandwidth $BW GB/s (\`hydrad-bench membw\`:"
    echo "$THREADS threads summing $BUF MiB, best of 5 passes, median of one measurement per rep: $BW_ALL GB/s);"
    echo "floor = $WBYTES B / $BW GB/s = $FLOOR_MS ms per token. Multiple = decode ms/token / floor. Reading the"
    echo "KV cache too ($KVPOS B per position, mean depth $KV_DEPTH) the floor is $FLOOR_KV_MS ms and hydrad ${HY_X_KV}x it."
    echo
    echo "hydrad's prompt was $HY_PN tokens (common words, one token each); it decoded $HY_GN steps after the"
    echo "first sampled token (--ignore-eos), timed like llama-bench's tg at depth $NP."
} | tee -a "$RESULTS"
echo "bench_cpu: appended to $RESULTS" >&2
