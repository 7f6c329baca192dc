// MIAFW_HD marks a function that both the CPU kernels and their CUDA twins call: under nvcc it
// is compiled for host and device (__host__ __device__); everywhere else (the C++ compiler,
// and the host emulation of the twins, csrc/cuda_emu) it expands to nothing.

#pragma once

#if defined(__CUDACC__)
#define MIAFW_HD __host__ __device__
#else
#define MIAFW_HD
#endif
