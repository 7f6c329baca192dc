// Fake quantization (quantize, then dequantize) on raw pointers.
//
// Free of torch and pybind11: the bindings (csrc/bind_quant.cpp) hand in plain pointers, a
// (outer, channels, inner) layout and per-channel parameter arrays. A per-tensor call is the
// layout (1, 1, n); a per-channel call along axis `a` of a C-contiguous array is
// (prod(shape[:a]), shape[a], prod(shape[a+1:])).
//
// Affine fake quantization (nearest), per element, in the element type T (float or double):
//
//     y   = x * inv_scale                  inv_scale = T(1) / scale, computed in T
//     r   = nearbyint(y) + zero_point      (ties to even; zero_point held as a T)
//     q   = min(max(r, quant_min), quant_max)
//     out = (q - zero_point) * scale
//     code = int32(q)
//
// For T = float this is bit-identical to torch's CPU fake_quantize_per_tensor_affine /
// fake_quantize_per_channel_affine kernels (which compute `z + nearbyint(x * inv_scale)` in
// float, clamp, and multiply the integer difference by the float scale) on every non-NaN
// input (torch's per-channel op maps +inf to quant_min through an undefined float->int cast;
// this kernel clamps +inf to quant_max, as torch's per-tensor op does). Differences on
// purpose: NaN propagates (out = NaN, code = quant_min) where torch outputs the quant_min
// level. (q - zero_point) is an exact small integer, and equal values subtract to +0.0, so
// no -0.0 is produced, exactly as torch's integer difference.
//
// Evaluation order (nearest; same bits as above): y is first clamped to the integers
// [quant_min - zero_point, quant_max - zero_point] (rounding is monotone and fixes integers, so
// clamping before rounding equals clamping after, and |bounds| < 2^17), then rounded with the
// magic-number trick n = (y + 1.5*2^m) - 1.5*2^m (m = mantissa bits), exact round-half-to-even
// in the default rounding mode, vectorizing with plain SSE2; out = n * scale (n == q - zero_point
// exactly, never -0.0), code = n + zero_point. 6 vector operations per element. Stochastic
// rounding pre-clamps y to [-2^22, 2^22] (cannot change q) and clamps q after rounding.
// Requires the default FP environment (round to nearest) and no -ffast-math (setup.py never
// adds it); torch assumes the same. FMA contraction is disabled for this header.
//
// Stores: outputs of >= kQuantStreamBytes are computed in L1-sized chunks and written with
// non-temporal stores (no read-for-ownership of out); see QuantStore.
//
// Stochastic rounding replaces nearbyint(y) by floor(y) + (u < y - floor(y)), with
// u = uniform(seed, flat element index) from a counter-based hash (splitmix64 of the seeded
// index): the result depends only on (seed, index, x), never on the thread count.
// u has 24 (float) or 53 (double) random bits, so P(round up) = frac to within 2^-24 / 2^-53.
//
// Masked variant: the value quantized is v = m ? x : +0.0 (bool / uint8 mask) or v = x * m
// (float mask), bit-identical to applying the mask (mia_core apply_masks) and then quantizing.
//
// Derived parameters (when asked): per channel min/max of v (0 always included), then, in
// double (see quant_params below, mirrored by mia_core/kernels/_quant.py):
//     affine:    scale = max((max_pos - min_neg) / (quant_max - quant_min), eps)
//                zero_point = clamp(quant_min - nearbyint(min_neg / T(scale)), quant_min, quant_max)
//     symmetric: scale = max(max(-min_neg, max_pos) / ((quant_max - quant_min) / 2), eps); zp = 0
// with eps = 2^-23 (float32 epsilon, as torch's observers), and scale rounded to T.
// A non-finite min/max (NaN or inf in the data) sets `nonfinite` and nothing is written.
//
// Threading: ONE OpenMP parallel region per call (min-max reduction, a barrier, the
// parameters, a barrier, the quantization), static split of the flat index range; serial
// below kQuantParallelThreshold elements. Only basic OpenMP (parallel, barrier, single,
// omp_get_thread_num / omp_get_num_threads / omp_get_max_threads).
//
// Aliasing: out may be x itself (element i is read before it is written and the min-max
// pass ends at a barrier before any write); any other overlap is the caller's error.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/parallel.h"
#include "kernels/quant_elem.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

