// Host emulation of the slice of the CUDA runtime API and device language that the CUDA twins
// (csrc/cuda/*.cu) use, so that the SAME sources can be compiled by the C++ compiler and run
// on the CPU (the extension mia_core._cuda_emu, built everywhere). It exists to test the
// twins without a GPU: their index arithmetic, grid-stride loops, dtype and variant dispatch,
// the first-bad-element reports, descriptor buffers, allocation fallbacks and error paths.
//
// Execution model: a launch runs every thread of every block to completion, one after the
// other, on the calling thread (blockIdx / threadIdx are set before each call; the thread
// order is forward or reversed, see configure()). That is a valid schedule of a CUDA grid
// only for kernels whose threads never wait for each other, which is what the twins are
// (grid-stride loops, one owner per output element, atomics for reductions). A kernel that
// needs __syncthreads, shared memory or warp intrinsics does not compile here, on purpose.
//
// What this cannot show: device code generation (nvcc's), the device's libm (logf differs
// from glibc's by an ulp or so), real concurrency, memory spaces (pointers here are host
// pointers), streams (work runs at once; a stream is only recorded) and timing. Those need
// the needs_cuda tests (tests/kernels/test_cuda.py) on a real GPU.
//
// Names mimic CUDA's (some begin with "__", as CUDA's do); this header is only ever compiled
// with MIAFW_CUDA_EMULATION defined, in csrc/cuda_emu/*.cpp.

#pragma once

#include <math.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if !defined(MIAFW_CUDA_EMULATION)
#error "host_cuda.h is the CUDA host emulation: compile with MIAFW_CUDA_EMULATION"
#endif
#if defined(__CUDACC__)
#error "host_cuda.h must not be compiled by nvcc"
#endif

// ------------------------------------------------------------------ device language keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Built-in variables: set by the emulated launch before each thread runs.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// Correctly rounded arithmetic intrinsics: plain IEEE operations (the emulation is compiled
// with -ffp-contract=off, so nothing fuses them).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

// Sequential execution makes every atomic trivially atomic.
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long val) {
  const unsigned long long old = *address;
  if (val < old) *address = val;
  return old;
}

// ------------------------------------------------------------------------------ runtime API

// The error codes the twins can meet, with CUDA's numeric values.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace miafw {
namespace cuda_emu {

// Thread order within a launch.
enum class Order { forward = 0, reverse = 1 };

// Emulated device and fault injection (configure()), and what happened (stats()).
struct State {
  // device
  int multiprocessors = 2;       // small: even modest sizes need several grid-stride rounds
  bool malloc_async = true;      // false: cudaMallocAsync fails with cudaErrorNotSupported
  Order order = Order::forward;
  cudaError_t fail_next_launch = cudaSuccess;  // injected as the next launch's error
  cudaError_t fail_next_malloc = cudaSuccess;  // injected into the next allocation
  // sticky-free "last error" (what cudaGetLastError returns and clears)
  cudaError_t last_error = cudaSuccess;
  // record
  int64_t launches = 0;
  std::string last_kernel;
  int64_t last_blocks = 0;
  int64_t last_threads = 0;
  uintptr_t last_stream = 0;
  int64_t live_allocations = 0;
  int64_t pooled_allocations = 0;  // through cudaMallocAsync
  int64_t synchronizations = 0;
  int64_t threads_run = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline cudaError_t fail(cudaError_t e) {
  state().last_error = e;
  return e;
}

}  // namespace cuda_emu
}  // namespace miafw

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

inline cudaError_t cudaGetLastError() {
  auto& s = miafw::cuda_emu::state();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) {
    return miafw::cuda_emu::fail(cudaErrorInvalidValue);
  }
  *value = miafw::cuda_emu::state().multiprocessors;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  auto& s = miafw::cuda_emu::state();
  if (s.fail_next_malloc != cudaSuccess) {
    const cudaError_t e = s.fail_next_malloc;
    s.fail_next_malloc = cudaSuccess;
    return miafw::cuda_emu::fail(e);
  }
  *ptr = std::malloc(bytes ? bytes : 1);
  if (*ptr == nullptr) return miafw::cuda_emu::fail(cudaErrorMemoryAllocation);
  ++s.live_allocations;
  return cudaSuccess;
}

inline cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream) {
  auto& s = miafw::cuda_emu::state();
  s.last_stream = reinterpret_cast<uintptr_t>(stream);
  if (!s.malloc_async) return miafw::cuda_emu::fail(cudaErrorNotSupported);
  const cudaError_t e = cudaMalloc(ptr, bytes);
  if (e == cudaSuccess) ++s.pooled_allocations;
  return e;
}

inline cudaError_t cudaFree(void* ptr) {
  if (ptr != nullptr) {
    std::free(ptr);
    --miafw::cuda_emu::state().live_allocations;
  }
  return cudaSuccess;
}

inline cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  miafw::cuda_emu::state().last_stream = reinterpret_cast<uintptr_t>(stream);
  return cudaFree(ptr);
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t stream) {
  miafw::cuda_emu::state().last_stream = reinterpret_cast<uintptr_t>(stream);
  if (bytes) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  auto& s = miafw::cuda_emu::state();
  s.last_stream = reinterpret_cast<uintptr_t>(stream);
  ++s.synchronizations;
  return cudaSuccess;
}

namespace miafw {
namespace cuda_emu {

// kernel<<<blocks, threads, 0, stream>>>(args...): checks the configuration as the device
// would (at most 1024 threads per block, 2^31 - 1 blocks), records the launch, then runs the
// whole grid. Errors land in the last error, to be read by cudaGetLastError as after a real
// launch.
template <typename... Params, typename... Args>
void run_grid(const char* name, void (*kernel)(Params...), int64_t blocks, int64_t threads,
              cudaStream_t stream, Args... args) {
  State& s = state();
  ++s.launches;
  s.last_kernel = name;
  s.last_blocks = blocks;
  s.last_threads = threads;
  s.last_stream = reinterpret_cast<uintptr_t>(stream);
  if (blocks < 1 || blocks > 2147483647 || threads < 1 || threads > 1024) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  if (s.fail_next_launch != cudaSuccess) {
    fail(s.fail_next_launch);
    s.fail_next_launch = cudaSuccess;
    return;
  }
  gridDim = dim3(static_cast<unsigned>(blocks));
  blockDim = dim3(static_cast<unsigned>(threads));
  const int64_t total = blocks * threads;
  for (int64_t k = 0; k < total; ++k) {
    const int64_t g = s.order == Order::forward ? k : total - 1 - k;
    blockIdx = uint3{static_cast<unsigned>(g / threads), 0, 0};
    threadIdx = uint3{static_cast<unsigned>(g % threads), 0, 0};
    kernel(args...);
  }
  s.threads_run += total;
}

}  // namespace cuda_emu
}  // namespace miafw
