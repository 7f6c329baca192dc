// Batched Gaussian Kullback-Leibler divergences on raw pointers.
//
// Free of torch and pybind11: the bindings (csrc/bind_kl.cpp) hand in plain pointers and
// sizes. Two kernels:
//
//   * gaussian_kl_diag: N pairs of diagonal Gaussians with D components each (D = 1 is the
//     univariate case), given by means and VARIANCES, row-major [N, D]. out[i] is the KL
//     divergence summed over the D components:
//         KL(N0 || N1) = 1/2 sum_j [ v0/v1 - 1 - ln(v0/v1) + (mu1 - mu0)^2 / v1 ].
//     Computed in T. With r = v0/v1 the log is ONE log of a ratio; the symmetric direction
//     needs no log at all: KL(0||1) + KL(1||0) = 1/2 [ (v0-v1)^2/(v0 v1) + dmu^2/v0 + dmu^2/v1 ].
//     dmu^2/v is evaluated as (dmu/v) dmu, so it stays finite wherever the term is (dmu^2
//     alone overflows float32 from |dmu| ~ 1.8e19).
//     The inner loop is branch-free (a fdlibm-style polynomial log inlined below), so the
//     compiler vectorizes it; blocks whose ratio leaves the normal floating-point range, or
//     that hold an invalid variance, are redone element by element with std::log.
//
//   * gaussian_kl_full: N pairs of full-covariance Gaussians of dimension d <= kKlMaxDim,
//     mu row-major [N, d], cov row-major [N, d, d] (or lower Cholesky factors L with
//     cov = L L^T). Computed in double whatever T is:
//         KL(N0 || N1) = 1/2 [ ||L1^-1 L0||_F^2 + ||L1^-1 (mu1 - mu0)||^2 - d
//                              + 2 sum ln diag L1 - 2 sum ln diag L0 ],
//     i.e. tr(S1^-1 S0) + Mahalanobis - d + ln det S1 - ln det S0; never an explicit
//     inverse. Only the lower triangle of a covariance is read. Covariance input runs
//     W pairs at a time, one per SIMD lane, through LDL^T factorisations (see "lane-batched"
//     below); factor input (cholesky = true), and any batch with a failing pair, through a
//     per-pair right-looking Cholesky factorisation (stored as U = L^T) and forward
//     substitution with d + 1 right-hand sides. Each pair's arithmetic depends only on the
//     pair, the ISA variant and d, never on N or the thread split.
//
// Errors never throw: a kernel returns a KlError whose `index` is the FIRST failing batch
// index (or -1). For the diagonal kernel a failure is a variance that is not > 0 and finite;
// for the full kernel a factorisation whose pivot is not > 0 and finite (not positive
// definite), or with cholesky=true a diagonal entry that is not > 0 and finite. Within one
// pair, argument 0 (var0 / cov0) is checked before argument 1. After an error the contents
// of `out` are unspecified.
//
// Threading: one OpenMP parallel region per call, rows split statically; serial below
// kKlParallelThreshold units of work (elements for the diagonal kernel, N * (d^3/3 + d^2)
// for the full one). Only basic OpenMP is used (parallel, omp_get_thread_num /
// omp_get_num_threads / omp_get_max_threads; `omp simd` emits no runtime calls), so the
// extension runs beside torch's bundled libgomp.
//
// SIMD: the extension is built for the baseline ISA (no -march). On x86-64 with GCC or
// clang each kernel body is also compiled for AVX2+FMA and AVX-512 through function target
// attributes and chosen at run time (kl_best_isa()). The variants differ only in rounding
// (FMA contraction, vector width), far inside the documented tolerances.
//
// out must not overlap any input (a block may be recomputed after its inputs were read).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MIAFW_KL_X86_DISPATCH 1
#define MIAFW_KL_INLINE inline __attribute__((always_inline))
#define MIAFW_KL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MIAFW_KL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#else
#define MIAFW_KL_X86_DISPATCH 0
#define MIAFW_KL_INLINE inline
#endif

