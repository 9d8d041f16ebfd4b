#!/usr/bin/env bash
# bench_structured.sh - what constrained decoding (response_format json_schema) costs on this CPU:
# hydrad's decode speed with and without a schema at 1 and 32 concurrent streams, and hydrad
# against llama.cpp's llama-server (pinned, bench/build_llamacpp.sh) on the same constrained load,
# same GGUF and threads. Every run is `hydrad-bench serve`, closed loop, streaming /v1/chat/completions.
# Constrained runs send the schema with --no-ignore-eos, so a request ends when its JSON closes; the
# unconstrained baseline then asks for the constrained run's mean output length with ignore_eos, so
# both decode the same number of tokens. For each level each server is started fresh and warmed up
# (a schema request included), and the two alternate. llama-server's grammar sampler costs it over a
# tenth of a second per token and slot here, so above one stream it gets one round of requests cut
# at CAP tokens (JSON left open) with a free baseline of CAP tokens, and hydrad also runs that capped
# load for the ratio. Writes bench/results/<date>-<machine>-structured.md.
# Env: MODEL, THREADS (nproc), STREAMS ("1 32"), PER_STREAM ("1:16 32:3": requests per stream at a
# level), LLAMA_PER_STREAM ("1:6", then PER_STREAM), CAP (32; 0: llama-server runs the full load at
# every level), IN_LEN (32), MAX_OUT (384, the constrained runs' max_tokens), RF (builtin, or a file
# holding a response_format object), SKIP_LLAMA=1, RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
OWN_RESULTS=${RESULTS:-}
source bench/bench_lib.sh
STREAMS=${STREAMS:-1 32}
PER_STREAM=${PER_STREAM:-1:16 32:3}
LLAMA_PER_STREAM=${LLAMA_PER_STREAM:-1:6}
CAP=${CAP:-32}
IN_LEN=${IN_LEN:-32}
MAX_OUT=${MAX_OUT:-384}
RF=${RF:-builtin}
[ -n "$OWN_RESULTS" ] || RESULTS=${RESULTS%.md}-structured.md
MAXS=0
for n in $STREAMS; do [ "$n" -gt "$MAXS" ] && MAXS=$n; done
# context per llama-server slot: the prompt with its chat template (words are about one token each) + output
SLOT_CTX=$(( (IN_LEN * 2 + 64 + MAX_OUT + 63) / 64 * 64 ))
for b in bin/hydrad bin/hydrad-bench; do [ -x "$b" ] || { echo "bench_structured: $b missing (make)" >&2; exit 1; }; done
ENGINES=hydrad
if [ -z "${SKIP_LLAMA:-}" ]; then
    LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
    ENGINES="hydrad llama-server"
fi
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=bench/results/tmp/structured-$STAMP
mkdir -p "$WORK"
SRV=""
trap 'stop_pid "$SRV"' EXIT
T0=$(date +%s)

per_stream() { # per_stream ENGINE N: requests per stream at level N (llama-server: its own list, else hydrad's)
    local kv list=$PER_STREAM
    [ "$1" = llama-server ] && list="$LLAMA_PER_STREAM $PER_STREAM"
    for kv in $list; do [ "${kv%%:*}" = "$2" ] && { echo "${kv#*:}"; return; }; done
    echo 3
}

capped() { [ "$CAP" -gt 0 ] && [ "$1" -gt 1 ] && [ "$ENGINES" != hydrad ]; } # capped N: level N compares capped runs

start_server() { # start_server ENGINE PORT: starts it in the background into SRV, waits for /health
    local engine=$1 port=$2
    if [ "$engine" = hydrad ]; then
        bin/hydrad serve -m "$MODEL" --port "$port" --threads "$THREADS" --max-seqs "$MAXS" --device cpu \
            >>"$WORK/hydrad.log" 2>&1 &
    else
        "$LLAMA_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" -np "$MAXS" \
            -c $((MAXS * SLOT_CTX)) >>"$WORK/llama-server.log" 2>&1 &
    fi
    SRV=$!
    wait_http "http://127.0.0.1:$port/health" "$SRV" || { tail -20 "$WORK/$engine.log" >&2; exit 1; }
}