// The clamps below are float selects (`y < lo ? lo : y`); under GCC's default
// -ftrapping-math they count as control flow that may trap, and the loops do not vectorize.
// -fno-trapping-math changes no result (no reassociation, no contraction: it only stops
// preserving FP exception flags), so it is enabled for this header's functions only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

// SIMD: the extension is built for the baseline ISA (no -march). On x86-64 with GCC or clang
// the quantization loop is also compiled for AVX2 and AVX-512 through function target
// attributes and chosen at run time (quant_best_isa()), as in gaussian_kl.h. No FMA is
// enabled and contraction is off, so every variant performs the same correctly rounded IEEE
// operations and the results are bit-identical across variants.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MIAFW_Q_X86_DISPATCH 1
#define MIAFW_Q_INLINE inline __attribute__((always_inline))
#define MIAFW_Q_TARGET_AVX2 __attribute__((target("avx2")))
#define MIAFW_Q_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2")))
#else
#define MIAFW_Q_X86_DISPATCH 0
#define MIAFW_Q_INLINE inline
#endif

namespace miafw {
namespace kernels {

constexpr int64_t kQuantParallelThreshold = 65536;

// Outputs of at least this many bytes are written with non-temporal (streaming) stores: far
// larger than the per-core caches, so the next reader finds them in memory either way, and
// skipping the read-for-ownership of out cuts the memory traffic of a pass by about 1/3.
constexpr int64_t kQuantStreamBytes = int64_t(16) << 20;  // 16 MiB

// Instruction sets the quantization loop is compiled for; `automatic` picks the best one.
enum class QuantIsa : int { automatic = -1, baseline = 0, avx2 = 1, avx512 = 2 };

// Best instruction set this CPU (and OS) supports among those compiled in.
inline QuantIsa quant_best_isa() {
#if MIAFW_Q_X86_DISPATCH
  static const QuantIsa best = [] {
    if (cpu_has_avx512()) return QuantIsa::avx512;
    if (__builtin_cpu_supports("avx2")) return QuantIsa::avx2;
    return QuantIsa::baseline;
  }();
  return best;
#else
  return QuantIsa::baseline;
#endif
}

// How fake_quantize writes `out`: non-temporal stores for outputs of at least
// kQuantStreamBytes (automatic), never (regular) or for every long span (streaming).
// Results do not depend on it.
enum class QuantStore : int { automatic = 0, regular = 1, streaming = 2 };

// Whether `isa` can run here (automatic always can).
inline bool quant_isa_supported(QuantIsa isa) {
  if (isa == QuantIsa::automatic || isa == QuantIsa::baseline) return true;
  return static_cast<int>(isa) <= static_cast<int>(quant_best_isa());
}

// Documented floor of a derived scale (torch observers' eps for float32).
constexpr double kQuantScaleFloor = 1.1920928955078125e-07;  // 2^-23

struct QuantLayout {
  int64_t outer, channels, inner;
  int64_t total() const { return outer * channels * inner; }
};

enum class QuantScheme { affine = 0, symmetric = 1 };

// Per-channel parameters, each an array of `channels` values, written by the kernel when
// derived. zero_point is held as T (an exact integer).
template <typename T>
struct QuantParams {
  T* scale;
  T* inv_scale;
  T* zero_point;
};

struct QuantSpec {
  int64_t quant_min, quant_max;
  QuantScheme scheme;
  bool derive;        // compute scale / zero_point from min-max (else read them)
  bool stochastic;    // stochastic rounding (else nearest, ties to even)
  uint64_t seed;
};

namespace qdetail {

// Per-element maths (Magic, splitmix64, uniform, round_stochastic, masked_value, quant_one):
// kernels/quant_elem.h, shared with the CUDA twin.

#if defined(__GNUC__) && !defined(__clang__)
#define MIAFW_IVDEP _Pragma("GCC ivdep")
#else
#define MIAFW_IVDEP
#endif

// One span of `len` elements starting at flat index `off`: channel-constant parameters
// (scale[0] ...), or (PerElem, inner == 1) consecutive channels' parameters scale[j] ...
// out may be x itself (each iteration reads element j before writing it): hence no
// __restrict, and ivdep to keep the loop vectorized.
template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes>
// `dst` points at the destination of element `off` (out + off, or a chunk buffer).
MIAFW_Q_INLINE void quant_span_body(const T* x, const M* mask, T* dst, int32_t* codes,
                                    const T* scale, const T* inv, const T* zp, T qmin, T qmax,
                                    int64_t off, int64_t len, uint64_t key) {
  if constexpr (PerElem) {
    MIAFW_IVDEP
    for (int64_t j = 0; j < len; ++j) {
      const T v = masked_value<T, M>(x, mask, off + j);
      dst[j] = quant_one<T, Stochastic, WithCodes>(
          v, scale[j], inv[j], zp[j], qmin, qmax, key, static_cast<uint64_t>(off + j),
          WithCodes ? codes + off + j : nullptr);
    }
  } else {
    const T s = scale[0], iv = inv[0], z = zp[0];
    MIAFW_IVDEP
    for (int64_t j = 0; j < len; ++j) {
      const T v = masked_value<T, M>(x, mask, off + j);
      dst[j] = quant_one<T, Stochastic, WithCodes>(
          v, s, iv, z, qmin, qmax, key, static_cast<uint64_t>(off + j),
          WithCodes ? codes + off + j : nullptr);
    }
  }
}


#define MIAFW_QSPAN_PARAMS                                                                  \
  const T *x, const M *mask, T *out, int32_t *codes, const T *scale, const T *inv,          \
      const T *zp, T qmin, T qmax, int64_t off, int64_t len, uint64_t key, bool stream
#define MIAFW_QSPAN_ARGS x, mask, out, codes, scale, inv, zp, qmin, qmax, off, len, key, stream

// Elements per chunk of a streamed span (4 / 8 KiB: the chunk buffer stays in L1).
constexpr int64_t kQuantChunk = 1024;

// Non-temporal copy of n elements (n * sizeof(T) a multiple of 64) from the 64-byte aligned
// src to the 64-byte aligned dst, with the widest stores of the ISA (Isa: 0 SSE2, 1 AVX2,
// 2 AVX-512). Bit copies: values are unchanged.
#if MIAFW_Q_X86_DISPATCH
inline void stream_copy_sse2(char* dst, const char* src, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + b),
                     _mm_load_si128(reinterpret_cast<const __m128i*>(src + b)));
  }
}
MIAFW_Q_TARGET_AVX2 inline void stream_copy_avx2(char* dst, const char* src, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + b),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(src + b)));
  }
}
MIAFW_Q_TARGET_AVX512 inline void stream_copy_avx512(char* dst, const char* src, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + b),
                        _mm512_load_si512(reinterpret_cast<const void*>(src + b)));
  }
}
#endif