namespace miafw {
namespace kernels {

// Units of work below which a call runs serially (no parallel region).
constexpr int64_t kKlParallelThreshold = 65536;
// Largest dimension of the full-covariance kernel (scratch is 3 d^2 + 3 d doubles per thread).
constexpr int64_t kKlMaxDim = 128;

enum class KlDirection : int { forward = 0, reverse = 1, symmetric = 2 };

// Instruction sets the kernels can be compiled for (see the SIMD note above).
enum class KlIsa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// First failure of a call. index: batch index (-1: none). arg: 0 for var0 / cov0, 1 for
// var1 / cov1. element: component j within the row (diagonal kernel), else -1.
struct KlError {
  int64_t index = -1;
  int arg = -1;
  int64_t element = -1;
  bool ok() const { return index < 0; }
};

// Best instruction set this CPU (and OS) supports among those compiled in.
inline KlIsa kl_best_isa() {
#if MIAFW_KL_X86_DISPATCH
  static const KlIsa best = [] {
    __builtin_cpu_init();
    if (cpu_has_avx512()) return KlIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return KlIsa::avx2;
    return KlIsa::baseline;
  }();
  return best;
#else
  return KlIsa::baseline;
#endif
}

namespace kl_detail {

// ---------------------------------------------------------------------------- natural log
// fdlibm / musl style: x = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f),
// ln(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)). Branch-free, so loops over it vectorize.
// Meaningful for positive, NORMAL, finite x only (callers discard other lanes; any input is
// free of undefined behaviour: the bit arithmetic is unsigned). Measured here: < 0.77 ulp
// for float and double over random normal inputs.

MIAFW_KL_INLINE float log_normal(float x) {
  uint32_t ix;
  std::memcpy(&ix, &x, sizeof ix);
  ix -= 0x3f3504f3u;  // bits of sqrt(1/2)
  const int32_t k = static_cast<int32_t>(ix) >> 23;
  const uint32_t im = (ix & 0x007fffffu) + 0x3f3504f3u;
  float m;
  std::memcpy(&m, &im, sizeof m);
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float r = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return s * (hfsq + r) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
}

MIAFW_KL_INLINE double log_normal(double x) {
  uint64_t ix;
  std::memcpy(&ix, &x, sizeof ix);
  ix -= uint64_t(0x3fe6a09e) << 32;  // high word of sqrt(1/2)
  const int32_t k = static_cast<int32_t>(static_cast<int64_t>(ix) >> 52);
  const uint64_t im = (ix & uint64_t(0x000fffffffffffff)) + (uint64_t(0x3fe6a09e) << 32);
  double m;
  std::memcpy(&m, &im, sizeof m);
  const double f = m - 1.0;
  const double hfsq = 0.5 * f * f;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (3.999999999940941908e-01 +
                         w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double t2 = z * (6.666666666666735130e-01 +
                         w * (2.857142874366239149e-01 +
                              w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const double r = t2 + t1;
  const double dk = static_cast<double>(k);
  return s * (hfsq + r) + dk * 1.90821492927058770002e-10 - hfsq + f +
         dk * 6.93147180369123816490e-01;
}

// ---------------------------------------------------------------------------- diagonal

template <typename T>
struct DiagArgs {
  const T* mu0;
  const T* var0;
  const T* mu1;
  const T* var1;
  T* out;
  int64_t n;  // rows (pairs)
  int64_t d;  // components per row
  KlDirection dir;
};

// Elements per block: the granularity of the fast-path check and of the diagonal scratch.
constexpr int64_t kBlock = 512;

// Fast path over n elements: terms[i] = KL contribution of element i. Returns whether every
// element was in the fast path's domain (both variances > 0 and finite, the ratio normal);
// if not, the caller redoes the block with slow_block.
template <typename T, KlDirection Dir>
MIAFW_KL_INLINE bool fast_block(const T* __restrict mu0, const T* __restrict v0,
                                const T* __restrict mu1, const T* __restrict v1,
                                T* __restrict terms, int64_t n) {
  constexpr T kMin = std::numeric_limits<T>::min();
  constexpr T kMax = std::numeric_limits<T>::max();
  const T half = T(0.5), one = T(1);
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) {
    const T a = v0[i], b = v1[i];
    const T dm = mu1[i] - mu0[i];
    const int valid = (a > T(0)) & (a <= kMax) & (b > T(0)) & (b <= kMax);
    T t;
    if (Dir == KlDirection::symmetric) {
      const T diff = a - b;
      // (dm/a) dm, not dm^2/a: dm^2 overflows T while the term may be finite (dm = 1e20,
      // a = 1e30 in float32); not dm^2 (1/a + 1/b) either: 0 * inf is NaN for denormal a.
      t = half * ((diff / a) * (diff / b) + ((dm / a) * dm + (dm / b) * dm));
      ok &= valid;
    } else {
      // forward: r = v0/v1, divide the squared mean gap by v1; reverse: swap roles.
      const T num = Dir == KlDirection::forward ? a : b;
      const T den = Dir == KlDirection::forward ? b : a;
      const T r = num / den;
      const int r_ok = (r >= kMin) & (r <= kMax);  // else the block is redone
      t = half * ((r - one) - log_normal(r) + (dm / den) * dm);  // (dm/den) dm: no dm^2 overflow
      ok &= valid & r_ok;
    }
    terms[i] = t;
  }
  return ok != 0;
}

// Element-by-element path with std::log of each variance. Returns the offset of the first
// invalid element in [0, n) (and its argument in *arg), or -1.
template <typename T>
inline int64_t slow_block(const T* mu0, const T* v0, const T* mu1, const T* v1, T* terms,
                          int64_t n, KlDirection dir, int* arg) {
  constexpr T kMax = std::numeric_limits<T>::max();
  for (int64_t i = 0; i < n; ++i) {
    const T a = v0[i], b = v1[i];
    if (!(a > T(0) && a <= kMax)) {
      *arg = 0;
      return i;
    }
    if (!(b > T(0) && b <= kMax)) {
      *arg = 1;
      return i;
    }
    const T dm = mu1[i] - mu0[i];
    const T la = std::log(a), lb = std::log(b);
    T t;
    if (dir == KlDirection::forward) {
      t = T(0.5) * (a / b - T(1) + (dm / b) * dm + (lb - la));
    } else if (dir == KlDirection::reverse) {
      t = T(0.5) * (b / a - T(1) + (dm / a) * dm + (la - lb));
    } else {
      const T diff = a - b;
      t = T(0.5) * ((diff / a) * (diff / b) + ((dm / a) * dm + (dm / b) * dm));
    }
    terms[i] = t;
  }
  return -1;
}

template <typename T, KlDirection Dir>
MIAFW_KL_INLINE int64_t any_block(const DiagArgs<T>& g, int64_t e0, int64_t len, T* terms,
                                  int* arg) {
  if (fast_block<T, Dir>(g.mu0 + e0, g.var0 + e0, g.mu1 + e0, g.var1 + e0, terms, len)) return -1;
  return slow_block(g.mu0 + e0, g.var0 + e0, g.mu1 + e0, g.var1 + e0, terms, len, g.dir, arg);
}

// Rows [r0, r1) of a diagonal problem, serially. `tmp` holds kBlock elements (used for D > 1).
template <typename T, KlDirection Dir>
MIAFW_KL_INLINE KlError diag_rows_dir(const DiagArgs<T>& g, int64_t r0, int64_t r1, T* tmp) {
  KlError err;
  int arg = -1;
  const int64_t d = g.d;
  if (d == 1) {  // univariate: terms are the outputs
    for (int64_t e = r0; e < r1; e += kBlock) {
      const int64_t len = std::min(kBlock, r1 - e);
      const int64_t bad = any_block<T, Dir>(g, e, len, g.out + e, &arg);
      if (bad >= 0) {
        err.index = e + bad;
        err.arg = arg;
        err.element = 0;
        return err;
      }
    }
    return err;
  }
  // Diagonal: stream the flattened elements in blocks, summing each row in double.
  const int64_t end = r1 * d;
  int64_t row = r0;
  int64_t row_end = (r0 + 1) * d;  // flat index where the current row ends
  double acc = 0.0;
  for (int64_t e = r0 * d; e < end; e += kBlock) {
    const int64_t len = std::min(kBlock, end - e);
    const int64_t bad = any_block<T, Dir>(g, e, len, tmp, &arg);
    if (bad >= 0) {
      err.index = (e + bad) / d;
      err.arg = arg;
      err.element = (e + bad) % d;
      return err;
    }
    int64_t k = 0;
    while (k < len) {
      const int64_t stop = std::min(len, row_end - e);
      double s = 0.0;
      for (; k < stop; ++k) s += static_cast<double>(tmp[k]);
      acc += s;
      if (e + k == row_end) {
        g.out[row] = static_cast<T>(acc);
        acc = 0.0;
        ++row;
        row_end += d;
      }
    }
  }
  return err;
}

template <typename T>
MIAFW_KL_INLINE KlError diag_rows(const DiagArgs<T>& g, int64_t r0, int64_t r1) {
  alignas(64) T tmp[kBlock];
  switch (g.dir) {
    case KlDirection::forward:
      return diag_rows_dir<T, KlDirection::forward>(g, r0, r1, tmp);
    case KlDirection::reverse:
      return diag_rows_dir<T, KlDirection::reverse>(g, r0, r1, tmp);
    default:
      return diag_rows_dir<T, KlDirection::symmetric>(g, r0, r1, tmp);
  }
}

template <typename T>
KlError diag_rows_baseline(const DiagArgs<T>& g, int64_t r0, int64_t r1) {
  return diag_rows(g, r0, r1);
}
#if MIAFW_KL_X86_DISPATCH
template <typename T>
MIAFW_KL_TARGET_AVX2 KlError diag_rows_avx2(const DiagArgs<T>& g, int64_t r0, int64_t r1) {
  return diag_rows(g, r0, r1);
}
template <typename T>
MIAFW_KL_TARGET_AVX512 KlError diag_rows_avx512(const DiagArgs<T>& g, int64_t r0, int64_t r1) {
  return diag_rows(g, r0, r1);
}
#endif

template <typename T>
inline KlError diag_rows_isa(const DiagArgs<T>& g, int64_t r0, int64_t r1, KlIsa isa) {
#if MIAFW_KL_X86_DISPATCH
  if (isa == KlIsa::avx512) return diag_rows_avx512(g, r0, r1);
  if (isa == KlIsa::avx2) return diag_rows_avx2(g, r0, r1);
#endif
  (void)isa;
  return diag_rows_baseline(g, r0, r1);
}

// ---------------------------------------------------------------------------- full covariance

template <typename T>
struct FullArgs {
  const T* mu0;
  const T* cov0;
  const T* mu1;
  const T* cov1;
  T* out;
  int64_t n;
  int64_t d;
  KlDirection dir;
  bool cholesky;  // cov0 / cov1 hold lower Cholesky factors
  double jitter;  // added to the diagonal before factorising (cholesky == false only)
};

// Per-thread scratch layout, in doubles.
inline int64_t full_scratch_size(int64_t d) { return 3 * d * d + 3 * d + 8; }

// Factors are stored TRANSPOSED, as upper-triangular U = L^T (row j of U is column j of L,
// contiguous), so every inner loop is an axpy over a contiguous row, and both the
// factorisation (right-looking) and the solve (many right-hand sides at once) update
// INDEPENDENT rows back to back: no horizontal reductions and no load-store dependency
// chain from one axpy to the next, which is what limits small-d triangular code.

// U with U^T U = a + jitter I from the LOWER triangle of `a`; inv[j] = 1 / U[j][j]. Returns
// false when a pivot is not > 0 and finite (not positive definite, or NaN / inf entries).
// Right-looking: d^3/6 multiply-adds.
template <typename T>
MIAFW_KL_INLINE bool factorise(const T* a, int64_t d, double jitter, double* U, double* inv) {
  constexpr double kMax = std::numeric_limits<double>::max();
  for (int64_t i = 0; i < d; ++i) {  // U[j][i] = a[i][j] for j <= i: row i of a's lower part
    const T* ai = a + i * d;
    for (int64_t j = 0; j <= i; ++j) U[j * d + i] = static_cast<double>(ai[j]);
  }
  for (int64_t k = 0; k < d; ++k) {
    double* uk = U + k * d;
    const double p = uk[k] + jitter;
    if (!(p > 0.0 && p <= kMax)) return false;
    const double r = std::sqrt(p);
    const double s = 1.0 / r;
    uk[k] = r;
    inv[k] = s;
    for (int64_t i = k + 1; i < d; ++i) uk[i] *= s;
    for (int64_t j = k + 1; j < d; ++j) {
      double* uj = U + j * d;
      const double c = uk[j];
#pragma omp simd
      for (int64_t i = j; i < d; ++i) uj[i] -= c * uk[i];
    }
  }
  return true;
}

// U = L^T from a given lower Cholesky factor L; false on a diagonal entry that is not > 0
// and finite, or is subnormal (its reciprocal overflows: the solves would give 0 * inf = NaN).
template <typename T>
MIAFW_KL_INLINE bool load_factor(const T* a, int64_t d, double* U, double* inv) {
  constexpr double kMax = std::numeric_limits<double>::max();
  constexpr double kMin = std::numeric_limits<double>::min();
  for (int64_t i = 0; i < d; ++i) {
    const T* ai = a + i * d;
    for (int64_t j = 0; j <= i; ++j) U[j * d + i] = static_cast<double>(ai[j]);
  }
  for (int64_t j = 0; j < d; ++j) {
    const double u = U[j * d + j];
    if (!(u >= kMin && u <= kMax)) return false;
    inv[j] = 1.0 / u;
  }
  return true;
}

MIAFW_KL_INLINE double log_det_half(const double* U, int64_t d) {  // sum ln U[j][j]
  double s = 0.0;
  for (int64_t j = 0; j < d; ++j) s += std::log(U[j * d + j]);
  return s;
}

// Solves X Ua = [Ub; dm^T] (d + 1 right-hand rows; B is (d + 1) x d scratch) and returns
// ||Ub Ua^-1||_F^2 = ||La^-1 Lb||_F^2 = tr(Sa^-1 Sb); *maha = ||dm^T Ua^-1||^2 =
// dm^T Sa^-1 dm. Row i of Ub is zero before column i, so is row i of X. d^3/6 + d^2/2.
MIAFW_KL_INLINE double solve_terms(const double* Ua, const double* inva, const double* Ub,
                                   const double* dm, int64_t d, double* B, double* maha) {
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) B[i * d + j] = Ub[i * d + j];
  }
  double* bd = B + d * d;
  for (int64_t j = 0; j < d; ++j) bd[j] = dm[j];
  double frob = 0.0, mh = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double s = inva[j];
    const double* uj = Ua + j * d;
    for (int64_t i = 0; i <= j; ++i) {
      double* bi = B + i * d;
      const double x = bi[j] * s;
      frob += x * x;
#pragma omp simd
      for (int64_t t = j + 1; t < d; ++t) bi[t] -= x * uj[t];
    }
    const double x = bd[j] * s;
    mh += x * x;
#pragma omp simd
    for (int64_t t = j + 1; t < d; ++t) bd[t] -= x * uj[t];
  }
  *maha = mh;
  return frob;
}

// Pairs [p0, p1) serially; `scratch` holds full_scratch_size(d) doubles.
template <typename T>
MIAFW_KL_INLINE KlError full_pairs(const FullArgs<T>& g, int64_t p0, int64_t p1, double* scratch) {
  KlError err;
  const int64_t d = g.d;
  double* L0 = scratch;
  double* L1 = L0 + d * d;
  double* B = L1 + d * d;  // (d + 1) x d
  double* inv0 = B + (d + 1) * d;
  double* inv1 = inv0 + d;
  double dm[kKlMaxDim];
  for (int64_t p = p0; p < p1; ++p) {
    const T* c0 = g.cov0 + p * d * d;
    const T* c1 = g.cov1 + p * d * d;
    const bool ok0 = g.cholesky ? load_factor(c0, d, L0, inv0) : factorise(c0, d, g.jitter, L0, inv0);
    if (!ok0) {
      err.index = p;
      err.arg = 0;
      return err;
    }
    const bool ok1 = g.cholesky ? load_factor(c1, d, L1, inv1) : factorise(c1, d, g.jitter, L1, inv1);
    if (!ok1) {
      err.index = p;
      err.arg = 1;
      return err;
    }
    const T* m0 = g.mu0 + p * d;
    const T* m1 = g.mu1 + p * d;
    for (int64_t i = 0; i < d; ++i) dm[i] = static_cast<double>(m1[i]) - static_cast<double>(m0[i]);
    double kl, m_a, m_b;
    if (g.dir == KlDirection::forward) {  // KL(N0 || N1)
      kl = solve_terms(L1, inv1, L0, dm, d, B, &m_a) + m_a - double(d) +
           2.0 * (log_det_half(L1, d) - log_det_half(L0, d));
    } else if (g.dir == KlDirection::reverse) {  // KL(N1 || N0)
      kl = solve_terms(L0, inv0, L1, dm, d, B, &m_a) + m_a - double(d) +
           2.0 * (log_det_half(L0, d) - log_det_half(L1, d));
    } else {  // the log-determinants cancel
      kl = solve_terms(L1, inv1, L0, dm, d, B, &m_a) + solve_terms(L0, inv0, L1, dm, d, B, &m_b) +
           m_a + m_b - 2.0 * double(d);
    }
    g.out[p] = static_cast<T>(0.5 * kl);
  }
  return err;
}

#if defined(__GNUC__) && !defined(__clang__)
// Vector values only pass between always-inlined helpers inside one target function, so the
// ABI notes do not apply. GCC emits them while generating code at the end of the including
// translation unit, hence no push / pop.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// ---------------------------------------------------------------------------- lane-batched
// Covariance input (cholesky == false) is processed W pairs at a time, one pair per SIMD
// lane of a vector of W doubles (W = 8: zmm, AVX-512 and d >= kKlZmmMinDim; W = 4: ymm, AVX2,
// also run by AVX-512 CPUs for smaller d; W = 2: xmm, baseline), so every operation is a
// full-width vertical one whatever d is: no remainder iterations, no horizontal reductions
// (the old per-pair code spent its time in short, misaligned inner loops). Only native-width
// vector types: GCC lowers wider ones through memory. Per pair an LDL^T factorisation S = L D L^T (unit L,
// no square roots, so nothing leaves the vector units) of each covariance, then
//     tr(S1^-1 S0) = sum_{i,c} X_ic^2 D0_c / D1_i  with X = L1^-1 L0 (unit lower),
//     (mu1-mu0)^T S1^-1 (mu1-mu0) = sum_i y_i^2 / D1_i  with y = L1^-1 (mu1 - mu0),
//     ln det S1 - ln det S0 = ln(prod D1 / prod D0)  (per-log fallback when out of range).
// The pivots D are the squared Cholesky pivots, so "a pivot not > 0 and finite" is the same
// test. A batch with any failing lane is redone by the scalar full_pairs above, which reports
// the first failing index exactly as before. Factor input (cholesky == true) keeps the scalar
// path.
// Triangles are packed row-major: element (i, j), j <= i, at tri(i) + j.

constexpr int kKlLanes = 8;  // most lanes of any variant
// Smallest d for which an AVX-512 CPU runs the 512-bit lane kernel.
constexpr int64_t kKlZmmMinDim = 32;

constexpr int64_t tri(int64_t i) { return i * (i + 1) / 2; }

// Doubles of lane scratch for dimension d (plus 64-byte alignment slack).
inline int64_t lane_scratch_size(int64_t d) { return (2 * tri(d) + 13 * d) * kKlLanes + 8; }  // any W <= 8

// Vector types per instruction set: V holds W doubles (one lane per pair), M the matching
// comparison mask; fnma(a, b, c) = c - a * b, fused where the ISA has FMA (the build is ISO
// C++, so GCC does not contract a * b + c by itself).
struct OpsBase {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t M __attribute__((vector_size(16)));
  static constexpr int W = 2;
  static MIAFW_KL_INLINE V fnma(V a, V b, V c) { return c - a * b; }
};
#if MIAFW_KL_X86_DISPATCH
struct OpsAvx2 {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t M __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static inline MIAFW_KL_TARGET_AVX2 V fnma(V a, V b, V c) {
    return __builtin_ia32_vfmaddpd256(-a, b, c);
  }
};
struct OpsAvx512 {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t M __attribute__((vector_size(64)));
  static constexpr int W = 8;
  static inline MIAFW_KL_TARGET_AVX512 V fnma(V a, V b, V c) {
    return __builtin_ia32_vfmaddpd512_mask(-a, b, c, static_cast<unsigned char>(0xff), 4);
  }
};
#endif

// s - sum_{k < n} a[k] b[k], four independent chains.
template <class Ops>
MIAFW_KL_INLINE typename Ops::V dot_sub(const typename Ops::V& s0, const typename Ops::V* a, const typename Ops::V* b, int64_t n) {
  typename Ops::V s = s0, s1 = {}, s2 = {}, s3 = {};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s = Ops::fnma(a[k], b[k], s);
    s1 = Ops::fnma(a[k + 1], b[k + 1], s1);
    s2 = Ops::fnma(a[k + 2], b[k + 2], s2);
    s3 = Ops::fnma(a[k + 3], b[k + 3], s3);
  }
  for (; k < n; ++k) s = Ops::fnma(a[k], b[k], s);
  return (s + s1) + (s2 + s3);
}

// In place A (packed lower) -> unit L below the diagonal; D, invD = 1 / D. Row-oriented
// (Crout), four rows at a time: each row j < i0 of L is read once for the four rows
// i0..i0+3 (the factor is ~d^2/2 vectors, beyond L1 for large d), eight accumulator chains.
// u: 4 d vectors of scratch. Returns the lanes whose pivot is not > 0 and finite.
template <class Ops, int DC>
MIAFW_KL_INLINE typename Ops::M lanes_ldl(typename Ops::V* A, int64_t dd, typename Ops::V* D,
                                          typename Ops::V* invD, typename Ops::V* u) {
  typedef typename Ops::V V;
  const int64_t d = DC > 0 ? DC : dd;
  const V zero = {}, one = zero + 1.0, vmax = zero + std::numeric_limits<double>::max();
  typename Ops::M bad = {};
  V* const u0 = u;
  V* const u1 = u + d;
  V* const u2 = u + 2 * d;
  V* const u3 = u + 3 * d;
  int64_t i0 = 0;
  for (; i0 < d; i0 += 4) {
    const int64_t nb = std::min<int64_t>(4, d - i0);
    if (nb == 4) {
      V* const r0 = A + tri(i0);
      V* const r1 = A + tri(i0 + 1);
      V* const r2 = A + tri(i0 + 2);
      V* const r3 = A + tri(i0 + 3);
      for (int64_t j = 0; j < i0; ++j) {
        const V* lj = A + tri(j);
        V s0 = r0[j], s1 = r1[j], s2 = r2[j], s3 = r3[j];
        V t0 = zero, t1 = zero, t2 = zero, t3 = zero;
        int64_t k = 0;
        for (; k + 2 <= j; k += 2) {
          const V l0 = lj[k], l1 = lj[k + 1];
          s0 = Ops::fnma(u0[k], l0, s0);
          s1 = Ops::fnma(u1[k], l0, s1);
          s2 = Ops::fnma(u2[k], l0, s2);
          s3 = Ops::fnma(u3[k], l0, s3);
          t0 = Ops::fnma(u0[k + 1], l1, t0);
          t1 = Ops::fnma(u1[k + 1], l1, t1);
          t2 = Ops::fnma(u2[k + 1], l1, t2);
          t3 = Ops::fnma(u3[k + 1], l1, t3);
        }
        if (k < j) {
          const V l0 = lj[k];
          s0 = Ops::fnma(u0[k], l0, s0);
          s1 = Ops::fnma(u1[k], l0, s1);
          s2 = Ops::fnma(u2[k], l0, s2);
          s3 = Ops::fnma(u3[k], l0, s3);
        }
        s0 += t0;
        s1 += t1;
        s2 += t2;
        s3 += t3;
        u0[j] = s0;
        u1[j] = s1;
        u2[j] = s2;
        u3[j] = s3;
        const V s = invD[j];
        r0[j] = s0 * s;
        r1[j] = s1 * s;
        r2[j] = s2 * s;
        r3[j] = s3 * s;
      }
    } else {  // the last d mod 4 rows: columns j < i0 one row at a time
      for (int64_t r = 0; r < nb; ++r) {
        V* const ai = A + tri(i0 + r);
        V* const ur = u + r * d;
        for (int64_t j = 0; j < i0; ++j) {
          const V uj = dot_sub<Ops>(ai[j], ur, A + tri(j), j);
          ur[j] = uj;
          ai[j] = uj * invD[j];
        }
      }
    }
    for (int64_t r = 0; r < nb; ++r) {  // inside the block, then the pivot
      const int64_t i = i0 + r;
      V* const ai = A + tri(i);
      V* const ur = u + r * d;
      for (int64_t j = i0; j < i; ++j) {
        const V uj = dot_sub<Ops>(ai[j], ur, A + tri(j), j);  // L_ij D_j
        ur[j] = uj;
        ai[j] = uj * invD[j];
      }
      const V p = dot_sub<Ops>(ai[i], ur, ai, i);
      bad |= ~((p > zero) & (p <= vmax));
      D[i] = p;
      invD[i] = one / p;
    }
  }
  return bad;
}

// tr(Sa^-1 Sb) into *tr and dm^T Sa^-1 dm into *maha, from unit La, invDa and unit Lb, Db.
// x: 4 d vectors of scratch.
template <class Ops, int DC>
MIAFW_KL_INLINE void lanes_solve(const typename Ops::V* La, const typename Ops::V* invDa, const typename Ops::V* Lb,
                                 const typename Ops::V* Db, const typename Ops::V* dm, int64_t dd, typename Ops::V* x,
                                 typename Ops::V* tr, typename Ops::V* maha) {
  typedef typename Ops::V V;
  const int64_t d = DC > 0 ? DC : dd;
  const V zero = {}, one = zero + 1.0;
  V t = zero;
  int64_t c0 = 0;
  // Large d: four columns c0..c0+3 of X at a time (x + r d holds column c0 + r, zero above
  // its diagonal), so each row of La is read once per four columns (measured 10% faster at
  // d = 64, 14% slower at d = 8 where La stays in L1).
  for (; d >= kKlZmmMinDim && c0 + 4 <= d; c0 += 4) {
    V* const x0 = x;
    V* const x1 = x + d;
    V* const x2 = x + 2 * d;
    V* const x3 = x + 3 * d;
    V acc[4];
    for (int r = 0; r < 4; ++r) {  // rows c0..c0+3
      V* const xr = x + r * d;
      const int64_t c = c0 + r;
      for (int64_t i = c0; i < c; ++i) xr[i] = zero;
      xr[c] = one;
      V a = invDa[c];
      for (int64_t i = c + 1; i < c0 + 4; ++i) {
        const V* ai = La + tri(i);
        const V s = dot_sub<Ops>(Lb[tri(i) + c] - ai[c], ai + c + 1, xr + c + 1, i - c - 1);
        xr[i] = s;
        a += (s * s) * invDa[i];
      }
      acc[r] = a;
    }
    for (int64_t i = c0 + 4; i < d; ++i) {
      const V* ai = La + tri(i);
      const V* bi = Lb + tri(i) + c0;
      V s0 = bi[0], s1 = bi[1], s2 = bi[2], s3 = bi[3];
      V t0 = zero, t1 = zero, t2 = zero, t3 = zero;
      int64_t k = c0;
      for (; k + 2 <= i; k += 2) {
        const V l0 = ai[k], l1 = ai[k + 1];
        s0 = Ops::fnma(l0, x0[k], s0);
        s1 = Ops::fnma(l0, x1[k], s1);
        s2 = Ops::fnma(l0, x2[k], s2);
        s3 = Ops::fnma(l0, x3[k], s3);
        t0 = Ops::fnma(l1, x0[k + 1], t0);
        t1 = Ops::fnma(l1, x1[k + 1], t1);
        t2 = Ops::fnma(l1, x2[k + 1], t2);
        t3 = Ops::fnma(l1, x3[k + 1], t3);
      }
      if (k < i) {
        const V l0 = ai[k];
        s0 = Ops::fnma(l0, x0[k], s0);
        s1 = Ops::fnma(l0, x1[k], s1);
        s2 = Ops::fnma(l0, x2[k], s2);
        s3 = Ops::fnma(l0, x3[k], s3);
      }
      s0 += t0;
      s1 += t1;
      s2 += t2;
      s3 += t3;
      x0[i] = s0;
      x1[i] = s1;
      x2[i] = s2;
      x3[i] = s3;
      const V w = invDa[i];
      acc[0] += (s0 * s0) * w;
      acc[1] += (s1 * s1) * w;
      acc[2] += (s2 * s2) * w;
      acc[3] += (s3 * s3) * w;
    }
    t += (acc[0] * Db[c0] + acc[1] * Db[c0 + 1]) + (acc[2] * Db[c0 + 2] + acc[3] * Db[c0 + 3]);
  }
  for (int64_t c = c0; c < d; ++c) {  // the last d mod 4 columns
    V acc = invDa[c];
    x[c] = one;
    for (int64_t i = c + 1; i < d; ++i) {
      const V* ai = La + tri(i);
      const V s = dot_sub<Ops>(Lb[tri(i) + c] - ai[c], ai + c + 1, x + c + 1, i - c - 1);
      x[i] = s;
      acc += (s * s) * invDa[i];
    }
    t += acc * Db[c];
  }
  typename Ops::V m = zero;
  for (int64_t i = 0; i < d; ++i) {
    const typename Ops::V s = dot_sub<Ops>(dm[i], La + tri(i), x, i);
    x[i] = s;
    m += (s * s) * invDa[i];
  }
  *tr = t;
  *maha = m;
}

// Packed lower triangles of nv <= W consecutive d x d matrices at c (lane l: c + l d^2;
// lanes from nv on repeat matrix nv - 1), plus jitter on the diagonal.
template <class Ops, int DC, typename T>
MIAFW_KL_INLINE void lanes_load(const T* c, int64_t dd, int nv, double jitter, typename Ops::V* A) {
  const int64_t d = DC > 0 ? DC : dd;
  // Element-major: each destination vector is written whole (the packed lanes exceed L1
  // for large d; lane-by-lane scalar stores were the largest cost at d = 64).
  int64_t off[Ops::W];
  for (int l = 0; l < Ops::W; ++l) off[l] = std::min(l, nv - 1) * d * d;
  for (int64_t i = 0; i < d; ++i) {
    typename Ops::V* ai = A + tri(i);
    const T* ci = c + i * d;
    for (int64_t j = 0; j <= i; ++j) {
      typename Ops::V v;
      for (int l = 0; l < Ops::W; ++l) v[l] = static_cast<double>(ci[off[l] + j]);
      ai[j] = v;
    }
  }
  if (jitter != 0.0) {
    for (int64_t i = 0; i < d; ++i) A[tri(i) + i] += jitter;
  }
}

// ln(prod Db / prod Da) per lane.
template <class Ops, int DC>
MIAFW_KL_INLINE typename Ops::V lanes_log_ratio(const typename Ops::V* Da, const typename Ops::V* Db, int64_t dd) {
  const int64_t d = DC > 0 ? DC : dd;
  const typename Ops::V zero = {};
  typename Ops::V pa = zero + 1.0, pb = zero + 1.0;
  for (int64_t k = 0; k < d; ++k) {
    pa *= Da[k];
    pb *= Db[k];
  }
  const typename Ops::V r = pb / pa;
  const typename Ops::V lo = zero + std::numeric_limits<double>::min();
  const typename Ops::V hi = zero + std::numeric_limits<double>::max();
  const typename Ops::M ok = (pa >= lo) & (pa <= hi) & (pb >= lo) & (pb <= hi) & (r >= lo) & (r <= hi);
  double rv[Ops::W], lv[Ops::W];
  std::memcpy(rv, &r, sizeof rv);
  for (int l = 0; l < Ops::W; ++l) lv[l] = log_normal(rv[l]);  // vectorizes; exact for normal r
  typename Ops::V out;
  std::memcpy(&out, lv, sizeof out);
  for (int l = 0; l < Ops::W; ++l) {
    if (!ok[l]) {
      double s = 0.0;
      for (int64_t k = 0; k < d; ++k) s += std::log(Db[k][l]) - std::log(Da[k][l]);
      out[l] = s;
    }
  }
  return out;
}

// Pairs [p0, p1) serially, covariance input. `scratch`: full_scratch_size(d) doubles for
// the scalar path; `lanes`: lane_scratch_size(d) doubles.
template <class Ops, int DC, typename T>
MIAFW_KL_INLINE KlError full_pairs_lanes(const FullArgs<T>& g, int64_t p0, int64_t p1,
                                         double* scratch, double* lanes) {
  const int64_t d = DC > 0 ? DC : g.d;
  const int64_t nt = tri(d);
  typename Ops::V* A0 = reinterpret_cast<typename Ops::V*>((reinterpret_cast<uintptr_t>(lanes) + 63) & ~uintptr_t(63));
  typename Ops::V* A1 = A0 + nt;
  typename Ops::V* D0 = A1 + nt;
  typename Ops::V* iD0 = D0 + d;
  typename Ops::V* D1 = iD0 + d;
  typename Ops::V* iD1 = D1 + d;
  typename Ops::V* dm = iD1 + d;
  typename Ops::V* x = dm + d;
  typename Ops::V* u = x + 4 * d;  // x: 4 d vectors, u: 4 d vectors
  const typename Ops::V zero = {};
  for (int64_t p = p0; p < p1; p += Ops::W) {
    // A short last batch repeats its last pair in the spare lanes, so every pair takes the
    // same arithmetic whatever the thread split.
    const int nv = static_cast<int>(std::min<int64_t>(Ops::W, p1 - p));
    lanes_load<Ops, DC>(g.cov0 + p * d * d, d, nv, g.jitter, A0);
    lanes_load<Ops, DC>(g.cov1 + p * d * d, d, nv, g.jitter, A1);
    for (int l = 0; l < Ops::W; ++l) {
      const T* m0 = g.mu0 + (p + std::min(l, nv - 1)) * d;
      const T* m1 = g.mu1 + (p + std::min(l, nv - 1)) * d;
      for (int64_t i = 0; i < d; ++i) {
        dm[i][l] = static_cast<double>(m1[i]) - static_cast<double>(m0[i]);
      }
    }
    const typename Ops::M bad = lanes_ldl<Ops, DC>(A0, d, D0, iD0, u) | lanes_ldl<Ops, DC>(A1, d, D1, iD1, u);
    int64_t any = 0;
    for (int l = 0; l < Ops::W; ++l) any |= bad[l];
    if (any) {  // names the first failing pair (or, rarely, succeeds where LDL^T did not)
      const KlError err = full_pairs(g, p, p + nv, scratch);
      if (!err.ok()) return err;
      continue;
    }
    typename Ops::V kl, tr, m, tr2, m2;
    if (g.dir == KlDirection::forward) {
      lanes_solve<Ops, DC>(A1, iD1, A0, D0, dm, d, x, &tr, &m);
      kl = tr + m - double(d) + lanes_log_ratio<Ops, DC>(D0, D1, d);
    } else if (g.dir == KlDirection::reverse) {
      lanes_solve<Ops, DC>(A0, iD0, A1, D1, dm, d, x, &tr, &m);
      kl = tr + m - double(d) + lanes_log_ratio<Ops, DC>(D1, D0, d);
    } else {
      lanes_solve<Ops, DC>(A1, iD1, A0, D0, dm, d, x, &tr, &m);
      lanes_solve<Ops, DC>(A0, iD0, A1, D1, dm, d, x, &tr2, &m2);
      kl = (tr + tr2) + (m + m2) - 2.0 * double(d);
    }
    kl = (zero + 0.5) * kl;
    for (int l = 0; l < nv; ++l) g.out[p + l] = static_cast<T>(kl[l]);
  }
  return KlError{};
}

// Dimension known at run time: fully unrolled fixed-d variants (d = 2..16) were measured
// slower here at d = 8 (and 20x the compile time).
template <class Ops, typename T>
MIAFW_KL_INLINE KlError full_pairs_dispatch(const FullArgs<T>& g, int64_t p0, int64_t p1,
                                            double* scratch, double* lanes) {
  if (g.cholesky) return full_pairs(g, p0, p1, scratch);
  return full_pairs_lanes<Ops, 0>(g, p0, p1, scratch, lanes);
}

template <typename T>
KlError full_pairs_baseline(const FullArgs<T>& g, int64_t p0, int64_t p1, double* s) {
  return full_pairs_dispatch<OpsBase>(g, p0, p1, s, s + full_scratch_size(g.d));
}
#if MIAFW_KL_X86_DISPATCH
template <typename T>
MIAFW_KL_TARGET_AVX2 KlError full_pairs_avx2(const FullArgs<T>& g, int64_t p0, int64_t p1,
                                             double* s) {
  return full_pairs_dispatch<OpsAvx2>(g, p0, p1, s, s + full_scratch_size(g.d));
}
template <typename T>
MIAFW_KL_TARGET_AVX512 KlError full_pairs_avx512(const FullArgs<T>& g, int64_t p0, int64_t p1,
                                                 double* s) {
  return full_pairs_dispatch<OpsAvx512>(g, p0, p1, s, s + full_scratch_size(g.d));
}
#endif

template <typename T>
inline KlError full_pairs_isa(const FullArgs<T>& g, int64_t p0, int64_t p1, double* s, KlIsa isa) {
#if MIAFW_KL_X86_DISPATCH
  // The 512-bit lane kernel only pays off for larger d: below kKlZmmMinDim the 256-bit one
  // (which an AVX-512 CPU also runs) was measured up to 1.3x faster.
  if (isa == KlIsa::avx512 && (g.cholesky || g.d >= kKlZmmMinDim)) return full_pairs_avx512(g, p0, p1, s);
  if (isa == KlIsa::avx512 || isa == KlIsa::avx2) return full_pairs_avx2(g, p0, p1, s);
#endif
  (void)isa;
  return full_pairs_baseline(g, p0, p1, s);
}


inline int thread_count(int num_threads, int64_t rows, int64_t work) {
#ifdef _OPENMP
  int nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  nth = static_cast<int>(std::min<int64_t>(nth, rows));
  if (work < kKlParallelThreshold || nth < 1) nth = 1;
  return nth;
#else
  (void)num_threads, (void)rows, (void)work;
  return 1;
#endif
}

inline KlIsa resolve_isa(KlIsa isa) {
  const KlIsa best = kl_best_isa();
  return static_cast<int>(isa) > static_cast<int>(best) ? best : isa;
}

// The error of the lowest thread that failed: thread ranges are ordered, and each thread
// stops at its own first failure, so this is the globally first failing row.
inline KlError first_error(const std::vector<KlError>& errs) {
  for (const KlError& e : errs) {
    if (!e.ok()) return e;
  }
  return KlError{};
}

}  // namespace kl_detail

