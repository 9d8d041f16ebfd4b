# hydrad - one Makefile. `make` builds bin/hydrad and bin/hydrad-bench (with the CUDA backend
# when nvcc is found); `make test` sets up (scripts/bootstrap.sh) and runs every test.

CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
BUILD   ?= build
BIN     ?= bin
MODEL   ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
PY      := .venv/bin/python

WARN    := -Wall -Wextra -Werror -Wno-unused-parameter
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -pthread -fno-strict-aliasing $(WARN) -I. -MMD -MP $(EXTRA_CFLAGS)
LDFLAGS += -pthread $(EXTRA_LDFLAGS)
LDLIBS  := -lmicrohttpd -ljansson -lcurl -lcrypto -lm

LIB_C   := $(filter-out server/main.c, $(wildcard engine/*.c adapters/*.c api/*.c server/*.c))
ifneq ($(NVCC),)
ifeq ($(NO_CUDA),)
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVFLAGS ?= -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall -I. -MMD -MP
LIB_C   += $(wildcard kernels/*.c)
LIB_CU  := $(wildcard kernels/*.cu)
CFLAGS  += -DHY_HAVE_CUDA -I$(CUDA_HOME)/include
LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart_static -ldl -lrt -lstdc++
endif
endif

LIB_OBJ := $(LIB_C:%.c=$(BUILD)/%.o) $(LIB_CU:%.cu=$(BUILD)/%.cu.o)
LIB     := $(BUILD)/libhydrad.a
TESTS   := $(patsubst tests/%.c,$(BIN)/tests/%,$(wildcard tests/test_*.c))
BENCH_C := $(wildcard bench/*.c)

.PHONY: fixtures all test test-c test-py run bench bench-cpu bench-adapters bench-serve bench-streams asan clean setup
all: $(BIN)/hydrad $(BIN)/hydrad-bench

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BIN)/hydrad: $(BUILD)/server/main.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BIN)/hydrad-bench: $(BENCH_C:%.c=$(BUILD)/%.o) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# GPU timings for scripts/gpu-check.sh: built (not run) by `make test` whenever nvcc exists, so a
# GPU session finds it compiling.
GPU_BENCH := $(if $(LIB_CU),$(BIN)/gpu_bench)
$(BIN)/gpu_bench: $(BUILD)/tests/gpu_bench.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BIN)/tests/%: $(BUILD)/tests/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -lcmocka -o $@

setup:
	bash scripts/bootstrap.sh

# A HydraLoRA test adapter (K 4, r 16, all seven projections) a user can point --adapter at; the
# same argv as "hydra_k4_all" in tests/golden/adapters/adapters.json, so it is that golden adapter.
K4R16 := tests/fixtures/adapters/k4r16
fixtures: $(K4R16)/adapter_model.safetensors
$(K4R16)/adapter_model.safetensors: scripts/make_test_adapter.py
	$(PY) scripts/make_test_adapter.py --out $(K4R16) --seed 13 --r 16 --K 4 --alpha 8 \
	  --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --dtype f16 --base $(MODEL)

# Every C test binary, then the Python end-to-end tests. HY_MODEL points tests at the model.
test: setup
	$(MAKE) all $(TESTS) $(GPU_BENCH) fixtures
	$(MAKE) test-c test-py

test-c: $(TESTS)
	@set -e; for t in $(TESTS); do echo "== $$t"; HY_MODEL=$(MODEL) $$t; done

test-py:
	@if ls tests/e2e/test_*.py >/dev/null 2>&1; then HY_MODEL=$(MODEL) $(PY) -m pytest -q tests/e2e; fi

run: setup all
	bash scripts/run.sh

bench: bench-cpu bench-adapters bench-serve bench-streams
bench-cpu: setup all
	bash bench/bench_cpu.sh
bench-adapters: setup all
	bash bench/bench_adapters.sh
bench-serve: setup all
	bash bench/bench_serve.sh
bench-streams: setup all
	bash bench/bench_streams.sh

# ASan + UBSan build of the library and C tests, in its own tree, then run them.
# (-O1 makes gcc's maybe-uninitialized analysis report false positives; the -O2 build keeps it.)
asan: setup
	$(MAKE) BUILD=build-asan BIN=bin-asan NO_CUDA=1 \
	  EXTRA_CFLAGS="-O1 -Wno-maybe-uninitialized -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  EXTRA_LDFLAGS="-fsanitize=address,undefined" test-c

clean:
	rm -rf build build-asan bin bin-asan

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
