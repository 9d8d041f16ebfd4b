#!/usr/bin/env bash
# bench_serve.sh - the fixed serving suite on this CPU: hydrad with the base model and with 1, 8,
# 64 and 1000 generated adapters (r 8, K 3, uniform choice), and llama.cpp's llama-server (pinned,
# bench/build_llamacpp.sh) with the same base-model load, each at three Poisson request rates plus
# a saturating closed loop. Short outputs keep the suite near 10 minutes on 2 cores. Appends tables
# to bench/results/<date>-<machine>.md and writes latency-vs-load plots (gnuplot SVG) beside it.
# Env: MODEL, THREADS (nproc), RATES ("0.5 1 2"), DURATION (15 s per run), IN_LEN (64), OUT_LEN (32),
#      COUNTS ("1 8 64 1000"), SKIP_LLAMA=1, RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/bench_lib.sh
RATES=${RATES:-0.5 1 2}
DURATION=${DURATION:-15}
IN_LEN=${IN_LEN:-64}
OUT_LEN=${OUT_LEN:-32}
COUNTS=${COUNTS:-1 8 64 1000}
SEQS=16
SAT_PROMPTS=32
ADIR=${ADAPTER_DIR:-bench/.cache/adapters}
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_serve: $b missing (make)" >&2; exit 1; }; done
if ! command -v gnuplot >/dev/null; then
    echo "bench_serve: installing gnuplot-nox for the plots" >&2
    (apt-get install -y gnuplot-nox >/dev/null 2>&1 || sudo apt-get install -y gnuplot-nox >/dev/null 2>&1) ||
        echo "bench_serve: gnuplot unavailable; tables only" >&2
fi
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=bench/results/tmp/serve-$STAMP
mkdir -p "$WORK" "$ADIR"
SRV=""
trap 'stop_pid "$SRV"' EXIT
T0=$(date +%s)

run() { # run LABEL RATE URL [extra args...]: one load-generator run into $WORK/LABEL-RATE.json
    local label=$1 rate=$2 url=$3
    shift 3
    local load=(--request-rate "$rate" --duration "$DURATION")
    local n
    n=$($PY -c "import math; print(max(4, math.ceil($rate * $DURATION)))" 2>/dev/null || echo 8)
    [ "$rate" = max ] && { load=(--max-concurrency "$SEQS"); n=$SAT_PROMPTS; }
    load+=(--num-prompts "$n")
    # the seed follows the rate: every server sees the same prompts at a given rate, and no prompt
    # is sent twice to one server (llama-server would answer a repeated prompt from its cache)
    local seed=1 k=1
    for x in $RATES max; do [ "$x" = "$rate" ] && seed=$k; k=$((k + 1)); done
    bin/hydrad-bench serve --url "$url" --input-len "$IN_LEN" --output-len "$OUT_LEN" --seed "$seed" --quiet \
        --label "$label @ $rate" --result-json "$WORK/$label-$rate.json" "${load[@]}" "$@" >"$WORK/$label-$rate.md" ||
        echo "bench_serve: $label @ $rate had failed requests (see $WORK/$label-$rate.md)" >&2
    echo "$label $rate $(loadavg | cut -d' ' -f1)" >>"$WORK/loads.txt"
    echo "bench_serve: [$(( $(date +%s) - T0 ))s] $label @ $rate: $(jget "$WORK/$label-$rate.json" output_throughput) out tok/s," \
        "p50 TTFT $(jget "$WORK/$label-$rate.json" p50_ttft_ms) ms, mean TPOT $(jget "$WORK/$label-$rate.json" mean_tpot_ms) ms," \
        "failed $(jget "$WORK/$label-$rate.json" failed)" >&2
}

LOAD0=$(loadavg)
# hydrad: one server for every adapter count (adapters are added as the counts grow)
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
bin/hydrad serve -m "$MODEL" --port "$PORT" --threads "$THREADS" --max-seqs "$SEQS" --max-cpu-loras 1100 \
    --adapter-root "$(realpath "$ADIR")" >"$WORK/hydrad.log" 2>&1 &
SRV=$!
wait_http "$URL/health" "$SRV" || { cat "$WORK/hydrad.log" >&2; exit 1; }
for rate in $RATES max; do run hydrad-base "$rate" "$URL"; done
for n in $COUNTS; do
    # make (once, cached in $ADIR) and load the adapters before the timed runs
    bin/hydrad-bench serve --url "$URL" --num-adapters "$n" --make-adapters "$ADIR" --adapter-r 8 --adapter-K 3 \
        --num-prompts 2 --output-len 2 --input-len 8 --quiet >/dev/null
    for rate in $RATES max; do
        run "hydrad-$n" "$rate" "$URL" --num-adapters "$n" --make-adapters "$ADIR" --adapter-r 8 --adapter-K 3
    done
done
stop_pid "$SRV"
SRV=""

# llama.cpp's llama-server, same base-model load, same threads and parallel sequences
if [ -z "${SKIP_LLAMA:-}" ]; then
    LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
    PORT=$(free_port)
    URL="http://127.0.0.1:$PORT"
    "$LLAMA_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -np "$SEQS" \
        -c $((SEQS * 512)) >"$WORK/llama-server.log" 2>&1 &
    SRV=$!
    wait_http "$URL/health" "$SRV" || { tail -20 "$WORK/llama-server.log" >&2; exit 1; }
    for rate in $RATES max; do run llama-server "$rate" "$URL"; done
    stop_pid "$SRV"
    SRV=""
fi
LOAD1=$(loadavg)