// A channel-constant span: directly into out, or (stream) in L1-resident chunks written to
// out with non-temporal stores (no read-for-ownership of out's cache lines: ~1/3 less memory
// traffic for a large output). Same arithmetic either way, so the same bits.
template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes, int Isa>
MIAFW_Q_INLINE void quant_span_run(MIAFW_QSPAN_PARAMS) {
#if MIAFW_Q_X86_DISPATCH
  if constexpr (!PerElem) {
    if (stream && len >= 4 * kQuantChunk) {
      alignas(64) T buf[kQuantChunk];
      const auto addr = reinterpret_cast<std::uintptr_t>(out + off);
      int64_t head = std::min<int64_t>(
          len, static_cast<int64_t>(((64 - (addr & 63)) & 63) / sizeof(T)));
      if ((addr % sizeof(T)) != 0) head = len;  // never: the bindings check alignment
      quant_span_body<T, M, Stochastic, PerElem, WithCodes>(x, mask, out + off, codes, scale,
                                                            inv, zp, qmin, qmax, off, head, key);
      int64_t j = head;
      for (; j + kQuantChunk <= len; j += kQuantChunk) {
        quant_span_body<T, M, Stochastic, PerElem, WithCodes>(
            x, mask, buf, codes, scale, inv, zp, qmin, qmax, off + j, kQuantChunk, key);
        char* d = reinterpret_cast<char*>(out + off + j);
        const char* src = reinterpret_cast<const char*>(buf);
        constexpr int64_t bytes = kQuantChunk * static_cast<int64_t>(sizeof(T));
        if constexpr (Isa == 2) {
          stream_copy_avx512(d, src, bytes);
        } else if constexpr (Isa == 1) {
          stream_copy_avx2(d, src, bytes);
        } else {
          stream_copy_sse2(d, src, bytes);
        }
      }
      quant_span_body<T, M, Stochastic, PerElem, WithCodes>(
          x, mask, out + off + j, codes, scale, inv, zp, qmin, qmax, off + j, len - j, key);
      _mm_sfence();  // order the streamed stores before the caller's barrier
      return;
    }
  }
#endif
  (void)stream;
  quant_span_body<T, M, Stochastic, PerElem, WithCodes>(x, mask, out + off, codes, scale, inv,
                                                        zp, qmin, qmax, off, len, key);
}

