// The retention kernels compiled as host code (see emu.h): every kernel of mixers/backends/cupy/*.cu
// becomes an extern "C" function with the kernel's own name and parameters, which runs the kernel on
// the grid set by emu_configure() and returns 0, or 1 with the reason in emu_last_error().
#define SEQMIXERS_CUDA_EMULATION 1
#include "retention_chunk_mma.cu"
#include "retention_chunk_simt.cu"
#include "retention_recurrent.cu"