results_init
BASE=${RESULTS%.md}
$PY - "$WORK" "$BASE" "$RATES" "$COUNTS" <<'PY' >"$WORK/tables.md"
import json, os, sys
work, base, rates, counts = sys.argv[1], sys.argv[2], sys.argv[3].split() + ["max"], sys.argv[4].split()
loads = {}
for line in open(os.path.join(work, "loads.txt")):
    l, r, a = line.split()
    loads[(l, r)] = a
def get(label, rate):
    p = os.path.join(work, f"{label}-{rate}.json")
    return json.load(open(p)) if os.path.exists(p) else None
labels = ["hydrad-base"] + [f"hydrad-{n}" for n in counts] + (["llama-server"] if get("llama-server", rates[0]) else [])
print("| server | adapters | rate (req/s) | done/failed | req/s | out tok/s | TTFT p50 / p90 / p99 ms | TPOT mean / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms | load 1m |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for lab in labels:
    for r in rates:
        j = get(lab, r)
        if not j:
            continue
        srv, ad = ("llama-server", "-") if lab == "llama-server" else ("hydrad", lab.split("-")[1].replace("base", "none"))
        rr = "saturating (16 in flight)" if r == "max" else r
        print(f"| {srv} | {ad} | {rr} | {j['completed']}/{j['failed']} | {j['request_throughput']:.2f} | {j['output_throughput']:.1f} | "
              f"{j['p50_ttft_ms']:.0f} / {j['p90_ttft_ms']:.0f} / {j['p99_ttft_ms']:.0f} | {j['mean_tpot_ms']:.1f} / {j['p99_tpot_ms']:.1f} | "
              f"{j['p50_itl_ms']:.1f} / {j['p99_itl_ms']:.1f} | {j['p50_e2el_ms']:.0f} / {j['p99_e2el_ms']:.0f} | {loads.get((lab, r), '?')} |")
def ratio_table(title, ref, others):
    print(f"\n{title}\n")
    print("| run | rate | out tok/s ratio | mean TPOT ratio | p50 TTFT ratio | p99 E2E ratio |")
    print("|---|---|---|---|---|---|")
    for lab in others:
        for r in rates:
            a, b = get(lab, r), get(ref, r)
            if not a or not b:
                continue
            f = lambda k: a[k] / b[k] if b[k] else float("nan")
            rr = "saturating" if r == "max" else r
            print(f"| {lab} | {rr} | {f('output_throughput'):.2f} | {f('mean_tpot_ms'):.2f} | {f('p50_ttft_ms'):.2f} | {f('p99_e2el_ms'):.2f} |")
ratio_table(f"Ratios to the 1-adapter run (same rate); latency ratios > 1 are slower:", "hydrad-1",
            [f"hydrad-{n}" for n in counts] + ["hydrad-base"])
if "llama-server" in labels:
    ratio_table("hydrad (base model) / llama-server, same load; throughput > 1 and latency < 1 favour hydrad:",
                "llama-server", ["hydrad-base"])
# gnuplot data: achieved req/s, p50 TTFT, p99 TTFT, mean TPOT, p99 E2E per label
for lab in labels:
    with open(os.path.join(work, f"{lab}.dat"), "w") as f:
        for r in rates:
            j = get(lab, r)
            if j:
                f.write(f"{j['request_throughput']:.4f} {j['p50_ttft_ms']:.2f} {j['p99_ttft_ms']:.2f} {j['mean_tpot_ms']:.2f} {j['p99_e2el_ms']:.2f}\n")
with open(os.path.join(work, "labels.txt"), "w") as f:
    f.write(" ".join(labels))
PY

PLOTS=""
if command -v gnuplot >/dev/null; then
    LABELS=$(cat "$WORK/labels.txt")
    for spec in "ttft:3:p99 TTFT (ms)" "tpot:4:mean TPOT (ms)" "e2e:5:p99 end-to-end latency (ms)"; do
        IFS=: read -r name col ylabel <<<"$spec"
        out="$BASE-$name.svg"
        plot=""
        for lab in $LABELS; do
            plot+="${plot:+, }'$WORK/$lab.dat' using 1:$col with linespoints title '$lab'"
        done
        gnuplot -e "set terminal svg size 800,500; set output '$out'; set title '$ylabel vs load, $(cpu_model) $(cpu_cores) cores';
                    set xlabel 'achieved requests/s'; set ylabel '$ylabel'; set logscale y; set key top left; set grid; plot $plot" &&
            PLOTS+=" ![${ylabel}]($(basename "$out"))"
    done
fi

{
    echo
    echo "## Serving suite, $(date '+%Y-%m-%d %H:%M') ($(( $(date +%s) - T0 )) s)"
    echo
    echo "$(cpu_model), $(cpu_cores) cores, $THREADS threads; $MODEL. \`hydrad-bench serve\`: Poisson arrivals at"
    echo "$RATES req/s for $DURATION s each, then a saturating closed loop ($SAT_PROMPTS requests, 16 in flight);"
    echo "prompts of $IN_LEN words (about $IN_LEN tokens), $OUT_LEN output tokens (ignore_eos), streaming. Servers: hydrad"
    echo "--max-seqs $SEQS (adapters r 8, K 3, q_proj+v_proj, chosen uniformly; --max-loras 8 resident at once) and"
    echo "llama-server -np $SEQS (llama-cpp-python 0.3.36's llama.cpp). Load average before $LOAD0, after $LOAD1;"
    echo "the last column is the 1-minute load after each run (the machine is shared)."
    peer_build
    echo
    cat "$WORK/tables.md"
    [ -n "$PLOTS" ] && { echo; echo "$PLOTS"; }
} | tee -a "$RESULTS"
echo "bench_serve: appended to $RESULTS; raw JSON in $WORK" >&2
