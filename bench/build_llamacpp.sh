#!/usr/bin/env bash
# build_llamacpp.sh - builds the peer we compare against: llama.cpp as vendored by the
# llama-cpp-python sdist on PyPI (pinned), into bench/.cache/. Used by bench scripts only;
# `make test` never needs it. Prints (last line of stdout) the directory holding llama-bench /
# llama-server / llama-perplexity / llama-lookup (prompt-lookup decoding), and leaves build-info.txt
# there: one line saying which build it is.
#
# A peer that cannot run is not a peer: every call smoke-runs llama-bench (a 32-token prefill, then
# one decode token; a one-token prefill would miss AMX, whose tile kernels run only for batches of
# more than one row). The first choice is the -march=native build (build/). If that dies (an Intel
# VM that advertises AMX but faults on it: SIGILL during prefill) or fails, a portable build
# (build-portable/, GGML_NATIVE=OFF) is made with the instruction sets /proc/cpuinfo lists set
# explicitly, and smoke-run; if that one fails too, the newest extensions are dropped one group at a
# time (AMX, then AVX-512, then AVX-VNNI, then AVX2/FMA/F16C/BMI2, then AVX) until a build runs.
# Nothing is fetched from GitHub: the source is the PyPI sdist, fetched once.
#
# Env: MODEL (the GGUF to smoke-run, default models/SmolLM2-135M-Instruct.Q4_1.gguf);
#   HY_PEER_FORCE_PORTABLE=1  count the native build's smoke run as failed (simulated; tests the
#                             fallback on a host whose native build works; the native build is
#                             neither built nor run);
#   HY_PEER_CPU_FLAGS="..."   use these flags instead of /proc/cpuinfo's (pretend to be another
#                             host: extensions this CPU lacks make the portable build's smoke run die
#                             for real, so the ladder is exercised).
set -euo pipefail
cd "$(dirname "$0")/.."
VER="0.3.36"
CACHE="bench/.cache"
SRC="$CACHE/llama.cpp-$VER"
NATIVE="$SRC/build"
PORTABLE="$SRC/build-portable"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TARGETS=(llama-bench llama-server llama-perplexity llama-lookup)
ORIGIN="llama.cpp as vendored by llama-cpp-python $VER (PyPI sdist)"

say() { echo "build_llamacpp: $*" >&2; }

mkdir -p "$CACHE"
# lock NAME: one caller at a time per build directory (bench scripts of several sessions may call
# this together), released when the script exits; a portable build in progress does not hold up
# callers whose native build runs. The source fetch is under the native lock.
lock() { if command -v flock >/dev/null; then exec 9>"$CACHE/.$1.lock"; flock 9; fi; }

have_bins() { local t; for t in "${TARGETS[@]}"; do [ -x "$1/bin/$t" ] || return 1; done; }

fetch_source() {
    [ -d "$SRC" ] && return 0
    say "downloading llama-cpp-python==$VER sdist"
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VER" -d "$CACHE" >&2
    tar xzf "$CACHE/llama_cpp_python-$VER.tar.gz" -C "$CACHE"
    mv "$CACHE/llama_cpp_python-$VER/vendor/llama.cpp" "$SRC"
    rm -rf "$CACHE/llama_cpp_python-$VER" "$CACHE/llama_cpp_python-$VER.tar.gz"
}

# build DIR CMAKE_OPTIONS...: configure and build the three targets into DIR/bin.
build() {
    local dir=$1
    shift
    command -v cmake >/dev/null || { say "cmake is required (apt-get install cmake)"; exit 1; }
    say "building ${TARGETS[*]} in $dir ($*) (a few minutes)"
    cmake -S "$SRC" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON "$@" >&2
    cmake --build "$dir" -j"$(nproc)" --target "${TARGETS[@]}" >&2
}

# smoke DIR [SIMULATED_REASON]: 0 when DIR's llama-bench runs a 32-token prefill and one decode
# token on MODEL; otherwise 1 with the reason in SMOKE_WHY.
SMOKE_WHY=""
smoke() {
    local dir=$1 rc=0
    if [ -n "${2:-}" ]; then SMOKE_WHY="$2"; return 1; fi
    if [ ! -f "$MODEL" ]; then
        say "no $MODEL: cannot smoke-run the peer, trusting $dir"
        SMOKE_WHY=""
        return 0
    fi
    timeout 300 "$dir/bin/llama-bench" -m "$MODEL" -t 1 -p 32 -n 1 -r 1 -o csv \
        >"$dir/smoke.log" 2>&1 || rc=$?
    case $rc in
    0) SMOKE_WHY=""; return 0 ;;
    124) SMOKE_WHY="timed out after 300 s" ;;
    *) if [ "$rc" -gt 128 ]; then SMOKE_WHY="killed by SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))"
       else SMOKE_WHY="exit status $rc"; fi ;;
    esac
    say "smoke run of $dir/bin/llama-bench failed: $SMOKE_WHY (log: $dir/smoke.log)"
    return 1
}

