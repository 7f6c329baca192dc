// Internal helpers of the .cu files (launch geometry, error strings). nvcc only.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace detail
}  // namespace cuda
}  // namespace miafw