bench() { # bench URL OUT N PROMPTS SEED [args...]: one closed-loop chat run into OUT.json / OUT.md
    local url=$1 out=$2 n=$3 np=$4 seed=$5
    shift 5
    bin/hydrad-bench serve --url "$url" --endpoint chat --max-concurrency "$n" --num-prompts "$np" \
        --input-len "$IN_LEN" --seed "$seed" --quiet --label "$(basename "$out")" --result-json "$out.json" "$@" \
        >"$out.md" || echo "bench_structured: $(basename "$out") had failed requests (see $out.md)" >&2
    echo "$(basename "$out") $(loadavg | cut -d' ' -f1)" >>"$WORK/loads.txt"
    echo "bench_structured: [$(( $(date +%s) - T0 ))s] $(basename "$out"): $(jget "$out.json" output_throughput) out tok/s," \
        "mean TPOT $(jget "$out.json" mean_tpot_ms) ms, $(jget "$out.json" total_output_tokens) tokens," \
        "failed $(jget "$out.json" failed), invalid JSON $(jget "$out.json" invalid_json)" >&2
}

run_level() { # run_level ENGINE N: fresh server, warm-up, constrained run, then the matched baseline
    local engine=$1 n=$2 port url np mean
    port=$(free_port)
    url="http://127.0.0.1:$port"
    np=$(( $(per_stream "$engine" "$n") * n ))
    start_server "$engine" "$port"
    # warm-up with its own seed, so no timed prompt is cached; the schema is compiled here if cached
    bin/hydrad-bench serve --url "$url" --endpoint chat --num-prompts 2 --max-concurrency 2 --input-len 8 \
        --output-len 8 --seed 9999 --quiet >/dev/null || true
    bin/hydrad-bench serve --url "$url" --endpoint chat --num-prompts 2 --max-concurrency 2 --input-len 8 \
        --output-len 8 --no-ignore-eos --response-format "$RF" --seed 9998 --quiet >/dev/null || true
    # the same seed on both servers: the same prompts; each run has its own, so no prompt repeats on a server
    if capped "$n"; then
        bench "$url" "$WORK/$engine-jsoncap-$n" "$n" "$n" $((n * 10 + 3)) --output-len "$CAP" --no-ignore-eos \
            --response-format "$RF"
    fi
    if [ "$engine" = llama-server ] && capped "$n"; then
        bench "$url" "$WORK/$engine-textcap-$n" "$n" "$n" $((n * 10 + 4)) --output-len "$CAP"
    else
        bench "$url" "$WORK/$engine-json-$n" "$n" "$np" $((n * 10 + 1)) --output-len "$MAX_OUT" --no-ignore-eos \
            --response-format "$RF"
        mean=$($PY -c "import json; j=json.load(open('$WORK/$engine-json-$n.json')); print(max(2, round(j['total_output_tokens'] / max(1, j['completed']))))")
        bench "$url" "$WORK/$engine-text-$n" "$n" "$np" $((n * 10 + 2)) --output-len "$mean"
    fi
    stop_pid "$SRV"
    SRV=""
}

LOAD0=$(loadavg)
echo "bench_structured: $(cpu_model), $(cpu_cores) cores, $THREADS threads, model $MODEL, load $LOAD0" >&2
for n in $STREAMS; do
    # alternate which engine goes first, so neither always runs on the warmer machine
    order=$ENGINES
    [ $(( n % 2 )) -eq 0 ] && [ "$ENGINES" != hydrad ] && order="llama-server hydrad"
    for engine in $order; do run_level "$engine" "$n"; done
done
LOAD1=$(loadavg)

$PY - "$WORK" "$STREAMS" "$ENGINES" "$CAP" <<'PY' >"$WORK/table.md"
import json, os, sys
work, streams, engines, cap = sys.argv[1], [int(x) for x in sys.argv[2].split()], sys.argv[3].split(), sys.argv[4]
loads = dict(line.split() for line in open(os.path.join(work, "loads.txt")))
def get(engine, mode, n):
    p = os.path.join(work, f"{engine}-{mode}-{n}.json")
    return json.load(open(p)) if os.path.exists(p) else None
nan = float("nan")
tput = lambda j: j["output_throughput"] if j else nan
tpot = lambda j: j["mean_tpot_ms"] if j else nan
div = lambda a, b: a / b if b == b and b > 0 else nan
modes = (("json", "json_schema"), ("text", "free, ignore_eos"), ("jsoncap", f"json_schema, first {cap} tokens"),
         ("textcap", f"free, {cap} tokens"))