# record DIR LINE: DIR/bin/build-info.txt, replaced whole (bench scripts may be reading it).
record() {
    echo "$2" >"$1/bin/build-info.txt.tmp"
    mv "$1/bin/build-info.txt.tmp" "$1/bin/build-info.txt"
}

host() { echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(date -u '+%Y-%m-%d')"; }

# 1. The native build.
lock native
fetch_source
SIM=""
[ "${HY_PEER_FORCE_PORTABLE:-0}" = 1 ] && SIM="simulated failure (HY_PEER_FORCE_PORTABLE=1)"
if [ -z "$SIM" ]; then
    have_bins "$NATIVE" || build "$NATIVE" -DGGML_NATIVE=ON
    if smoke "$NATIVE"; then
        record "$NATIVE" "$ORIGIN: native build (GGML_NATIVE=ON, -march=native); smoke run passed on $(host)"
        echo "$NATIVE/bin"
        exit 0
    fi
else
    smoke "$NATIVE" "$SIM" || true
    say "native build: $SMOKE_WHY"
fi
NATIVE_WHY=$SMOKE_WHY
lock portable   # reopening fd 9 drops the native lock

# 2. Portable builds: GGML_NATIVE=OFF, every instruction-set option set explicitly from the flags.
FLAGS=" ${HY_PEER_CPU_FLAGS:-$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)} "
[ -n "${HY_PEER_CPU_FLAGS:-}" ] && say "using HY_PEER_CPU_FLAGS instead of /proc/cpuinfo: $HY_PEER_CPU_FLAGS"
has() { local f; for f in "$@"; do [[ $FLAGS == *" $f "* ]] || return 1; done; }
# The CMake options of ggml/CMakeLists.txt in this version, in the order the ladder drops them.
declare -A ON=()
has sse4_2 && ON[GGML_SSE42]=1
has avx && ON[GGML_AVX]=1
has avx avx2 && ON[GGML_AVX2]=1
has avx fma && ON[GGML_FMA]=1
has avx f16c && ON[GGML_F16C]=1
has bmi2 && ON[GGML_BMI2]=1
has avx2 avx_vnni && ON[GGML_AVX_VNNI]=1
# GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw: all five needed.
if has avx512f avx512cd avx512vl avx512dq avx512bw; then
    ON[GGML_AVX512]=1
    has avx512vbmi && ON[GGML_AVX512_VBMI]=1
    has avx512_vnni && ON[GGML_AVX512_VNNI]=1
    has avx512_bf16 && ON[GGML_AVX512_BF16]=1
fi
if has amx_tile; then
    ON[GGML_AMX_TILE]=1
    has amx_int8 && ON[GGML_AMX_INT8]=1
    has amx_bf16 && ON[GGML_AMX_BF16]=1
fi
ALL="GGML_SSE42 GGML_AVX GGML_AVX2 GGML_FMA GGML_F16C GGML_BMI2 GGML_AVX_VNNI GGML_AVX512
     GGML_AVX512_VBMI GGML_AVX512_VNNI GGML_AVX512_BF16 GGML_AMX_TILE GGML_AMX_INT8 GGML_AMX_BF16"
LADDER=("" "GGML_AMX_TILE GGML_AMX_INT8 GGML_AMX_BF16"
        "GGML_AVX512 GGML_AVX512_VBMI GGML_AVX512_VNNI GGML_AVX512_BF16" "GGML_AVX_VNNI"
        "GGML_AVX2 GGML_FMA GGML_F16C GGML_BMI2" "GGML_AVX")
PREV="-"
TRIED=""
for drop in "${LADDER[@]}"; do
    for o in $drop; do unset "ON[$o]"; done
    opts=(-DGGML_NATIVE=OFF)
    enabled=""
    for o in $ALL; do
        if [ -n "${ON[$o]:-}" ]; then opts+=("-D$o=ON"); enabled+=" ${o#GGML_}"; else opts+=("-D$o=OFF"); fi
    done
    enabled=${enabled# }
    [ "$enabled" = "$PREV" ] && continue
    PREV=$enabled
    # Rebuild only when the options changed (only ggml-cpu recompiles when just these change).
    if ! have_bins "$PORTABLE" || [ "$(cat "$PORTABLE/hy-options.txt" 2>/dev/null)" != "${opts[*]}" ]; then
        rm -f "$PORTABLE/hy-options.txt"
        build "$PORTABLE" "${opts[@]}"
        echo "${opts[*]}" >"$PORTABLE/hy-options.txt"
    fi
    if smoke "$PORTABLE"; then
        record "$PORTABLE" "$ORIGIN: portable build (GGML_NATIVE=OFF; ${enabled:-no x86 extensions}) because the native build's smoke run failed ($NATIVE_WHY)${TRIED:+; portable builds with more extensions failed:$TRIED}; smoke run passed on $(host)"
        say "using the portable build: ${enabled:-no x86 extensions}"
        echo "$PORTABLE/bin"
        exit 0
    fi
    TRIED+=" [${enabled}: $SMOKE_WHY]"
done
say "no build of llama.cpp runs on this host (native: $NATIVE_WHY;$TRIED)"
exit 1