template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes>
void quant_span_baseline(MIAFW_QSPAN_PARAMS) {
  quant_span_run<T, M, Stochastic, PerElem, WithCodes, 0>(MIAFW_QSPAN_ARGS);
}
#if MIAFW_Q_X86_DISPATCH
template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes>
MIAFW_Q_TARGET_AVX2 void quant_span_avx2(MIAFW_QSPAN_PARAMS) {
  quant_span_run<T, M, Stochastic, PerElem, WithCodes, 1>(MIAFW_QSPAN_ARGS);
}
template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes>
MIAFW_Q_TARGET_AVX512 void quant_span_avx512(MIAFW_QSPAN_PARAMS) {
  quant_span_run<T, M, Stochastic, PerElem, WithCodes, 2>(MIAFW_QSPAN_ARGS);
}
#endif

// One span, compiled for the instruction set `isa` (identical results: the arithmetic is
// the same sequence of correctly rounded IEEE operations, no FMA contraction, only wider).
template <typename T, typename M, bool Stochastic, bool PerElem, bool WithCodes>
inline void quant_span(QuantIsa isa, MIAFW_QSPAN_PARAMS) {
#if MIAFW_Q_X86_DISPATCH
  if (isa == QuantIsa::avx512) {
    quant_span_avx512<T, M, Stochastic, PerElem, WithCodes>(MIAFW_QSPAN_ARGS);
    return;
  }
  if (isa == QuantIsa::avx2) {
    quant_span_avx2<T, M, Stochastic, PerElem, WithCodes>(MIAFW_QSPAN_ARGS);
    return;
  }
#endif
  (void)isa;
  quant_span_baseline<T, M, Stochastic, PerElem, WithCodes>(MIAFW_QSPAN_ARGS);
}
#undef MIAFW_QSPAN_PARAMS
#undef MIAFW_QSPAN_ARGS


// Calls f(c, off, len, per_elem) for the spans of [begin, end) in layout L: channel-constant
// spans (per_elem=false, channel c) or, when inner == 1 and channels > 1, channel-varying spans
// starting at channel c (per_elem=true).
template <typename F>
inline void walk(const QuantLayout& L, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  const int64_t C = L.channels, I = L.inner;
  if (C == 1) {
    f(int64_t(0), begin, end - begin, false);
    return;
  }
  if (I == 1) {
    int64_t i = begin;
    while (i < end) {
      const int64_t c = i % C;
      const int64_t len = std::min(end - i, C - c);
      f(c, i, len, true);
      i += len;
    }
    return;
  }
  int64_t i = begin;
  while (i < end) {
    const int64_t row = i / I;
    const int64_t c = row % C;
    const int64_t len = std::min(end - i, (row + 1) * I - i);
    f(c, i, len, false);
    i += len;
  }
}

