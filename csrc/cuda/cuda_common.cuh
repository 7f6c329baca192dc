// Internal helpers of the .cu files: the runtime include, launch geometry, the launch itself
// and error strings. Compiled by nvcc, or by the C++ compiler against the host emulation of
// the CUDA runtime (csrc/cuda_emu/host_cuda.h, MIAFW_CUDA_EMULATION), which runs the same
// kernels on the CPU for the tests. The .cu files include this header, never
// <cuda_runtime.h> directly, and launch only through detail::launch (no <<< >>> elsewhere).
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#elif defined(MIAFW_CUDA_EMULATION)
#include "cuda_emu/host_cuda.h"
#else
#error "csrc/cuda/*.cu are compiled by nvcc (MIAFW_CUDA=1) or as C++ with MIAFW_CUDA_EMULATION"
#endif

#include <algorithm>
#include <cstdint>
#include <string>

namespace miafw {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;

inline std::string error_text(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

// Blocks for a grid-stride loop over n elements: enough to fill the device (a few waves of
// resident blocks), never more than the work needs. Returns 0 and sets *err on failure.
inline int64_t grid_for(int64_t n, std::string* err) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) {
    *err = error_text("cudaGetDevice/cudaDeviceGetAttribute", e);
    return 0;
  }
  const int64_t need = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(std::max(sms, 1)) * 8;
  return std::max<int64_t>(1, std::min(need, cap));
}

// "" or the text of the launch error (cudaGetLastError also clears a sticky-free error).
inline std::string launch_status(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return error_text(kernel, e);
  return std::string();
}

// kernel<<<blocks, kThreads, 0, stream>>>(args...), then "" or the launch error's text.
template <typename... Params, typename... Args>
inline std::string launch(const char* name, void (*kernel)(Params...), int64_t blocks,
                          cudaStream_t stream, Args... args) {
#if defined(__CUDACC__)
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
#else
  ::miafw::cuda_emu::run_grid(name, kernel, blocks, kThreads, stream, args...);
#endif
  return launch_status(name);
}

}  // namespace detail
}  // namespace cuda
}  // namespace miafw
