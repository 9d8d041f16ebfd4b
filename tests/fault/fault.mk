# tests/fault/fault.mk - fault injection (tests/fault/fault.h): tests/fault/test_fault is linked with
# -Wl,--wrap=SYMBOL for the allocation, file and library calls hydrad's loaders, downloader and
# request path make, so the Nth of them fails on purpose. Included by the top-level Makefile.
#   make test-fault                                   normal build (BUILD/BIN as the caller sets)
#   make BUILD=build-asan BIN=bin-asan NO_CUDA=1 EXTRA_CFLAGS=... EXTRA_LDFLAGS=... test-fault
#                                                     the same loop under ASan/LSan
#   make test-fault-emu                               the CUDA backend's calls too (FAULT_CUDA), with
#                                                     its kernels on the CPU emulator (tests/cuda_emu)
# HY_FAULT_MAX bounds the attempts per operation (default 400: every call when there are fewer,
# else every stride-th); HY_FAULT_VERBOSE=1 names the caller of each fault an operation absorbs.

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

# ---- the emulator build: the C library built again with -DHY_HAVE_CUDA (test_fault.c then adds its
# CUDA case), kernels/ through tests/cuda_emu, and the CUDA runtime / cuBLAS calls wrapped as well.
# The emulator's functions are C++, so these are its mangled names (nm $(EMU_BUILD)/emu_runtime.o);
# tests/fault/fault_cuda.c defines the wrappers. The EMU_* variables are set after this file is
# included, so the recipe (expanded when it runs) names the objects, not the prerequisites.
FAULT_CUDA_WRAP := _Z10cudaMallocPPvm _Z13cudaHostAllocPPvmj _Z14cudaMallocHostPPvm \
  _Z10cudaMemcpyPvPKvm14cudaMemcpyKind _Z15cudaMemcpyAsyncPvPKvm14cudaMemcpyKindP10emu_stream \
  _Z10cudaMemsetPvim _Z15cudaMemsetAsyncPvimP10emu_stream _Z25cudaStreamCreateWithFlagsPP10emu_streamj \
  _Z16cudaStreamCreatePP10emu_stream _Z24cudaEventCreateWithFlagsPP9emu_eventj _Z15cudaEventCreatePP9emu_event \
  _Z15cudaEventRecordP9emu_eventP10emu_stream _Z21cudaStreamSynchronizeP10emu_stream \
  _Z20cudaEventSynchronizeP9emu_event _Z19cudaStreamWaitEventP10emu_streamP9emu_eventj \
  _Z20cudaGraphInstantiatePP16emu_graph_exec_tP11emu_graph_ty _Z15cudaGraphLaunchP16emu_graph_exec_tP10emu_stream \
  _Z22cudaStreamBeginCaptureP10emu_stream21cudaStreamCaptureMode _Z20cudaStreamEndCaptureP10emu_streamPP11emu_graph_t \
  _Z13cudaSetDevicei _Z18cudaGetDeviceCountPi _Z23cudaGetDevicePropertiesP14cudaDevicePropi \
  _Z20cudaFuncSetAttributePKv17cudaFuncAttributei _Z16cudaGetLastErrorv _Z12cublasCreatePP8emu_blas \
  _Z15cublasSetStreamP8emu_blasP10emu_stream _Z17cublasSetMathModeP8emu_blas12cublasMath_t \
  _Z12cublasGemmExP8emu_blas17cublasOperation_tS1_iiiPKvS3_14cudaDataType_tiS3_S4_iS3_PvS4_i19cublasComputeType_t16cublasGemmAlgo_t
FAULT_EMU_OBJ = $(addprefix $(EMU_BUILD)/c/tests/fault/,test_fault.o fault.o fault_cuda.o)

.PHONY: test-fault-emu
test-fault-emu:
	$(MAKE) $(EMU_OBJ) $(FAULT_EMU_OBJ)
	@mkdir -p $(EMU_BIN)/tests/fault
	$(EMU_CXX) -pthread $(FAULT_LDFLAGS) $(addprefix -Wl$(FAULT_COMMA)--wrap=,$(FAULT_CUDA_WRAP)) \
	  $(FAULT_EMU_OBJ) $(EMU_OBJ) $(EMU_LDLIBS) -o $(EMU_BIN)/tests/fault/test_fault
	@echo "== CUDA emulator (CPU): kernels/ logic only; the real GPU runs are the final word"
	HY_MODEL=$(MODEL) GLIBC_TUNABLES=glibc.malloc.tcache_count=0 $(EMU_BIN)/tests/fault/test_fault
