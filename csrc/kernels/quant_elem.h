// Per-element arithmetic of fake quantization, shared by the CPU kernel (kernels/fake_quant.h)
// and its CUDA twin (cuda/fake_quant.cu): the SAME source is compiled for both, so the two
// produce the same bits by construction (see fake_quant.h for the maths and its proof of
// equivalence with torch's op). Scalar, dependency-free C++17; every function is
// __host__ __device__ under nvcc (MIAFW_HD).
//
// Both compilations must perform each operation as written, correctly rounded, in the
// element type: no FMA contraction (GCC: the pragma below; nvcc: --fmad=false in setup.py),
// no fast-math, round-to-nearest, no flush of subnormals (nvcc's default -ftz=false).

#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/hd.h"

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

#if defined(__CUDACC__)
#define MIAFW_QE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define MIAFW_QE inline __attribute__((always_inline))
#else
#define MIAFW_QE inline
#endif

namespace miafw {
namespace kernels {
namespace qdetail {

template <typename T>
struct Magic;
template <>
struct Magic<float> {
  static constexpr float round = 12582912.0f;  // 1.5 * 2^23
};
template <>
struct Magic<double> {
  static constexpr double round = 6755399441055744.0;  // 1.5 * 2^52
};
template <typename T>
constexpr T kPreClamp = T(4194304);  // 2^22

MIAFW_QE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Key of a seed: mixes it once so that neighbouring seeds give unrelated streams.
MIAFW_QE uint64_t seed_key(uint64_t seed) { return splitmix64(seed); }

// Uniform in [0, 1) for element `idx`: splitmix64(key + idx * golden) (the finaliser applied to
// the index-th state of a splitmix stream keyed by the seed).
template <typename T>
MIAFW_QE T uniform(uint64_t key, uint64_t idx) {
  const uint64_t h = splitmix64(key + idx * 0x9E3779B97F4A7C15ULL);
  if constexpr (std::is_same<T, float>::value) {
    return T(static_cast<float>(h >> 40) * 5.9604644775390625e-08f);  // 2^-24
  }
  return T(static_cast<double>(h >> 11) * 1.1102230246251565e-16);  // 2^-53
}

template <typename T>
MIAFW_QE T round_stochastic(T y, T u) {
  y = y < -kPreClamp<T> ? -kPreClamp<T> : y;
  y = y > kPreClamp<T> ? kPreClamp<T> : y;
  const T M = Magic<T>::round;
  const T r = (y + M) - M;
  const T f = r > y ? r - T(1) : r;  // floor(y)
  const T frac = y - f;              // exact, in [0, 1)
  return u < frac ? f + T(1) : f;
}

// Tag type for "no mask".
struct NoMask {};

// The value that is quantized: x, m ? x : +0.0 (byte mask) or x * m (float mask).
template <typename T, typename M>
MIAFW_QE T masked_value(const T* x, const M* m, int64_t i) {
  if constexpr (std::is_same<M, uint8_t>::value) {
    const T v = x[i];  // loaded unconditionally: a conditional load blocks vectorization
    return m[i] ? v : T(0);
  } else if constexpr (std::is_same<M, T>::value) {
    return x[i] * m[i];
  } else {
    (void)m;
    return x[i];
  }
}

template <typename T, bool Stochastic, bool WithCodes>
MIAFW_QE T quant_one(T v, T s, T iv, T z, T qmin, T qmax, uint64_t key, uint64_t idx,
                           int32_t* code) {
  const T y = v * iv;
  if constexpr (!Stochastic) {
    // Nearest: clamp y to [qmin - z, qmax - z] (exact small integers) BEFORE rounding. Rounding
    // is monotone and fixes integers, so round(clamp(y, lo, hi)) == clamp(round(y), lo, hi),
    // and clamp(round(y), lo, hi) + z == clamp(round(y) + z, qmin, qmax) exactly (all values are
    // integers below 2^18). Also |lo|, |hi| < 2^17 < 2^22, so the pre-clamp is implied. Then
    // q - z == n exactly (n is never -0.0: the magic-number sum yields +0.0), so
    // out = n * s == (q - z) * s bit for bit. NaN propagates through both selects.
    (void)key;
    (void)idx;
    const T lo = qmin - z, hi = qmax - z;
    T c = y < lo ? lo : y;
    c = c > hi ? hi : c;
    const T M = Magic<T>::round;
    const T n = (c + M) - M;
    if constexpr (WithCodes) {
      const T q = n + z;
      *code = static_cast<int32_t>(q == q ? q : qmin);
    }
    return n * s;
  } else {
    const T n = round_stochastic<T>(y, uniform<T>(key, idx));
    T q = n + z;
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    if constexpr (WithCodes) *code = static_cast<int32_t>(q == q ? q : qmin);
    return (q - z) * s;
  }
}

}  // namespace qdetail
}  // namespace kernels
}  // namespace miafw

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC pop_options
#endif
