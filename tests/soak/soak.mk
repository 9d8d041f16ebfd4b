# tests/soak/soak.mk - the sanitizer soak (issue 23): hydrad built with ASan + UBSan in a tree of its
# own (tests/soak/build, tests/soak/bin; never build/ or bin/), then tests/soak/soak.py drives it with
# 32 clients and an adapter load/unload loop and checks the pass criteria (its header says which).
#   make soak        SOAK_S seconds (default 3600; off CI)
#   make test-soak   the 180-second version (`make test`)
# Included by the top-level Makefile; uses its PY, MODEL and MAKE.
SOAK_S      ?= 3600
SOAK_BUILD  ?= tests/soak/build
SOAK_BIN    ?= tests/soak/bin
SOAK_ARGS   ?=
SOAK_SAN    := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# The quantized matmul kernels (engine/quant*.c: ~95 % of a forward pass) are built -O2 without
# sanitizers: instrumented at -O1 they make the server ~10x slower (0.5 s a token on the shared
# 2-core VM), too slow for 32 clients to reach steady state in 180 s. They are pure functions of
# their arguments, checked under ASan + UBSan by `make asan` (test_quant, test_model, ...); what
# the soak is for (request, KV, adapter and connection lifetimes) stays instrumented.
SOAK_PLAIN  := $(addprefix $(SOAK_BUILD)/engine/,quant.o quant_avx2.o quant_avx512.o)
$(SOAK_PLAIN): override EXTRA_CFLAGS :=

.PHONY: soak test-soak soak-build
soak-build: setup
	$(MAKE) BUILD=$(SOAK_BUILD) BIN=$(SOAK_BIN) NO_CUDA=1 \
	  EXTRA_CFLAGS="-O1 -Wno-maybe-uninitialized $(SOAK_SAN)" \
	  EXTRA_LDFLAGS="-fsanitize=address,undefined" $(SOAK_BIN)/hydrad

soak: soak-build
	$(PY) tests/soak/soak.py --bin $(SOAK_BIN)/hydrad --model $(MODEL) --seconds $(SOAK_S) $(SOAK_ARGS)

test-soak: soak-build
	$(PY) tests/soak/soak.py --bin $(SOAK_BIN)/hydrad --model $(MODEL) --seconds 180 --short $(SOAK_ARGS)
