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
# Helper programs the end-to-end tests drive (tests/tool_*.c), e.g. grammar masks for llguidance.
TOOLS   := $(patsubst tests/%.c,$(BIN)/tests/%,$(wildcard tests/tool_*.c))
BENCH_C := $(wildcard bench/*.c)

.PHONY: train train-goldens fixtures all test test-c test-py run bench bench-cpu bench-adapters bench-serve bench-streams bench-prefix bench-perplexity asan clean setup
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

# Every C test binary, the fault-injection loop (tests/fault), then the Python end-to-end tests,
# then the CUDA backend's op and model tests with its kernels run by the CPU emulator
# (tests/cuda_emu: logic only; the real GPU run is scripts/gpu-check.sh), then each fuzz target for
# 30 s (tests/fuzz) and the 180-second sanitizer soak (tests/soak). HY_MODEL points tests at the model.
test: setup
	$(MAKE) all $(TESTS) $(TOOLS) $(GPU_BENCH) fixtures
	$(MAKE) test-c test-fault test-py
	$(MAKE) test-emu
	$(MAKE) test-fuzz test-soak

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
# hydrad perplexity vs llama-perplexity (PPL within 1%, tokens/s); not part of `make bench` (~15 min)
bench-perplexity: setup all
	bash bench/bench_perplexity.sh
bench-prefix: setup all
	bash bench/bench_prefix.sh

# ASan + UBSan build of the library and C tests, in its own tree, then run them (test_trained on one
# held-out prompt per task, test_gram on one random walk per grammar: there the point is memory
# safety, and the full checks take ~30 min).
# (-O1 makes gcc's maybe-uninitialized analysis report false positives; the -O2 build keeps it.)
asan: setup
	HY_TRAINED_PROMPTS=1 HY_GRAM_WALKS=1 $(MAKE) BUILD=build-asan BIN=bin-asan NO_CUDA=1 \
	  EXTRA_CFLAGS="-O1 -Wno-maybe-uninitialized -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  EXTRA_LDFLAGS="-fsanitize=address,undefined" test-c test-fault

# The trained demo adapters (off CI; ~30 min on 2 cores): a venv of its own with torch, transformers
# and PEFT (scripts/requirements-train.txt, several GB), both adapters trained side by side on one
# thread each, then the training framework's goldens and the loss plot. Commit what it rewrites
# under tests/fixtures/adapters/trained and tests/golden/trained.
TRAIN_PY := .venv-train/bin/python
TRAINED  := tests/fixtures/adapters/trained
.venv-train/.ok: scripts/requirements-train.txt
	python3 -m venv .venv-train
	.venv-train/bin/pip install -q -r scripts/requirements-train.txt
	touch $@
train: setup .venv-train/.ok
	$(TRAIN_PY) scripts/train_hydralora.py --kind hydra --out $(TRAINED)/hydra --threads 1 & \
	$(TRAIN_PY) scripts/train_hydralora.py --kind lora --out $(TRAINED)/lora --threads 1 & wait
	$(MAKE) train-goldens
train-goldens: .venv-train/.ok
	$(TRAIN_PY) scripts/gen_golden_trained.py
	$(TRAIN_PY) scripts/plot_training.py

clean:
	rm -rf build build-asan bin bin-asan

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# Proof-at-depth pieces, each in its own fragment: fuzzing (tests/fuzz), the sanitizer soak
# (tests/soak), fault injection (tests/fault).
-include tests/fuzz/fuzz.mk tests/soak/soak.mk tests/fault/fault.mk

# ---- CUDA emulator (tests/cuda_emu/): the real kernels/*.cu run on the CPU, for machines without a
# GPU. tests/cuda_emu/cudapp.py rewrites each kernels/ file (launches, __shared__) into
# $(EMU_BUILD)/kernels/, g++ compiles it with tests/cuda_emu/emu.h force-included, and the library's
# C files (built again with -DHY_HAVE_CUDA) plus tests/cuda_emu/emu_runtime.cpp (our cuda*/cublas*,
# no libcudart) link into $(EMU_BIN)/tests/test_backend_ops and test_cuda_model. Logic only: the real
# GPU runs (scripts/gpu-check.sh) stay the final word. Needs neither nvcc nor the CUDA toolkit.
#   make test-emu                                  op tests (~10 s) + the whole-model test (~3.5 min)
#   make test-emu-ops                              op tests only
#   make test-emu EMU_KERNELS=/tmp/copy/kernels    the same on a scratch copy of kernels/
#     (use EMU_BUILD=/tmp/emu-b EMU_BIN=/tmp/emu-x as well so the normal outputs are left alone)
EMU_KERNELS ?= kernels
EMU_BUILD   ?= $(BUILD)/emu
EMU_BIN     ?= $(BIN)/emu
EMU_CXX     ?= g++
EMU_PY      ?= python3
EMU_DIR     := tests/cuda_emu
EMU_CFLAGS  := -O2 -g -std=c11 -D_GNU_SOURCE -pthread -fno-strict-aliasing $(WARN) -I. -MMD -MP -DHY_HAVE_CUDA
EMU_CXXFLAGS := -O2 -g -std=c++17 -pthread -fno-strict-aliasing -Wall -Wno-unused-parameter \
  -Wno-unknown-pragmas -Wno-unused-function -I$(EMU_BUILD) -I. -I$(EMU_DIR)/include \
  -include $(EMU_DIR)/emu.h -MMD -MP
EMU_LIB_C   := $(filter-out server/main.c, $(wildcard engine/*.c adapters/*.c api/*.c server/*.c)) \
  $(wildcard $(EMU_KERNELS)/*.c)
EMU_CU      := $(notdir $(wildcard $(EMU_KERNELS)/*.cu))
EMU_HDRS    := $(addprefix $(EMU_BUILD)/kernels/,$(notdir $(wildcard $(EMU_KERNELS)/*.h $(EMU_KERNELS)/*.cuh)))
EMU_KOBJ    := $(EMU_CU:%.cu=$(EMU_BUILD)/kernels/%.o)
EMU_OBJ     := $(patsubst %.c,$(EMU_BUILD)/c/%.o,$(EMU_LIB_C)) $(EMU_KOBJ) $(EMU_BUILD)/emu_runtime.o
EMU_TESTS   := $(EMU_BIN)/tests/test_backend_ops $(EMU_BIN)/tests/test_cuda_model
EMU_LDLIBS  := -lmicrohttpd -ljansson -lcurl -lcrypto -lm -lcmocka
# test_cuda_model on 2 CPU cores: 2 of the 30 layers, 64 tokens of the one-sequence test and 8 decode
# steps of the 64-sequence test
EMU_MODEL_ENV ?= HY_TEST_LAYERS=2 HY_TEST_DECODE_STEPS=8 HY_TEST_TOKENS=64

.PHONY: test-emu test-emu-ops test-emu-asan emu
emu: $(EMU_TESTS)

$(EMU_BUILD)/kernels/%.cpp: $(EMU_KERNELS)/%.cu $(EMU_DIR)/cudapp.py
	@mkdir -p $(dir $@)
	$(EMU_PY) $(EMU_DIR)/cudapp.py $< $@ --name $<
$(EMU_BUILD)/kernels/%.h: $(EMU_KERNELS)/%.h $(EMU_DIR)/cudapp.py
	@mkdir -p $(dir $@)
	$(EMU_PY) $(EMU_DIR)/cudapp.py $< $@ --name $<
$(EMU_BUILD)/kernels/%.cuh: $(EMU_KERNELS)/%.cuh $(EMU_DIR)/cudapp.py
	@mkdir -p $(dir $@)
	$(EMU_PY) $(EMU_DIR)/cudapp.py $< $@ --name $<
$(EMU_BUILD)/kernels/%.o: $(EMU_BUILD)/kernels/%.cpp $(EMU_HDRS) $(EMU_DIR)/emu.h
	$(EMU_CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(EMU_BUILD)/emu_runtime.o: $(EMU_DIR)/emu_runtime.cpp $(EMU_DIR)/emu.h
	@mkdir -p $(dir $@)
	$(EMU_CXX) -O3 $(filter-out -O2 -include $(EMU_DIR)/emu.h,$(EMU_CXXFLAGS)) -c $< -o $@
$(EMU_BUILD)/c/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(EMU_CFLAGS) -c $< -o $@
$(EMU_BIN)/tests/%: $(EMU_BUILD)/c/tests/%.o $(EMU_OBJ)
	@mkdir -p $(dir $@)
	$(EMU_CXX) -pthread $^ $(EMU_LDLIBS) -o $@

test-emu-ops: $(EMU_BIN)/tests/test_backend_ops
	@echo "== CUDA emulator (CPU): kernels/ logic only; the real GPU runs are the final word"
	$(EMU_BIN)/tests/test_backend_ops
test-emu: test-emu-ops $(EMU_BIN)/tests/test_cuda_model
	$(EMU_MODEL_ENV) $(EMU_BIN)/tests/test_cuda_model

# The emulator's op tests under AddressSanitizer (out-of-bounds kernel or host accesses; not in
# `make test`: a few minutes more). A build of its own in build/emu-asan.
test-emu-asan:
	$(MAKE) EMU_BUILD=$(BUILD)/emu-asan EMU_BIN=$(BIN)/emu-asan EMU_CXX="$(EMU_CXX) -fsanitize=address" \
	  CC="$(CC) -fsanitize=address" EMU_CFLAGS="$(filter-out -O2 $(WARN),$(EMU_CFLAGS)) -O1" \
	  $(BIN)/emu-asan/tests/test_backend_ops
	ASAN_OPTIONS=detect_leaks=0 $(BIN)/emu-asan/tests/test_backend_ops

-include $(shell find $(EMU_BUILD) -name '*.d' 2>/dev/null)

# ---- the web console (server/ui/, served at / by server/srv_ui.c): scripts/embed_ui.sh writes its
# files into a C header of byte arrays (POSIX sh + od: no Node, no network). The header sits at a
# fixed path under build/ so every build flavour (BUILD=..., the emulator, ASan) finds it through -I.
UI_FILES := $(sort $(wildcard server/ui/*.html server/ui/*.css server/ui/*.js server/ui/*.svg))
UI_GEN   := build/ui/srv_ui_files.h
$(UI_GEN): $(UI_FILES) scripts/embed_ui.sh
	@mkdir -p $(dir $@)
	sh scripts/embed_ui.sh $@ $(UI_FILES)
$(BUILD)/server/srv_ui.o $(EMU_BUILD)/c/server/srv_ui.o: $(UI_GEN)
