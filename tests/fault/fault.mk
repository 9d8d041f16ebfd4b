# tests/fault/fault.mk - fault injection (tests/fault/fault.h): tests/fault/test_fault is linked with
# -Wl,--wrap=SYMBOL for the allocation, file and library calls hydrad's loaders, downloader and
# request path make, so the Nth of them fails on purpose. Included by the top-level Makefile.
#   make test-fault                                   normal build (BUILD/BIN as the caller sets)
#   make BUILD=build-asan BIN=bin-asan NO_CUDA=1 EXTRA_CFLAGS=... EXTRA_LDFLAGS=... test-fault
#                                                     the same loop under ASan/LSan
# HY_FAULT_MAX bounds the attempts per operation (default 400: every call when there are fewer,
# else every stride-th).

FAULT_WRAP := malloc calloc realloc strdup strndup aligned_alloc posix_memalign \
  open fopen fdopen mkstemps read fread fstat mmap write fwrite fflush fclose rename \
  curl_easy_init curl_easy_perform EVP_MD_CTX_new pthread_create \
  json_loadb json_loads json_dumps json_object json_array json_string json_stringn json_integer \
  json_real json_object_set_new json_array_append_new json_pack json_deep_copy json_copy
FAULT_COMMA := ,
FAULT_LDFLAGS := $(addprefix -Wl$(FAULT_COMMA)--wrap=,$(FAULT_WRAP))
FAULT_TEST := $(BIN)/tests/fault/test_fault

.PHONY: test-fault
$(FAULT_TEST): $(BUILD)/tests/fault/test_fault.o $(BUILD)/tests/fault/fault.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $(FAULT_LDFLAGS) $^ $(LDLIBS) -lcmocka -o $@

test-fault: $(FAULT_TEST)
	@echo "== $(FAULT_TEST)"
	HY_MODEL=$(MODEL) GLIBC_TUNABLES=glibc.malloc.tcache_count=0 $(FAULT_TEST)
