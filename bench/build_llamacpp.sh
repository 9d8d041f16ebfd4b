#!/usr/bin/env bash
# build_llamacpp.sh - builds the peer we compare against: llama.cpp as vendored by the
# llama-cpp-python sdist on PyPI (pinned), into bench/.cache/. Used by bench scripts only;
# `make test` never needs it. Prints the directory holding llama-bench / llama-server /
# llama-perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
VER="0.3.36"
CACHE="bench/.cache"
OUT="$CACHE/llama.cpp-$VER/build/bin"
if [ -x "$OUT/llama-bench" ] && [ -x "$OUT/llama-server" ] && [ -x "$OUT/llama-perplexity" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
if [ ! -d "$CACHE/llama.cpp-$VER" ]; then
    echo "build_llamacpp: downloading llama-cpp-python==$VER sdist" >&2
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VER" -d "$CACHE" >&2
    tar xzf "$CACHE/llama_cpp_python-$VER.tar.gz" -C "$CACHE"
    mv "$CACHE/llama_cpp_python-$VER/vendor/llama.cpp" "$CACHE/llama.cpp-$VER"
    rm -rf "$CACHE/llama_cpp_python-$VER" "$CACHE/llama_cpp_python-$VER.tar.gz"
fi
command -v cmake >/dev/null || { echo "build_llamacpp: cmake is required (apt-get install cmake)" >&2; exit 1; }
echo "build_llamacpp: building llama-bench, llama-server and llama-perplexity (a few minutes)" >&2
cmake -S "$CACHE/llama.cpp-$VER" -B "$CACHE/llama.cpp-$VER/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$CACHE/llama.cpp-$VER/build" -j"$(nproc)" --target llama-bench llama-server llama-perplexity >&2
echo "$OUT"
