#!/usr/bin/env bash
# bench_perplexity.sh - `hydrad perplexity` against llama.cpp's llama-perplexity (pinned,
# bench/build_llamacpp.sh) on the same GGUF, text file, --ctx, batch and threads: both PPL values and
# their relative difference (the same method over the same tokens: it must stay within 1%), and how
# fast each evaluates (tokens/s) with the ratio hydrad / llama.cpp. hydrad also runs its fp32 path
# (HY_CPU_PRECISE=1), which shows how much of the difference is the 8-bit activation rounding of the
# default path rather than the method.
# Texts: (1) the repository's own Markdown documentation as committed at HEAD (git ls-files '*.md'
# without bench/results, in that order, each followed by a newline; sha256 printed) at CTX tokens,
# (2) tests/fixtures/ppl.txt at SMALL_CTX. Speeds are each tool's own clock over the windows (forward
# passes and scoring, not model loading or tokenising): hydrad's "tok/s evaluated" line, llama.cpp's
# log timestamps from "calculating perplexity" to "Final estimate".
# Writes bench/results/<date>-<machine>-perplexity.md. Exits 1 when the CTX comparison differs by 1% or more.
# Env: MODEL, THREADS (2), CTX (512), BATCH (CTX), CHUNKS (all windows), SMALL_CTX (64), PRECISE (1),
# TEXT (instead of the documentation), RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
OWN_RESULTS=${RESULTS:-}
THREADS=${THREADS:-2}
source bench/bench_lib.sh
CTX=${CTX:-512}
BATCH=${BATCH:-$CTX}
CHUNKS=${CHUNKS:-}
SMALL_CTX=${SMALL_CTX:-64}
PRECISE=${PRECISE:-1}
[ -n "$OWN_RESULTS" ] || RESULTS=${RESULTS%.md}-perplexity.md
[ -x bin/hydrad ] || { echo "bench_perplexity: bin/hydrad missing (make)" >&2; exit 1; }
LLAMA_BIN=$(bash bench/build_llamacpp.sh | tail -1)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=bench/results/tmp/perplexity-$STAMP
mkdir -p "$WORK"
T0=$(date +%s)
REV=$(git rev-parse --short HEAD) # at the start: others may commit while it runs

if [ -n "${TEXT:-}" ]; then
    DOCS=$TEXT
    DOCS_WHAT="$TEXT"
else
    DOCS=$WORK/docs.txt
    git ls-files '*.md' ':!bench/results' | while read -r f; do git show "HEAD:$f"; echo; done >"$DOCS"
    DOCS_WHAT="the repository's Markdown files at $REV ($(git ls-files '*.md' ':!bench/results' | wc -l) files)"
fi
echo "bench_perplexity: $(cpu_model), $(cpu_cores) cores, $THREADS threads, model $MODEL, load $(loadavg)" >&2

# run ENGINE LABEL FILE CTX BATCH [N]: one run (first N windows) into $WORK/LABEL.{out,err}; appends
# "LABEL ppl err tok/s wall load" to $WORK/runs.txt
run() {
    local engine=$1 label=$2 file=$3 ctx=$4 batch=$5 t1 t2 chunks=()
    [ -n "${6:-}" ] && chunks=(--chunks "$6")
    t1=$(date +%s.%N)
    case $engine in
    hydrad) bin/hydrad perplexity -m "$MODEL" -f "$file" --ctx "$ctx" --batch "$batch" --threads "$THREADS" \
                --device cpu "${chunks[@]}" >"$WORK/$label.out" 2>"$WORK/$label.err" ;;
    hydrad-fp32) HY_CPU_PRECISE=1 bin/hydrad perplexity -m "$MODEL" -f "$file" --ctx "$ctx" --batch "$batch" \
                --threads "$THREADS" --device cpu "${chunks[@]}" >"$WORK/$label.out" 2>"$WORK/$label.err" ;;
    llama) "$LLAMA_BIN/llama-perplexity" -m "$MODEL" -f "$file" -c "$ctx" -b "$batch" -t "$THREADS" \
                "${chunks[@]}" >"$WORK/$label.out" 2>"$WORK/$label.err" ;;
    esac
    t2=$(date +%s.%N)
    $PY - "$WORK/$label" "$engine" "$ctx" "$t1" "$t2" "$(loadavg | cut -d' ' -f1)" <<'PY' | tee -a "$WORK/runs.txt" >&2
import re, sys
base, engine, ctx, t1, t2, load = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
out, err = open(base + ".out").read(), open(base + ".err").read()
m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out + err)
if not m:
    sys.exit(f"bench_perplexity: no final estimate in {base}.out/.err")
if engine.startswith("hydrad"):
    tps = float(re.search(r"([0-9.]+) tok/s evaluated", err).group(1))
else:
    ts = lambda s: (lambda p: int(p[0]) * 60 + int(p[1]) + int(p[2]) / 1e3 + int(p[3]) / 1e6)(s.split("."))
    a = re.search(r"^(\d+\.\d+\.\d+\.\d+) I perplexity: calculating perplexity over (\d+) chunks", err, re.M)
    b = re.search(r"(\d+\.\d+\.\d+\.\d+) I Final estimate", err)  # may follow the ETA on its line
    tps = int(a.group(2)) * ctx / (ts(b.group(1)) - ts(a.group(1)))
