// csrc/cuda/mask.cu compiled by the C++ compiler against the host emulation of the CUDA
// runtime (host_cuda.h), for mia_core._cuda_emu. Nothing here but the include: the emulated
// kernel is the CUDA twin's source, unchanged.
#include "cuda/mask.cu"
