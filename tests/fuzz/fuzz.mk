# tests/fuzz/fuzz.mk - libFuzzer targets (tests/fuzz/fuzz_*.c), included by the top Makefile.
# clang -fsanitize=fuzzer,address,undefined builds them into $(FUZZ_BUILD) and $(FUZZ_BIN), never
# build/ or bin/. gcc builds engine/quant*.c and engine/be_cpu*.c (uninstrumented): clang 14
# rejects their per-function targets and __builtin_cpu_supports("f16c"). Runs read the committed seeds (tests/fuzz/corpus/<target>, never written to) and keep
# what they find, and any crash, under $(FUZZ_BUILD)/run/<target>/; nothing is merged back.
#   make fuzz [FUZZ_S=60] [FUZZ_TARGETS="gguf request"]   each target FUZZ_S seconds
#   make test-fuzz                                        each target 30 s (part of the test run)
#   make fuzz-build                                       only build bin-fuzz/fuzz_<target>
# A run fails on any crash, leak, sanitizer report, timeout (an input over 10 s) or OOM, and
# prints the executions each target reached.

FUZZ_CC      ?= $(or $(shell command -v clang 2>/dev/null),$(shell command -v clang-14 2>/dev/null),clang)
FUZZ_QCC     ?= gcc
FUZZ_BUILD   ?= build-fuzz
FUZZ_BIN     ?= bin-fuzz
FUZZ_S       ?= 60
FUZZ_TARGETS ?= gguf adapter request tokenizer grammar
# Extra libFuzzer flags, e.g. FUZZ_FLAGS=-jobs=2
FUZZ_FLAGS   ?=

FUZZ_SAN    := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# Library code from other rooms is compiled without -Werror (clang may warn where gcc does not);
# the fuzz targets themselves are held to -Werror.
FUZZ_CFLAGS := -g -O1 -std=c11 -D_GNU_SOURCE -pthread -fno-strict-aliasing -Wall -Wextra \
  -Wno-unused-parameter -I. -MMD -MP $(FUZZ_SAN) -fsanitize=fuzzer-no-link \
  -fsanitize-coverage-ignorelist=tests/fuzz/cov_ignore.txt
FUZZ_QFLAGS := -O2 -g -std=c11 -D_GNU_SOURCE -pthread -fno-strict-aliasing -I. -MMD -MP
FUZZ_LDLIBS := -ljansson -lcurl -lcrypto -lm -lpthread

FUZZ_Q_C    := $(wildcard engine/quant*.c engine/be_cpu*.c)
FUZZ_LIB_C  := $(filter-out $(FUZZ_Q_C),$(wildcard engine/*.c adapters/*.c api/*.c))
FUZZ_LIB_O  := $(FUZZ_LIB_C:%.c=$(FUZZ_BUILD)/%.o)
FUZZ_Q_O    := $(FUZZ_Q_C:%.c=$(FUZZ_BUILD)/gcc/%.o)
FUZZ_LIB    := $(FUZZ_BUILD)/libhydrad-fuzz.a
FUZZ_EXES   := $(FUZZ_TARGETS:%=$(FUZZ_BIN)/fuzz_%)
FUZZ_MODEL  ?= $(MODEL)

.PHONY: fuzz test-fuzz fuzz-build fuzz-clean
fuzz-build: $(FUZZ_EXES)

$(FUZZ_LIB_O): $(FUZZ_BUILD)/%.o: %.c tests/fuzz/cov_ignore.txt
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@
$(FUZZ_Q_O): $(FUZZ_BUILD)/gcc/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_QCC) $(FUZZ_QFLAGS) -c $< -o $@
# Both output trees ignore themselves, so git status stays clean without a .gitignore entry.
$(FUZZ_LIB): $(FUZZ_LIB_O) $(FUZZ_Q_O)
	echo '*' > $(FUZZ_BUILD)/.gitignore
	rm -f $@ && ar rcs $@ $^
$(FUZZ_BUILD)/tests/fuzz/%.o: tests/fuzz/%.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Werror -c $< -o $@
$(FUZZ_BIN)/fuzz_%: $(FUZZ_BUILD)/tests/fuzz/fuzz_%.o $(FUZZ_LIB)
	@mkdir -p $(dir $@) && echo '*' > $(dir $@).gitignore
	$(FUZZ_CC) -fsanitize=fuzzer,address,undefined $^ $(FUZZ_LDLIBS) -o $@

# One target for $(1) seconds: new inputs go to the run's own corpus (first directory), the
# committed seeds are only read. The summary line is what the make output keeps.
define fuzz_run
	@set -e; ok=1; for t in $(FUZZ_TARGETS); do \
	  d=$(FUZZ_BUILD)/run/$$t; mkdir -p $$d/corpus $$d/artifacts; \
	  echo "== fuzz_$$t: $(1) s (log $$d/log)"; \
	  dict=; [ -f tests/fuzz/$$t.dict ] && dict=-dict=tests/fuzz/$$t.dict; \
	  if HY_MODEL=$(FUZZ_MODEL) $(FUZZ_BIN)/fuzz_$$t -max_total_time=$(1) -timeout=10 \
	       -print_final_stats=1 -artifact_prefix=$$d/artifacts/ $$dict $(FUZZ_FLAGS) \
	       $$d/corpus tests/fuzz/corpus/$$t > $$d/log 2>&1; then st=ok; else st=FAILED; ok=0; fi; \
	  ex=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$d/log | tail -1); \
	  ps=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$d/log | tail -1); \
	  echo "fuzz_$$t: $$st, $${ex:-?} executions in $(1) s ($${ps:-?} exec/s)"; \
	  if [ $$st = FAILED ]; then grep -m1 -A30 -E '^==[0-9]+==ERROR|runtime error|^SUMMARY|ERROR: libFuzzer' $$d/log || tail -30 $$d/log; \
	    ls $$d/artifacts; fi; \
	done; [ $$ok = 1 ]
endef

fuzz: $(FUZZ_EXES)
	$(call fuzz_run,$(FUZZ_S))
test-fuzz: $(FUZZ_EXES)
	$(call fuzz_run,30)

fuzz-clean:
	rm -rf $(FUZZ_BUILD) $(FUZZ_BIN)

-include $(shell find $(FUZZ_BUILD) -name '*.d' 2>/dev/null)
