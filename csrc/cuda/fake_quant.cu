// CUDA twin of the nearest-rounding, given-parameter path of csrc/kernels/fake_quant.h:
// per-tensor and per-channel affine fake quantization over an (outer, channels, inner)
// layout of a contiguous tensor, on a given stream.
//
// Per element, in the element type T, with every operation explicitly correctly rounded
// (__fmul_rn / __fadd_rn / __fdiv_rn and their double twins), so nvcc cannot contract a
// multiply-add into an FMA:
//   inv = 1 / scale[c]                       (as torch's `1.0f / scale`, per launch thread)
//   q   = rint(x * inv) + zp[c]              (rint: ties to even, the current = nearest mode)
//   q   = min(max(q, quant_min), quant_max)  (as selects: NaN propagates)
//   out = (q - zp[c]) * scale[c]             code = int32(q), quant_min where q is NaN
// For float32 this is torch's fake_quantize_per_tensor_affine / _per_channel_affine
// arithmetic, and bit-identical to the CPU kernel (which computes the same value through a
// clamp-then-magic-number sequence). rint(y) may be -0.0, but -0.0 + zp is +0.0 and
// q - zp of equal values is +0.0, so no -0.0 is produced, as on the CPU. |rint(y)| beyond
// 2^24 may round when zp is added, but such values are clamped to the range ends anyway.
// NaN propagates (out NaN, code quant_min); +-inf clamp to the range ends.
// out may be x itself (each element is read before it is written, by the same thread).

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace miafw {
namespace cuda {
namespace {

struct F32 {
  using T = float;
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float recip(float a) { return __fdiv_rn(1.0f, a); }
  static __device__ __forceinline__ float round(float a) { return rintf(a); }
};

struct F64 {
  using T = double;
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double recip(double a) { return __ddiv_rn(1.0, a); }
  static __device__ __forceinline__ double round(double a) { return rint(a); }
};

// PerChannel: channel of flat index i is (i / inner) % channels; else channel 0.
template <typename Ops, bool PerChannel, bool WithCodes>
__global__ void fake_quant_kernel(const typename Ops::T* x, typename Ops::T* out,
                                  int32_t* __restrict__ codes, int64_t total, int64_t channels,
                                  int64_t inner, const typename Ops::T* __restrict__ scale,
                                  const typename Ops::T* __restrict__ zero_point,
                                  typename Ops::T qmin, typename Ops::T qmax) {
  using T = typename Ops::T;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T s = scale[0], z = zero_point[0];
  T inv = Ops::recip(s);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    if (PerChannel) {
      const int64_t c = (i / inner) % channels;
      s = scale[c];
      z = zero_point[c];
      inv = Ops::recip(s);
    }
    const T v = x[i];
    T q = Ops::add(Ops::round(Ops::mul(v, inv)), z);
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    out[i] = Ops::mul(Ops::sub(q, z), s);
    if (WithCodes) codes[i] = q == q ? static_cast<int32_t>(q) : static_cast<int32_t>(qmin);
  }
}

template <typename Ops>
std::string launch(uintptr_t x, uintptr_t out, uintptr_t codes, int64_t outer, int64_t channels,
                   int64_t inner, uintptr_t scale, uintptr_t zero_point, int64_t quant_min,
                   int64_t quant_max, cudaStream_t stream) {
  using T = typename Ops::T;
  const int64_t total = outer * channels * inner;
  std::string status;
  const int64_t blocks = detail::grid_for(total, &status);
  if (!status.empty()) return status;
  const bool per_channel = channels > 1;
  const T qmin = static_cast<T>(quant_min), qmax = static_cast<T>(quant_max);
  const T* xp = reinterpret_cast<const T*>(x);
  T* op = reinterpret_cast<T*>(out);
  int32_t* cp = reinterpret_cast<int32_t*>(codes);
  const T* sp = reinterpret_cast<const T*>(scale);
  const T* zp = reinterpret_cast<const T*>(zero_point);
  const unsigned g = static_cast<unsigned>(blocks);
  const int b = detail::kThreads;
  if (per_channel) {
    if (cp) {
      fake_quant_kernel<Ops, true, true><<<g, b, 0, stream>>>(xp, op, cp, total, channels, inner,
                                                               sp, zp, qmin, qmax);
    } else {
      fake_quant_kernel<Ops, true, false><<<g, b, 0, stream>>>(xp, op, cp, total, channels, inner,
                                                                sp, zp, qmin, qmax);
    }
  } else {
    if (cp) {
      fake_quant_kernel<Ops, false, true><<<g, b, 0, stream>>>(xp, op, cp, total, channels,
                                                                inner, sp, zp, qmin, qmax);
    } else {
      fake_quant_kernel<Ops, false, false><<<g, b, 0, stream>>>(xp, op, cp, total, channels,
                                                                 inner, sp, zp, qmin, qmax);
    }
  }
  return detail::launch_status("fake_quant_kernel launch");
}

}  // namespace

std::string fake_quantize(uintptr_t x, uintptr_t out, uintptr_t codes, int64_t outer,
                          int64_t channels, int64_t inner, uintptr_t scale,
                          uintptr_t zero_point, int64_t quant_min, int64_t quant_max, int dtype,
                          uintptr_t stream_handle) {
  if (outer < 0 || channels < 0 || inner < 0) return "fake_quantize: negative layout extent";
  if (dtype != 0 && dtype != 1) return "fake_quantize: dtype must be 0 (float32) or 1 (float64)";
  if (quant_min > quant_max || quant_min < -(int64_t(1) << 16) || quant_max > (int64_t(1) << 16)) {
    return "fake_quantize: need quant_min <= quant_max within +-2^16";
  }
  if (outer == 0 || channels == 0 || inner == 0) return std::string();  // nothing to do
  if (!x || !out || !scale || !zero_point) return "fake_quantize: null pointer";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dtype == 0 ? launch<F32>(x, out, codes, outer, channels, inner, scale, zero_point,
                                  quant_min, quant_max, stream)
                    : launch<F64>(x, out, codes, outer, channels, inner, scale, zero_point,
                                  quant_min, quant_max, stream);
}

}  // namespace cuda
}  // namespace miafw