// KL divergences of N pairs of diagonal Gaussians (D components, D = 1: univariate),
// out[i] for i < n. All arrays row-major and contiguous; out must not overlap the inputs.
// num_threads <= 0 means omp_get_max_threads(). `isa` is an upper bound on the instruction
// set (clamped to kl_best_isa()); tests use it to check every compiled variant.
template <typename T>
KlError gaussian_kl_diag(const T* mu0, const T* var0, const T* mu1, const T* var1, T* out,
                         int64_t n, int64_t d, KlDirection dir, int num_threads = 0,
                         KlIsa isa = KlIsa::avx512) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "float or double only");
  if (n <= 0) return KlError{};
  if (d <= 0) {  // an empty sum
    for (int64_t i = 0; i < n; ++i) out[i] = T(0);
    return KlError{};
  }
  const kl_detail::DiagArgs<T> g{mu0, var0, mu1, var1, out, n, d, dir};
  const KlIsa use = kl_detail::resolve_isa(isa);
  const int nth = kl_detail::thread_count(num_threads, n, n * d);
  if (nth <= 1) return kl_detail::diag_rows_isa(g, 0, n, use);
  std::vector<KlError> errs(static_cast<size_t>(nth));
#ifdef _OPENMP
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();  // may be fewer than asked for
    const int64_t r0 = even_split(n, team, tid);
    const int64_t r1 = even_split(n, team, tid + 1);
    if (r0 < r1) errs[static_cast<size_t>(tid)] = kl_detail::diag_rows_isa(g, r0, r1, use);
  }
