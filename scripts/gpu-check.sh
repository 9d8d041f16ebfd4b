#!/usr/bin/env bash
# gpu-check.sh - the one prepared script for a lent GPU machine (DESIGN.md section 9): build
# with nvcc, run the CUDA-vs-CPU op tests and the whole-model CUDA-vs-CPU test, then the GPU
# benchmark table (tests/gpu_bench.c). Every input is generated here; nothing large travels.
# Budget: under 8 minutes on one H100. Exit status: 0 only if both tests passed.
# GPU_CHECK_NO_BUILD=1 skips `make` (binaries built elsewhere and carried along).
set -uo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
CUDA_HOME=${CUDA_HOME:-${NVCC%/bin/nvcc}}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not available)"
[ -n "$NVCC" ] && "$NVCC" --version | tail -1

# The GPU machine has no cmocka: carry its shared library in bin/lib (ignored path), e.g.
#   mkdir -p bin/lib && cp -L /usr/lib/x86_64-linux-gnu/libcmocka.so.0 bin/lib/
# and name bin/lib in the run's carry list together with the binaries.
if [ -d bin/lib ]; then
    export LD_LIBRARY_PATH="$PWD/bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

status=0
if [ -z "${GPU_CHECK_NO_BUILD:-}" ]; then
    stamp "build (make -j16)"
    if [ -z "$NVCC" ]; then
        echo "nvcc not found: the CUDA backend cannot be built here"; exit 2
    fi
    # the library and our binaries first; the rest of `make` (server, bench) must not block us
    make -j16 build/libhydrad.a bin/tests/test_backend_ops bin/tests/test_cuda_model 2>&1 | tail -3
    make -j16 -k >/dev/null 2>&1 || echo "(note: plain 'make' did not finish; not needed here)"
fi
if [ ! -x bin/gpu_bench ] || [ tests/gpu_bench.c -nt bin/gpu_bench ] || [ build/libhydrad.a -nt bin/gpu_bench ]; then
    ${CC:-cc} -O2 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -I. -I"$CUDA_HOME/include" \
        tests/gpu_bench.c build/libhydrad.a -L"$CUDA_HOME/lib64" -Wl,-rpath,"$CUDA_HOME/lib64" \
        -lcublas -lcudart_static -ldl -lrt -lstdc++ -lm -pthread -o bin/gpu_bench || status=1
fi
for b in bin/tests/test_backend_ops bin/tests/test_cuda_model bin/gpu_bench; do
    if [ ! -x "$b" ]; then echo "missing $b (build failed)"; exit 1; fi
    if ldd "$b" | grep -q "not found"; then echo "$b: missing shared libraries:"; ldd "$b" | grep "not found"; fi
done

stamp "test_backend_ops (every op, CUDA vs CPU)"
timeout 240 bin/tests/test_backend_ops || { echo "test_backend_ops FAILED (rc $?)"; status=1; }

stamp "test_cuda_model (SmolLM2-135M shape, Q4_1, CUDA vs CPU)"
timeout 300 bin/tests/test_cuda_model || { echo "test_cuda_model FAILED (rc $?)"; status=1; }

stamp "gpu_bench (llama-1b shape, Q4_1)"
timeout 240 bin/gpu_bench --ctx 512 || { echo "gpu_bench FAILED (rc $?)"; status=1; }

stamp "gpu_bench again without CUDA graphs (HY_CUDA_GRAPHS=0: every op launched one by one), for comparison"
HY_CUDA_GRAPHS=0 timeout 120 bin/gpu_bench --ctx 512 | sed -n '/^decode step/,/^$/p;/^batch 64 decode/,/^$/p' ||
    echo "(no-graph comparison run failed)"

stamp "gpu_bench again with the first mat-vec kernel (HY_CUDA_MV_LEGACY=1), for comparison"
HY_CUDA_MV_LEGACY=1 timeout 120 bin/gpu_bench --ctx 512 | sed -n '/^decode step/,/^$/p;/^matmul alone/,/^$/p' ||
    echo "(legacy comparison run failed)"

stamp "generate and serve with --device cuda (scripts/gpu-serve-check.sh)"
timeout 120 bash scripts/gpu-serve-check.sh || { echo "gpu-serve-check FAILED"; status=1; }

stamp "done, status $status"
exit $status