// min / max of v over a span into mn[c], mx[c] (NaN poisons through `bad`).
template <typename T, typename M>
inline void minmax_span(const T* x, const M* m, int64_t off, int64_t len, bool per_elem, int64_t c,
                        T* mn, T* mx, bool* bad) {
  if (per_elem) {
    for (int64_t j = 0; j < len; ++j) {
      const T v = masked_value<T, M>(x, m, off + j);
      if (v != v) *bad = true;
      mn[c + j] = v < mn[c + j] ? v : mn[c + j];
      mx[c + j] = v > mx[c + j] ? v : mx[c + j];
    }
    return;
  }
  // Lane-striped in U 16-byte GCC/clang vectors (native SSE2 width, so the comparisons stay
  // vector instructions); min/max are exact, so the order does not matter (a NaN never
  // replaces a bound; it sets `bad`).
  constexpr int L = static_cast<int>(16 / sizeof(T));
  constexpr int U = 4;
  constexpr int W = L * U;
  using I = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  typedef T V __attribute__((vector_size(16)));
  typedef I VI __attribute__((vector_size(16)));
  V vmn[U], vmx[U];
  VI vbad[U];
  for (int u = 0; u < U; ++u) {
    for (int w = 0; w < L; ++w) {
      vmn[u][w] = mn[c];
      vmx[u][w] = mx[c];
      vbad[u][w] = 0;
    }
  }
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    for (int u = 0; u < U; ++u) {
      V v;
      if constexpr (std::is_same<M, NoMask>::value) {
        std::memcpy(&v, x + off + j + u * L, sizeof(V));
      } else {
        for (int w = 0; w < L; ++w) v[w] = masked_value<T, M>(x, m, off + j + u * L + w);
      }
      vbad[u] |= (v != v);
      vmn[u] = v < vmn[u] ? v : vmn[u];
      vmx[u] = v > vmx[u] ? v : vmx[u];
    }
  }
  T lmn = mn[c], lmx = mx[c];
  bool lbad = false;
  for (int u = 0; u < U; ++u) {
    for (int w = 0; w < L; ++w) {
      lmn = vmn[u][w] < lmn ? vmn[u][w] : lmn;
      lmx = vmx[u][w] > lmx ? vmx[u][w] : lmx;
      lbad = lbad || vbad[u][w] != 0;
    }
  }
  for (; j < len; ++j) {
    const T v = masked_value<T, M>(x, m, off + j);
    lbad = lbad || v != v;
    lmn = v < lmn ? v : lmn;
    lmx = v > lmx ? v : lmx;
  }
  mn[c] = lmn;
  mx[c] = lmx;
  if (lbad) *bad = true;
}

}  // namespace qdetail

// Derived parameters of one channel from its min / max (see the header comment). Returns
// false (and writes nothing) when min or max is not finite.
template <typename T>
inline bool quant_params(T mn, T mx, int64_t quant_min, int64_t quant_max, QuantScheme scheme,
                         T* scale, T* inv_scale, T* zero_point) {
  if (!std::isfinite(mn) || !std::isfinite(mx)) return false;
  const double min_neg = std::min(static_cast<double>(mn), 0.0);
  const double max_pos = std::max(static_cast<double>(mx), 0.0);
  const double range = static_cast<double>(quant_max - quant_min);
  double s;
  double z;
  if (scheme == QuantScheme::symmetric) {
    s = std::max(-min_neg, max_pos) / (range / 2.0);
    s = std::max(s, kQuantScaleFloor);
    z = 0.0;
  } else {
    s = (max_pos - min_neg) / range;
    s = std::max(s, kQuantScaleFloor);
    const T st = static_cast<T>(s);
    z = static_cast<double>(quant_min) - std::nearbyint(min_neg / static_cast<double>(st));
    z = std::min(std::max(z, static_cast<double>(quant_min)), static_cast<double>(quant_max));
  }
  const T st = static_cast<T>(s);
  *scale = st;
  *inv_scale = T(1) / st;
  *zero_point = static_cast<T>(z);
  return true;
}