print("| streams | server | decoding | done/failed | invalid JSON | mean out tokens | out tok/s | mean TPOT ms "
      "| per-stream tok/s (1000/TPOT) | p50 TTFT ms | load 1m |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for n in streams:
    for e in engines:
        for mode, what in modes:
            j = get(e, mode, n)
            if not j:
                continue
            inv = {"json": str(j["invalid_json"]), "jsoncap": "(cut)"}.get(mode, "-")
            print(f"| {n} | {e} | {what} | {j['completed']}/{j['failed']} | {inv} "
                  f"| {div(j['total_output_tokens'], j['completed']):.1f} | {tput(j):.1f} | {tpot(j):.2f} "
                  f"| {div(1000, tpot(j)):.1f} | {j['p50_ttft_ms']:.0f} | {loads.get(f'{e}-{mode}-{n}', '?')} |")
print()
hdr = "| streams | hydrad overhead, out tok/s | hydrad overhead, 1/TPOT | hydrad TPOT constrained - free, µs "
sep = "|---|---|---|---|"
if "llama-server" in engines:
    hdr += ("| llama-server overhead, 1/TPOT | llama-server TPOT constrained - free, µs "
            "| **hydrad / llama-server constrained, out tok/s** | hydrad / llama-server constrained, 1/TPOT ")
    sep += "---|---|---|---|"
print(hdr + "|")
print(sep)
for n in streams:
    hj, ht = get("hydrad", "json", n), get("hydrad", "text", n)
    row = (f"| {n} | {100 * (1 - div(tput(hj), tput(ht))):.1f}% | {100 * (1 - div(tpot(ht), tpot(hj))):.1f}% "
           f"| {1000 * (tpot(hj) - tpot(ht)):.0f} ")
    if "llama-server" in engines:
        full = get("llama-server", "json", n) is not None
        lj, lt = (get("llama-server", "json", n), get("llama-server", "text", n)) if full else \
                 (get("llama-server", "jsoncap", n), get("llama-server", "textcap", n))
        hc = hj if full else get("hydrad", "jsoncap", n)
        note = "" if full else f" (first {cap} tokens)"
        row += (f"| {100 * (1 - div(tpot(lt), tpot(lj))):.1f}%{note} | {1000 * (tpot(lj) - tpot(lt)):.0f}{note} "
                f"| **{div(tput(hc), tput(lj)):.2f}**{note} | {div(tpot(lj), tpot(hc)):.2f}{note} ")
    print(row + "|")
PY

results_init
{
    echo
    echo "## Constrained decoding (response_format), $(date '+%Y-%m-%d %H:%M') ($(( $(date +%s) - T0 )) s)"
    echo
    echo "$(cpu_model), $(cpu_cores) cores, $THREADS threads; $MODEL. \`hydrad-bench serve --endpoint chat\`, closed loop"
    echo "with N in flight, prompts of $IN_LEN random words, greedy. json_schema: \`--response-format $RF\` with"
    echo "--no-ignore-eos and max_tokens $MAX_OUT (requests end when the JSON closes); free: the same server, prompts of"
    echo "another seed, max_tokens = the json_schema run's mean output with ignore_eos. Requests per level: $PER_STREAM"
    echo "(streams:per stream; llama-server $LLAMA_PER_STREAM first). Above 1 stream llama-server gets one round cut at"
    echo "$CAP tokens (CAP) and hydrad the same capped load for the ratio. Each server is started fresh per level and"
    echo "warmed up; hydrad serve --max-seqs $MAXS,"
    echo "llama-server -np $MAXS -c $((MAXS * SLOT_CTX)) (llama-cpp-python 0.3.36's llama.cpp, GBNF from the schema)."
    peer_build
    echo "Overhead = 1 - constrained / free. At 1 stream, TPOT constrained - free is the per-token cost of the mask"
    echo "(and of anything else constrained decoding adds); at N streams it is the added time per decode step."
    echo "Invalid JSON: answers that do not parse as a JSON object."
    echo "Load average before $LOAD0, after $LOAD1 (the machine is shared; last column: 1-minute load after each run)."
    echo
    cat "$WORK/table.md"
} | tee -a "$RESULTS"
echo "bench_structured: appended to $RESULTS; raw JSON in $WORK" >&2
