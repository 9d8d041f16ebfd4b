/* cuda_runtime_api.h - stand-in for the CUDA toolkit header under the CPU emulator (tests/cuda_emu/): everything
 * the emulated kernels may use is declared in emu.h, so this only includes it. */
#include "../emu.h"
