// Multi-tensor in-place mask application on raw pointers.
//
// Free of torch and pybind11: the bindings (csrc/bindings.cpp) hand in plain pointers and
// element counts. One call masks a whole model: every (weights, mask) pair is a "segment",
// and all segments are processed in ONE OpenMP parallel region whose threads split the total
// element count statically (a thread's range may start in one segment and end in another).
//
// Two mask kinds, each bit-identical to its torch reference:
//   * float mask (same type as the weights):  w = w * m
//       == torch `w.mul_(m)`: plain IEEE multiply, so NaN * 0 stays NaN, -1 * 0 = -0.0,
//          inf * 0 = NaN. Build without -ffast-math (setup.py never adds it).
//   * bool / uint8 mask:                       w = m ? w : +0.0
//       == torch `w.masked_fill_(~m, 0)`: kept elements keep their exact bits (NaN payloads
//          included), dropped elements become +0.0.
//
// Threading: below kMaskParallelThreshold total elements no parallel region is opened at
// all. Only basic OpenMP (parallel, omp_get_thread_num / omp_get_num_threads /
// omp_get_max_threads) is used, so the extension runs on whichever libgomp the process
// already loaded (torch bundles one exporting up to GOMP_5.0 / OMP_5.0).
//
// Aliasing: segments may share a read-only mask, but a written range must not overlap any
// other segment's data or mask (the caller checks; a segment whose mask is its own data,
// element for element, is fine: every element is read before it is written).

#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace miafw {
namespace kernels {

// Total element count below which the kernel runs serially (no parallel region).
constexpr int64_t kMaskParallelThreshold = 65536;

// One (weights, mask) pair. `mask` is T (multiply) or bool / uint8_t (keep where nonzero).
template <typename T, typename M>
struct MaskSegment {
  T* data;
  const M* mask;
  int64_t n;
};

namespace detail {

// Float mask: w = w * m. No __restrict: a mask may legally be its own weights.
template <typename T>
inline void mask_span(T* w, const T* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    w[i] = w[i] * m[i];
  }
}

// Byte mask: w = m ? w : +0.0. The ternary with an unconditional store vectorizes to a blend.
template <typename T>
inline void mask_span(T* w, const uint8_t* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    w[i] = m[i] ? w[i] : T(0);
  }
}

// bool masks are read as bytes: a bool object holding anything but 0/1 is undefined
// behaviour in C++, a byte is not (and any nonzero byte means "keep", like numpy).
template <typename T>
inline void mask_span(T* w, const bool* m, int64_t n) {
  mask_span(w, reinterpret_cast<const uint8_t*>(m), n);
}

// First element of thread `tid`'s share of `total` elements split over `nth` threads.
// Interior boundaries are rounded down to a multiple of 16 elements so that neighbouring
// threads rarely write the same cache line. Monotone in tid; split(nth) == total.
inline int64_t split_point(int64_t total, int nth, int tid) {
  if (tid <= 0) return 0;
  if (tid >= nth) return total;
  const int64_t q = total / nth;
  const int64_t r = total % nth;
  const int64_t p = q * tid + std::min<int64_t>(tid, r);
  return p & ~int64_t(15);
}

template <typename T, typename M>
inline void run_serial(const MaskSegment<T, M>* segs, int64_t count) {
  for (int64_t s = 0; s < count; ++s) {
    if (segs[s].n > 0) mask_span(segs[s].data, segs[s].mask, segs[s].n);
  }
}

}  // namespace detail

// Applies every segment's mask to its data, in place.
//
// num_threads <= 0 means omp_get_max_threads() (the calling thread's OpenMP setting, which
// torch.set_num_threads also sets). Without OpenMP, or below kMaskParallelThreshold total
// elements, runs serially on the calling thread. Never throws.
template <typename T, typename M>
void apply_masks(const MaskSegment<T, M>* segs, int64_t count, int num_threads = 0) {
  static_assert(std::is_floating_point<T>::value, "weights must be float or double");
  static_assert(std::is_same<M, T>::value || std::is_same<M, bool>::value ||
                    std::is_same<M, uint8_t>::value,
                "mask must be the weight type, bool or uint8_t");
  if (count <= 0) return;

  int64_t total = 0;
  for (int64_t s = 0; s < count; ++s) total += std::max<int64_t>(segs[s].n, 0);

#ifdef _OPENMP
  int nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  // Never more threads than 16-element blocks, so every thread has work.
  nth = static_cast<int>(std::min<int64_t>(nth, std::max<int64_t>(total / 16, 1)));
  if (total < kMaskParallelThreshold || nth <= 1) {
    detail::run_serial(segs, count);
    return;
  }

  // offsets[s] = first global element index of segment s; offsets[count] = total.
  std::vector<int64_t> offsets(static_cast<size_t>(count) + 1);
  offsets[0] = 0;
  for (int64_t s = 0; s < count; ++s) {
    offsets[s + 1] = offsets[s] + std::max<int64_t>(segs[s].n, 0);
  }
  const int64_t* off = offsets.data();

#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();  // may be fewer than asked for
    const int64_t begin = detail::split_point(total, team, tid);
    const int64_t end = detail::split_point(total, team, tid + 1);
    if (begin < end) {
      // Segment holding `begin`: the last s with off[s] <= begin (skips empty segments).
      int64_t s = (std::upper_bound(off, off + count + 1, begin) - off) - 1;
      for (; s < count && off[s] < end; ++s) {
        const int64_t lo = std::max(begin, off[s]) - off[s];
        const int64_t hi = std::min(end, off[s + 1]) - off[s];
        if (hi > lo) detail::mask_span(segs[s].data + lo, segs[s].mask + lo, hi - lo);
      }
    }
  }
#else
  (void)num_threads;
  (void)total;
  detail::run_serial(segs, count);
#endif
}

template <typename T, typename M>
inline void apply_masks(const std::vector<MaskSegment<T, M>>& segs, int num_threads = 0) {
  apply_masks(segs.data(), static_cast<int64_t>(segs.size()), num_threads);
}

}  // namespace kernels
}  // namespace miafw
