// CUDA twin of csrc/kernels/mask.h's apply_masks: multi-tensor in-place mask application in
// ONE launch over device pointers, on a given stream.
//
// Semantics are bit-identical to the CPU kernel (and to torch):
//   * float mask:       w = w * m     (__fmul_rn / __dmul_rn: a plain IEEE multiply, so
//                                      NaN * 0 = NaN, -1 * 0 = -0.0, inf * 0 = NaN)
//   * bool/uint8 mask:  w = m ? w : +0.0  (any nonzero byte keeps; kept bits are unchanged)
//
// Layout: a device buffer holds, for `count` segments, the prefix offsets off[0..count]
// (int64; off[count] = total), the data pointers, the mask pointers and the kinds. Threads
// run a grid-stride loop over the total element count; the segment of an element is found by
// binary search over off (upper_bound - 1, so empty segments are skipped), and only redone
// when a thread's next element leaves its current segment.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace miafw {
namespace cuda {
namespace {

// Last s in [lo, hi] with off[s] <= i (off is non-decreasing, off[lo] <= i < off[count]).
__device__ __forceinline__ int64_t find_segment(const int64_t* __restrict__ off, int64_t lo,
                                                int64_t hi, int64_t i) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (off[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__global__ void apply_masks_kernel(const int64_t* __restrict__ off,
                                   const uint64_t* __restrict__ data,
                                   const uint64_t* __restrict__ mask,
                                   const int32_t* __restrict__ kinds, int64_t count,
                                   int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  int64_t s = find_segment(off, 0, count - 1, i);
  for (; i < total; i += stride) {
    if (i >= off[s + 1]) s = find_segment(off, s + 1, count - 1, i);
    const int64_t j = i - off[s];
    switch (kinds[s]) {
      case kMaskF32Float: {
        float* w = reinterpret_cast<float*>(data[s]);
        const float* m = reinterpret_cast<const float*>(mask[s]);
        w[j] = __fmul_rn(w[j], m[j]);
        break;
      }
      case kMaskF32Bool: {
        float* w = reinterpret_cast<float*>(data[s]);
        const uint8_t* m = reinterpret_cast<const uint8_t*>(mask[s]);
        if (!m[j]) w[j] = 0.0f;
        break;
      }
      case kMaskF64Float: {
        double* w = reinterpret_cast<double*>(data[s]);
        const double* m = reinterpret_cast<const double*>(mask[s]);
        w[j] = __dmul_rn(w[j], m[j]);
        break;
      }
      default: {  // kMaskF64Bool (kinds are checked on the host)
        double* w = reinterpret_cast<double*>(data[s]);
        const uint8_t* m = reinterpret_cast<const uint8_t*>(mask[s]);
        if (!m[j]) w[j] = 0.0;
        break;
      }
    }
  }
}

}  // namespace

std::string apply_masks(const uint64_t* data, const uint64_t* mask, const int64_t* sizes,
                        const int32_t* kinds, int64_t count, uintptr_t stream_handle) {
  if (count < 0) return "apply_masks: negative segment count";
  // Host-side descriptor image: off[count + 1] | data[count] | mask[count] | kinds[count].
  std::vector<int64_t> off(static_cast<size_t>(count) + 1, 0);
  for (int64_t s = 0; s < count; ++s) {
    if (sizes[s] < 0) return "apply_masks: segment " + std::to_string(s) + " has a negative size";
    if (kinds[s] < kMaskF32Float || kinds[s] > kMaskF64Bool) {
      return "apply_masks: segment " + std::to_string(s) + " has an unknown kind " +
             std::to_string(kinds[s]);
    }
    if (sizes[s] > 0 && (data[s] == 0 || mask[s] == 0)) {
      return "apply_masks: segment " + std::to_string(s) + " has a null pointer";
    }
    off[s + 1] = off[s] + sizes[s];
  }
  const int64_t total = off[count];
  if (total == 0) return std::string();  // nothing to do: no allocation, no launch

  const size_t n = static_cast<size_t>(count);
  const size_t bytes = (n + 1) * sizeof(int64_t) + 2 * n * sizeof(uint64_t) + n * sizeof(int32_t);
  std::vector<unsigned char> image(bytes);
  unsigned char* p = image.data();
  std::memcpy(p, off.data(), (n + 1) * sizeof(int64_t));
  std::memcpy(p + (n + 1) * sizeof(int64_t), data, n * sizeof(uint64_t));
  std::memcpy(p + (n + 1) * sizeof(int64_t) + n * sizeof(uint64_t), mask, n * sizeof(uint64_t));
  std::memcpy(p + (n + 1) * sizeof(int64_t) + 2 * n * sizeof(uint64_t), kinds,
              n * sizeof(int32_t));

  std::string err;
  const int64_t blocks = detail::grid_for(total, &err);
  if (!err.empty()) return err;

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  void* dev = nullptr;
  bool pooled = true;
  cudaError_t e = cudaMallocAsync(&dev, bytes, stream);
  if (e == cudaErrorNotSupported) {  // no stream-ordered allocator: plain cudaMalloc
    cudaGetLastError();
    pooled = false;
    e = cudaMalloc(&dev, bytes);
  }
  if (e != cudaSuccess) return detail::error_text("apply_masks: allocating descriptors", e);
  // From pageable memory: returns once `image` has been staged, so it may be freed after.
  e = cudaMemcpyAsync(dev, image.data(), bytes, cudaMemcpyHostToDevice, stream);
  std::string status;
  if (e != cudaSuccess) {
    status = detail::error_text("apply_masks: copying descriptors", e);
  } else {
    const unsigned char* d = static_cast<const unsigned char*>(dev);
    status = detail::launch(
        "apply_masks_kernel", apply_masks_kernel, blocks, stream,
        reinterpret_cast<const int64_t*>(d),
        reinterpret_cast<const uint64_t*>(d + (n + 1) * sizeof(int64_t)),
        reinterpret_cast<const uint64_t*>(d + (n + 1) * sizeof(int64_t) + n * sizeof(uint64_t)),
        reinterpret_cast<const int32_t*>(d + (n + 1) * sizeof(int64_t) + 2 * n * sizeof(uint64_t)),
        static_cast<int64_t>(count), total);
  }
  if (pooled) {
    e = cudaFreeAsync(dev, stream);  // stream-ordered: after the kernel
  } else {
    e = cudaStreamSynchronize(stream);  // the kernel must finish before a plain free
    const cudaError_t f = cudaFree(dev);
    if (e == cudaSuccess) e = f;
  }
  if (status.empty() && e != cudaSuccess) status = detail::error_text("apply_masks: freeing descriptors", e);
  return status;
}

}  // namespace cuda
}  // namespace miafw
