// CUDA twin of csrc/kernels/fake_quant.h's given-parameter path: per-tensor and per-channel
// affine fake quantization over an (outer, channels, inner) layout of a contiguous tensor,
// nearest (ties to even) or seeded stochastic rounding, optionally masked (the fused
// mask + fake-quantize pass), with optional int32 codes, on a given stream.
//
// The per-element arithmetic is NOT restated here: the kernel calls the CPU kernel's own
// functions, qdetail::masked_value and qdetail::quant_one of csrc/kernels/quant_elem.h,
// compiled for the device. With contraction off (setup.py passes --fmad=false), IEEE
// division (nvcc's default -prec-div=true) and no flush-to-zero (default -ftz=false), every
// step is the same correctly rounded operation as on the CPU, so the twin is bit-identical
// to the CPU kernel, and for float32 nearest rounding to torch's fake_quantize ops (see
// fake_quant.h for that proof):
//   v   = x (no mask), m ? x : +0.0 (bool mask), x * m (float mask)
//   inv = 1 / scale[c];   y = v * inv
//   nearest:    n = round_half_even(clamp(y, qmin - z, qmax - z));  out = n * scale[c]
//   stochastic: n = floor(y) + (u < y - floor(y)), u = uniform(seed_key(seed), flat index),
//               q = clamp(n + z, qmin, qmax);                       out = (q - z) * scale[c]
//   code = int32(q) (quant_min where q is NaN)
// u depends only on (seed, flat index), so the stochastic result does not depend on the grid
// either. NaN propagates (out NaN, code quant_min); +-inf clamp to the range ends.
// out may be x itself (each element is read before it is written, by the same thread).

#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "kernels/quant_elem.h"

namespace miafw {
namespace cuda {
namespace {

namespace qd = ::miafw::kernels::qdetail;

// M: qd::NoMask (mask unused), uint8_t (bool mask) or T (float mask).
// PerChannel: the channel of flat index i is (i / inner) % channels; else channel 0.
template <typename T, typename M, bool Stochastic, bool PerChannel, bool WithCodes>
__global__ void fake_quant_kernel(const T* x, const M* __restrict__ mask, T* out,
                                  int32_t* __restrict__ codes, int64_t total, int64_t channels,
                                  int64_t inner, const T* __restrict__ scale,
                                  const T* __restrict__ zero_point, T qmin, T qmax,
                                  uint64_t key) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T s = scale[0], z = zero_point[0];
  T inv = T(1) / s;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    if (PerChannel) {
      const int64_t c = (i / inner) % channels;
      s = scale[c];
      z = zero_point[c];
      inv = T(1) / s;
    }
    const T v = qd::masked_value<T, M>(x, mask, i);
    out[i] = qd::quant_one<T, Stochastic, WithCodes>(v, s, inv, z, qmin, qmax, key,
                                                     static_cast<uint64_t>(i),
                                                     WithCodes ? codes + i : nullptr);
  }
}

struct Call {
  uintptr_t x, mask, out, codes, scale, zero_point;
  int64_t total, channels, inner, quant_min, quant_max;
  uint64_t key;
  int64_t blocks;
  cudaStream_t stream;
};

template <typename T, typename M, bool Stochastic, bool PerChannel, bool WithCodes>
std::string launch_variant(const Call& c) {
  return detail::launch(
      "fake_quant_kernel", fake_quant_kernel<T, M, Stochastic, PerChannel, WithCodes>, c.blocks,
      c.stream, reinterpret_cast<const T*>(c.x), reinterpret_cast<const M*>(c.mask),
      reinterpret_cast<T*>(c.out), reinterpret_cast<int32_t*>(c.codes), c.total, c.channels,
      c.inner, reinterpret_cast<const T*>(c.scale), reinterpret_cast<const T*>(c.zero_point),
      static_cast<T>(c.quant_min), static_cast<T>(c.quant_max), c.key);
}

// Run-time flags -> template arguments, one level at a time.
template <typename T, typename M, bool Stochastic, bool PerChannel>
std::string with_codes(const Call& c) {
  return c.codes ? launch_variant<T, M, Stochastic, PerChannel, true>(c)
                 : launch_variant<T, M, Stochastic, PerChannel, false>(c);
}

template <typename T, typename M, bool Stochastic>
std::string with_layout(const Call& c) {
  return c.channels > 1 ? with_codes<T, M, Stochastic, true>(c)
                        : with_codes<T, M, Stochastic, false>(c);
}

template <typename T, typename M>
std::string with_rounding(const Call& c, bool stochastic) {
  return stochastic ? with_layout<T, M, true>(c) : with_layout<T, M, false>(c);
}

template <typename T>
std::string with_mask(const Call& c, int mask_kind, bool stochastic) {
  switch (mask_kind) {
    case kQuantMaskNone: return with_rounding<T, qd::NoMask>(c, stochastic);
    case kQuantMaskBool: return with_rounding<T, uint8_t>(c, stochastic);
    default: return with_rounding<T, T>(c, stochastic);  // kQuantMaskFloat (checked)
  }
}

}  // namespace

std::string fake_quantize(uintptr_t x, uintptr_t mask, int mask_kind, uintptr_t out,
                          uintptr_t codes, int64_t outer, int64_t channels, int64_t inner,
                          uintptr_t scale, uintptr_t zero_point, int64_t quant_min,
                          int64_t quant_max, bool stochastic, uint64_t seed, int dtype,
                          uintptr_t stream_handle) {
  if (outer < 0 || channels < 0 || inner < 0) return "fake_quantize: negative layout extent";
  if (dtype != 0 && dtype != 1) return "fake_quantize: dtype must be 0 (float32) or 1 (float64)";
  if (mask_kind < kQuantMaskNone || mask_kind > kQuantMaskFloat) {
    return "fake_quantize: unknown mask kind " + std::to_string(mask_kind);
  }
  if (quant_min > quant_max || quant_min < -(int64_t(1) << 16) || quant_max > (int64_t(1) << 16)) {
    return "fake_quantize: need quant_min <= quant_max within +-2^16";
  }
  if (outer == 0 || channels == 0 || inner == 0) return std::string();  // nothing to do
  if (!x || !out || !scale || !zero_point) return "fake_quantize: null pointer";
  if (mask_kind != kQuantMaskNone && !mask) return "fake_quantize: null mask pointer";
  Call c{x, mask, out, codes, scale, zero_point, outer * channels * inner, channels, inner,
         quant_min, quant_max, qd::seed_key(seed), 0,
         reinterpret_cast<cudaStream_t>(stream_handle)};
  std::string status;
  c.blocks = detail::grid_for(c.total, &status);
  if (!status.empty()) return status;
  return dtype == 0 ? with_mask<float>(c, mask_kind, stochastic)
                    : with_mask<double>(c, mask_kind, stochastic);
}

}  // namespace cuda
}  // namespace miafw