print(base.rsplit("/", 1)[1], m.group(1), m.group(2), f"{tps:.1f}", f"{t2 - t1:.1f}", load)
PY
}

# the order alternates per text, so neither engine always runs on the warmer machine
ENGINES="hydrad llama"
[ "$PRECISE" = 1 ] && ENGINES="hydrad llama hydrad-fp32"
for e in $ENGINES; do run "$e" "docs-$e" "$DOCS" "$CTX" "$BATCH" "$CHUNKS"; done
SMALL_ENGINES="llama hydrad"
[ "$PRECISE" = 1 ] && SMALL_ENGINES="llama hydrad hydrad-fp32"
for e in $SMALL_ENGINES; do run "$e" "small-$e" tests/fixtures/ppl.txt "$SMALL_CTX" "$SMALL_CTX"; done

$PY - "$WORK" "$CTX" "$BATCH" "$SMALL_CTX" >"$WORK/table.md" <<'PY'
import os, re, sys
work, ctx, batch, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = {l.split()[0]: l.split()[1:] for l in open(os.path.join(work, "runs.txt"))}
def tokens(label):
    err = open(os.path.join(work, label + ".err")).read()
    m = re.search(r"(\d+) tokens, (\d+) windows", err)
    return m.groups() if m else ("?", "?")
print("| text | ctx / batch | tokens (windows) | engine | PPL | +/- | tok/s evaluated | wall s | load 1m |")
print("|---|---|---|---|---|---|---|---|---|")
rows = []
for text, c, b in (("docs", ctx, batch), ("small", small, small)):
    n, w = tokens(f"{text}-hydrad")
    for e in ("hydrad", "llama", "hydrad-fp32"):
        r = runs.get(f"{text}-{e}")
        if r:
            name = {"hydrad": "hydrad", "llama": "llama-perplexity", "hydrad-fp32": "hydrad HY_CPU_PRECISE=1"}[e]
            print(f"| {text} | {c} / {b} | {n} ({w}) | {name} | {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
print()
print("| text | PPL hydrad | PPL llama.cpp | **relative difference** | fp32 path vs llama.cpp | tok/s hydrad | tok/s llama.cpp | **hydrad / llama.cpp** |")
print("|---|---|---|---|---|---|---|---|")
for text in ("docs", "small"):
    h, l, p = runs.get(f"{text}-hydrad"), runs.get(f"{text}-llama"), runs.get(f"{text}-hydrad-fp32")
    d = float(h[0]) / float(l[0]) - 1
    dp = f"{100 * (float(p[0]) / float(l[0]) - 1):+.3f}%" if p else "-"
    print(f"| {text} | {h[0]} | {l[0]} | **{100 * d:+.3f}%** | {dp} | {h[2]} | {l[2]} | **{float(h[2]) / float(l[2]):.2f}** |")
    if text == "docs":
        open(os.path.join(work, "docs-diff.txt"), "w").write(f"{d}\n")
PY

LOAD1=$(loadavg)
results_init
{
    echo
    echo "## Perplexity, hydrad vs llama-perplexity, $(date '+%Y-%m-%d %H:%M') ($(( $(date +%s) - T0 )) s)"
    echo
    echo "$(cpu_model) (/proc/cpuinfo: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(cpu_cores) cores,"
    echo "$THREADS threads; $MODEL; hydrad $REV (bin/hydrad as built), llama.cpp of llama-cpp-python 0.3.36."
    peer_build
    echo "docs: $DOCS_WHAT, $(wc -c <"$DOCS") bytes, sha256 $(sha256sum "$DOCS" | cut -c1-16)...;"
    echo "small: tests/fixtures/ppl.txt. Commands (llama-perplexity -b = hydrad --batch, so both run the same"
    echo "windows per forward pass${CHUNKS:+; --chunks $CHUNKS on both for docs}):"
    echo
    echo "    bin/hydrad perplexity -m $MODEL -f docs.txt --ctx $CTX --batch $BATCH --threads $THREADS --device cpu"
    echo "    llama-perplexity -m $MODEL -f docs.txt -c $CTX -b $BATCH -t $THREADS"
    echo "    bin/hydrad perplexity -m $MODEL -f tests/fixtures/ppl.txt --ctx $SMALL_CTX --batch $SMALL_CTX --threads $THREADS --device cpu"
    echo "    llama-perplexity -m $MODEL -f tests/fixtures/ppl.txt -c $SMALL_CTX -b $SMALL_CTX -t $THREADS"
    echo
    echo "(and the hydrad lines again with HY_CPU_PRECISE=1 for the fp32 path). tok/s: each tool's own clock over"
    echo "its windows (forward passes + scoring). Load average after: $LOAD1 (the machine is shared; last column:"
    echo "1-minute load after each run)."
    echo
    cat "$WORK/table.md"
} | tee -a "$RESULTS"
echo "bench_perplexity: appended to $RESULTS; logs in $WORK" >&2
$PY -c "import sys; d = float(open('$WORK/docs-diff.txt').read()); sys.exit(0 if abs(d) < 0.01 else 1)" || {
    echo "bench_perplexity: hydrad and llama-perplexity differ by 1% or more on the documentation text" >&2
    exit 1
}