// Fake-quantizes x (optionally masked) into out (and codes, when not null).
//
// M is qdetail::NoMask (mask ignored, pass nullptr), uint8_t (bool mask) or T (float mask).
// params arrays have L.channels entries; read when !spec.derive, written when spec.derive.
// Returns false only when spec.derive and the data hold NaN or inf (nothing written then).
// num_threads <= 0 means omp_get_max_threads(). isa: the quantization loop's instruction set
// (automatic, or one not supported here: quant_best_isa()); store: how out is written (see
// QuantStore). Results depend on neither.
// Never throws.
template <typename T, typename M>
bool fake_quantize(const T* x, const M* mask, T* out, int32_t* codes, QuantLayout L,
                   QuantParams<T> params, const QuantSpec& spec, int num_threads = 0,
                   QuantIsa isa = QuantIsa::automatic,
                   QuantStore store = QuantStore::automatic) {
  static_assert(std::is_floating_point<T>::value, "T must be float or double");
  if (isa == QuantIsa::automatic || !quant_isa_supported(isa)) isa = quant_best_isa();
  const bool stream =
      store == QuantStore::streaming ||
      (store == QuantStore::automatic &&
       L.total() * static_cast<int64_t>(sizeof(T)) >= kQuantStreamBytes);
  const int64_t total = L.total();
  const int64_t C = L.channels;
  const T qmin = static_cast<T>(spec.quant_min), qmax = static_cast<T>(spec.quant_max);
  const uint64_t key = qdetail::seed_key(spec.seed);

  auto quant_range = [&](int64_t begin, int64_t end) {
    qdetail::walk(L, begin, end, [&](int64_t c, int64_t off, int64_t len, bool per_elem) {
      const T* s = params.scale + c;
      const T* iv = params.inv_scale + c;
      const T* z = params.zero_point + c;
      // Index shift so that per-channel arrays line up with the span's first element.
#define MIAFW_QSPAN(ST, PE, CD)                                                            \
  qdetail::quant_span<T, M, ST, PE, CD>(isa, x, mask, out, codes, s, iv, z, qmin, qmax, off, len, \
                                       key, stream)
#define MIAFW_QSPAN_CD(ST, PE) \
  if (codes) {                 \
    MIAFW_QSPAN(ST, PE, true); \
  } else {                     \
    MIAFW_QSPAN(ST, PE, false); \
  }
      if (spec.stochastic) {
        if (per_elem) {
          MIAFW_QSPAN_CD(true, true)
        } else {
          MIAFW_QSPAN_CD(true, false)
        }
      } else {
        if (per_elem) {
          MIAFW_QSPAN_CD(false, true)
        } else {
          MIAFW_QSPAN_CD(false, false)
        }
      }
#undef MIAFW_QSPAN_CD
#undef MIAFW_QSPAN
    });
  };
  auto minmax_range = [&](int64_t begin, int64_t end, T* mn, T* mx, bool* bad) {
    qdetail::walk(L, begin, end, [&](int64_t c, int64_t off, int64_t len, bool per_elem) {
      qdetail::minmax_span<T, M>(x, mask, off, len, per_elem, c, mn, mx, bad);
    });
  };
  auto finish_params = [&](const T* mn, const T* mx) -> bool {
    for (int64_t c = 0; c < C; ++c) {
      if (!quant_params<T>(mn[c], mx[c], spec.quant_min, spec.quant_max, spec.scheme,
                           params.scale + c, params.inv_scale + c, params.zero_point + c)) {
        return false;
      }
    }
    return true;
  };

  if (total <= 0) {
    if (spec.derive) {
      std::vector<T> z(static_cast<size_t>(std::max<int64_t>(C, 1)), T(0));
      finish_params(z.data(), z.data());
    }
    return true;
  }

  int nth = 1;
#ifdef _OPENMP
  nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  nth = static_cast<int>(std::min<int64_t>(nth, std::max<int64_t>(total / 16, 1)));
  if (total < kQuantParallelThreshold) nth = 1;
#else
  (void)num_threads;
#endif

  if (nth <= 1) {
    if (spec.derive) {
      std::vector<T> mn(static_cast<size_t>(C), T(0)), mx(static_cast<size_t>(C), T(0));
      bool bad = false;
      minmax_range(0, total, mn.data(), mx.data(), &bad);
      if (bad || !finish_params(mn.data(), mx.data())) return false;
    }
    quant_range(0, total);
    return true;
  }

#ifdef _OPENMP
  // Per-thread partial minima / maxima (initialised to 0: zero is always in the range).
  std::vector<T> pmn, pmx;
  std::vector<uint8_t> pbad;
  if (spec.derive) {
    pmn.assign(static_cast<size_t>(nth * C), T(0));
    pmx.assign(static_cast<size_t>(nth * C), T(0));
    pbad.assign(static_cast<size_t>(nth), 0);
  }
  bool ok = true;
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t begin = split_point(total, team, tid);
    const int64_t end = split_point(total, team, tid + 1);
    if (spec.derive) {
      bool bad = false;
      minmax_range(begin, end, pmn.data() + tid * C, pmx.data() + tid * C, &bad);
      pbad[tid] = bad;
#pragma omp barrier
#pragma omp single
      {
        for (int t = 0; t < team && ok; ++t) ok = !pbad[t];
        if (ok) {
          for (int t = 1; t < team; ++t) {
            for (int64_t c = 0; c < C; ++c) {
              const T a = pmn[t * C + c], b = pmx[t * C + c];
              pmn[c] = a < pmn[c] ? a : pmn[c];
              pmx[c] = b > pmx[c] ? b : pmx[c];
            }
          }
          ok = finish_params(pmn.data(), pmx.data());
        }
      }  // implicit barrier: everyone sees `ok` and the parameters
    }
    if (ok) quant_range(begin, end);
  }
  return ok;