#endif
  return kl_detail::first_error(errs);
}

// KL divergences of N pairs of full-covariance Gaussians of dimension 1 <= d <= kKlMaxDim
// (the caller checks the bound). mu [n, d], cov [n, d, d] row-major (lower Cholesky
// factors when `cholesky`); jitter >= 0 is added to each covariance's diagonal before
// factorising (ignored with `cholesky`). Never throws except std::bad_alloc for the
// scratch, which is allocated before the parallel region.
template <typename T>
KlError gaussian_kl_full(const T* mu0, const T* cov0, const T* mu1, const T* cov1, T* out,
                         int64_t n, int64_t d, KlDirection dir, bool cholesky, double jitter,
                         int num_threads = 0, KlIsa isa = KlIsa::avx512) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "float or double only");
  if (n <= 0) return KlError{};
  const kl_detail::FullArgs<T> g{mu0, cov0, mu1, cov1, out, n, d, dir, cholesky, cholesky ? 0.0 : jitter};
  const KlIsa use = kl_detail::resolve_isa(isa);
  const int64_t per_pair = d * d * d / 3 + d * d;
  const int64_t work = per_pair > 0 && n > kKlParallelThreshold / per_pair ? kKlParallelThreshold : n * per_pair;
  const int nth = kl_detail::thread_count(num_threads, n, work);
  const int64_t per = kl_detail::full_scratch_size(d) + kl_detail::lane_scratch_size(d);
  std::vector<double> scratch(static_cast<size_t>(per) * static_cast<size_t>(nth));
  if (nth <= 1) return kl_detail::full_pairs_isa(g, 0, n, scratch.data(), use);
  std::vector<KlError> errs(static_cast<size_t>(nth));
#ifdef _OPENMP
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t p0 = even_split(n, team, tid);
    const int64_t p1 = even_split(n, team, tid + 1);
    if (p0 < p1) {
      errs[static_cast<size_t>(tid)] =
          kl_detail::full_pairs_isa(g, p0, p1, scratch.data() + per * tid, use);
    }
  }
#endif
  return kl_detail::first_error(errs);
}

}  // namespace kernels
}  // namespace miafw
