// CUDA twin of csrc/kernels/gaussian_kl.h's gaussian_kl_diag: KL divergences of n pairs of
// univariate / diagonal Gaussians (means and VARIANCES, row-major [n, d]), on a given stream.
//
// Same formula as the CPU header, per component, in the element type T:
//   forward:   r = v0/v1;  t = 1/2 [ (r - 1) - ln r + dmu^2 / v1 ]
//   reverse:   r = v1/v0;  t = 1/2 [ (r - 1) - ln r + dmu^2 / v0 ]
//   symmetric: t = 1/2 [ ((v0 - v1)/v0) ((v0 - v1)/v1) + (dmu^2/v0 + dmu^2/v1) ]   (no log)
// with dmu = mu1 - mu0, dmu^2/v evaluated as (dmu/v) dmu (dmu^2 alone would overflow where
// the term is finite). When the ratio r is not a normal finite number the component is
// recomputed with two logs, t = 1/2 [ r - 1 + dmu^2/den + (ln den - ln num) ], as the CPU
// slow path. The d components of a row are summed in double (one thread per row), then the
// sum is rounded to T. Results agree with the CPU kernel to rounding (the CPU uses its own
// polynomial log and SIMD variants; neither is bit-exact to the other).
//
// Invalid variances (not > 0 and finite) are reported through a device uint64 `err`
// (atomicMin of 2 * flat_index + arg): the host reads one word to find the FIRST bad
// element in row-major order, var0 before var1, as the CPU kernel reports it.

#include <cfloat>
#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace miafw {
namespace cuda {
namespace {

template <typename T>
struct Lim;
template <>
struct Lim<float> {
  static __device__ __forceinline__ float min_normal() { return FLT_MIN; }
  static __device__ __forceinline__ float max() { return FLT_MAX; }
};
template <>
struct Lim<double> {
  static __device__ __forceinline__ double min_normal() { return DBL_MIN; }
  static __device__ __forceinline__ double max() { return DBL_MAX; }
};

__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__global__ void kl_diag_kernel(const T* __restrict__ mu0, const T* __restrict__ v0,
                               const T* __restrict__ mu1, const T* __restrict__ v1,
                               T* __restrict__ out, int64_t n, int64_t d, int dir,
                               unsigned long long* __restrict__ err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T half = T(0.5), one = T(1);
  const T kMax = Lim<T>::max(), kMin = Lim<T>::min_normal();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < n;
       row += stride) {
    double acc = 0.0;
    bool bad = false;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t e = row * d + j;
      const T a = v0[e], b = v1[e];
      const bool a_ok = a > T(0) && a <= kMax;
      const bool b_ok = b > T(0) && b <= kMax;
      if (!(a_ok && b_ok)) {
        if (err) {
          const unsigned long long key =
              2ull * static_cast<unsigned long long>(e) + (a_ok ? 1ull : 0ull);
          atomicMin(err, key);
        }
        bad = true;
        break;  // later elements of this row cannot be first
      }
      const T dm = mu1[e] - mu0[e];
      T t;
      if (dir == 2) {
        const T diff = a - b;
        t = half * ((diff / a) * (diff / b) + ((dm / a) * dm + (dm / b) * dm));
      } else {
        const T num = dir == 0 ? a : b;
        const T den = dir == 0 ? b : a;
        const T r = num / den;
        if (r >= kMin && r <= kMax) {
          t = half * ((r - one) - dev_log(r) + (dm / den) * dm);
        } else {
          t = half * (r - one + (dm / den) * dm + (dev_log(den) - dev_log(num)));
        }
      }
      acc += static_cast<double>(t);
    }
    if (!bad) out[row] = static_cast<T>(acc);
  }
}

template <typename T>
std::string launch(uintptr_t mu0, uintptr_t var0, uintptr_t mu1, uintptr_t var1, uintptr_t out,
                   int64_t n, int64_t d, int dir, uintptr_t err, cudaStream_t stream) {
  std::string status;
  const int64_t blocks = detail::grid_for(n, &status);
  if (!status.empty()) return status;
  return detail::launch("kl_diag_kernel", kl_diag_kernel<T>, blocks, stream,
                        reinterpret_cast<const T*>(mu0), reinterpret_cast<const T*>(var0),
                        reinterpret_cast<const T*>(mu1), reinterpret_cast<const T*>(var1),
                        reinterpret_cast<T*>(out), n, d, dir,
                        reinterpret_cast<unsigned long long*>(err));
}

}  // namespace

std::string gaussian_kl_diag(uintptr_t mu0, uintptr_t var0, uintptr_t mu1, uintptr_t var1,
                             uintptr_t out, int64_t n, int64_t d, int direction, int dtype,
                             uintptr_t err, uintptr_t stream_handle) {
  if (n < 0 || d < 1) return "gaussian_kl_diag: need n >= 0 and d >= 1";
  if (direction < 0 || direction > 2) return "gaussian_kl_diag: direction must be 0, 1 or 2";
  if (dtype != 0 && dtype != 1) return "gaussian_kl_diag: dtype must be 0 (float32) or 1 (float64)";
  if (n == 0) return std::string();
  if (!mu0 || !var0 || !mu1 || !var1 || !out) return "gaussian_kl_diag: null pointer";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dtype == 0 ? launch<float>(mu0, var0, mu1, var1, out, n, d, direction, err, stream)
                    : launch<double>(mu0, var0, mu1, var1, out, n, d, direction, err, stream);
}

}  // namespace cuda
}  // namespace miafw