#else
  return true;
#endif
}

// ---------------------------------------------------------------------------------------------
// Sign (1 bit) and ternary quantizers. Scales are means of |x| accumulated in double in a
// fixed order that does not depend on the thread count: per channel, elements in flat order
// summed in 8 interleaved lanes, lanes then added in order.
// ---------------------------------------------------------------------------------------------

namespace qdetail {

// Sum of |x| over channel c's elements (flat order), optionally skipping `skip[k]` entries.
template <typename T>
inline double channel_abs_sum(const T* x, const QuantLayout& L, int64_t c) {
  constexpr int W = 8;
  double acc[W] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;  // position within the channel's element sequence
  for (int64_t o = 0; o < L.outer; ++o) {
    const T* row = x + (o * L.channels + c) * L.inner;
    for (int64_t i = 0; i < L.inner; ++i, ++k) {
      acc[k % W] += static_cast<double>(std::fabs(row[i]));
    }
  }
  double s = 0.0;
  for (int w = 0; w < W; ++w) s += acc[w];
  return s;
}

}  // namespace qdetail

// out = x < 0 ? -s_c : +s_c with s_c = given scale[c] or mean |x| over channel c (written
// into scale when derive). NaN in a channel makes its derived s NaN (NaN propagates).
template <typename T>
void fake_quantize_sign(const T* x, T* out, QuantLayout L, T* scale, bool derive,
                        int num_threads = 0) {
  const int64_t total = L.total();
  const int64_t C = L.channels;
  const int64_t per = L.outer * L.inner;
  int nth = 1;
#ifdef _OPENMP
  nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (total < kQuantParallelThreshold) nth = 1;
#else
  (void)num_threads;
#endif
  auto derive_c = [&](int64_t c) {
    scale[c] = per > 0 ? static_cast<T>(qdetail::channel_abs_sum(x, L, c) / static_cast<double>(per))
                       : T(0);
  };
  auto apply_range = [&](int64_t begin, int64_t end) {
    qdetail::walk(L, begin, end, [&](int64_t c, int64_t off, int64_t len, bool per_elem) {
      if (per_elem) {
        for (int64_t j = 0; j < len; ++j) out[off + j] = x[off + j] < T(0) ? -scale[c + j] : scale[c + j];
      } else {
        const T s = scale[c];
        for (int64_t j = 0; j < len; ++j) out[off + j] = x[off + j] < T(0) ? -s : s;
      }
    });
  };
  if (nth <= 1 || total <= 0) {
    if (derive)
      for (int64_t c = 0; c < C; ++c) derive_c(c);
    apply_range(0, total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    if (derive) {
      // Channels split statically over threads; a channel's sum is serial (fixed order).
      const int64_t c0 = C * tid / team, c1 = C * (tid + 1) / team;
      for (int64_t c = c0; c < c1; ++c) derive_c(c);
#pragma omp barrier
    }
    apply_range(split_point(total, team, tid), split_point(total, team, tid + 1));
  }
#endif
}

// Ternary: per channel, the k = zero_count[c] entries of smallest |x| (ties: lower flat index
// first) become +0.0; the rest become x < 0 ? -s : +s with s = mean |x| of the kept entries
// (double, fixed order; 0 when none are kept), written into scale. x must hold no NaN (the
// caller checks). out must not alias x.
template <typename T>
void fake_quantize_ternary(const T* x, T* out, QuantLayout L, const int64_t* zero_count, T* scale,
                           int num_threads = 0) {
  const int64_t C = L.channels;
  const int64_t per = L.outer * L.inner;
  auto one_channel = [&](int64_t c, std::vector<T>& buf) {
    const int64_t k = std::min<int64_t>(std::max<int64_t>(zero_count[c], 0), per);
    // Threshold t = k-th smallest |x|; entries below t are zeroed, then the first
    // (k - below) entries equal to t in flat order.
    buf.resize(static_cast<size_t>(per));
    int64_t p = 0;
    for (int64_t o = 0; o < L.outer; ++o) {
      const T* row = x + (o * C + c) * L.inner;
      for (int64_t i = 0; i < L.inner; ++i) buf[p++] = std::fabs(row[i]);
    }
    T t = T(0);
    int64_t below = 0;
    if (k > 0) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end());
      t = buf[k - 1];
      for (int64_t j = 0; j < k - 1; ++j) below += buf[j] < t;
    }
    int64_t ties_left = k > 0 ? k - below : 0;
    constexpr int W = 8;
    double acc[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t kept = 0;
    // First pass: decide and accumulate in flat order; zeros written now, kept entries later.
    for (int64_t o = 0; o < L.outer; ++o) {
      const int64_t base = (o * C + c) * L.inner;
      for (int64_t i = 0; i < L.inner; ++i) {
        const T a = std::fabs(x[base + i]);
        bool zero = false;
        if (k > 0) {
          if (a < t) {
            zero = true;
          } else if (a == t && ties_left > 0) {
            zero = true;
            --ties_left;
          }
        }
        if (zero) {
          out[base + i] = T(0);
        } else {
          acc[kept % W] += static_cast<double>(a);
          ++kept;
          out[base + i] = T(1);  // marker: kept
        }
      }
    }
    double sum = 0.0;
    for (int w = 0; w < W; ++w) sum += acc[w];
    const T s = kept > 0 ? static_cast<T>(sum / static_cast<double>(kept)) : T(0);
    scale[c] = s;
    for (int64_t o = 0; o < L.outer; ++o) {
      const int64_t base = (o * C + c) * L.inner;
      for (int64_t i = 0; i < L.inner; ++i) {
        if (out[base + i] != T(0)) out[base + i] = x[base + i] < T(0) ? -s : s;
      }
    }
  };
  int nth = 1;
#ifdef _OPENMP
  nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  nth = static_cast<int>(std::min<int64_t>(nth, C));
  if (L.total() < kQuantParallelThreshold) nth = 1;
#else
  (void)num_threads;
#endif
  if (nth <= 1) {
    std::vector<T> buf;
    for (int64_t c = 0; c < C; ++c) one_channel(c, buf);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    std::vector<T> buf;
    const int64_t c0 = C * tid / team, c1 = C * (tid + 1) / team;
    for (int64_t c = c0; c < c1; ++c) one_channel(c, buf);
  }
#endif
}

}  // namespace kernels
}  // namespace miafw

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
