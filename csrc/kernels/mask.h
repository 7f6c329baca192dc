// Mask kernels of the prune defense on raw pointers:
//   * apply_masks     -- multi-tensor in-place mask application (below);
//   * magnitude_masks -- keep-masks removing exactly k smallest-|w| entries per problem
//                        (second half of this file).
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
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/parallel.h"

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
    const int64_t begin = split_point(total, team, tid);
    const int64_t end = split_point(total, team, tid + 1);
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

// ======================================================================================
// Magnitude masks: keep-masks that remove exactly k smallest-|w| entries per problem.
//
// A "problem" is an ordered list of segments (its concatenation order is the position
// order). Exactly `k` entries are removed (keep = 0), the others kept (keep = 1):
//   * order by magnitude |w|; NaN (any sign, any payload) counts as the LARGEST magnitude,
//     larger than +inf, and all NaNs are equal to each other;
//   * equal magnitudes (also -0.0 vs +0.0, and NaN vs NaN) are broken by position: the
//     lower position is removed first.
// This is exactly torch.argsort(|w|, stable=True)[:k] (torch sorts NaN last, stably), the
// reference in mia_core/kernels/_mask.py.
//
// Method: |w| is mapped to an unsigned integer key (the IEEE bits without the sign; every
// NaN -> the key of +inf plus one) whose integer order is the magnitude order. A histogram
// of the top B bits finds the bin holding the k-th smallest key; the keys of that bin are
// collected and std::nth_element gives the exact threshold key T. Then keep = key > T,
// except that the first (k - #{key < T}) entries with key == T (in position order) are
// removed too. O(n): three streaming reads of the weights and one write of the masks.
//
// Threading: problems run in parallel (one thread each) when there are at least as many as
// threads; otherwise each large problem is split over the threads (per-thread histograms,
// candidate lists, and a tie count prefix so the position rule is kept). Below
// kMaskParallelThreshold total elements everything runs serially.
// ======================================================================================

template <typename T>
struct MagTraits;

template <>
struct MagTraits<float> {
  using Key = uint32_t;
  static constexpr Key kAbs = 0x7fffffffu;
  static constexpr Key kInf = 0x7f800000u;
  static constexpr int kBits = 31;  // keys are < 2^31
};

template <>
struct MagTraits<double> {
  using Key = uint64_t;
  static constexpr Key kAbs = 0x7fffffffffffffffull;
  static constexpr Key kInf = 0x7ff0000000000000ull;
  static constexpr int kBits = 63;  // keys are < 2^63
};

// Integer key whose unsigned order is the order of |x|, NaN largest (all NaNs equal).
template <typename T>
inline typename MagTraits<T>::Key magnitude_key(T x) {
  using Tr = MagTraits<T>;
  typename Tr::Key u;
  std::memcpy(&u, &x, sizeof u);
  u &= Tr::kAbs;
  return u > Tr::kInf ? Tr::kInf + 1 : u;
}

// One contiguous run of a problem: `n` weights read from `data`, keep flags written to `keep`.
template <typename T>
struct MagSegment {
  const T* data;
  uint8_t* keep;
  int64_t n;
};

// Segments [first, first + count) of the segment array form one problem; remove `k`.
struct MagProblem {
  int64_t first;
  int64_t count;
  int64_t k;
};

namespace detail {

inline int hist_bits(int64_t total) {
  int b = 0;
  while (b < 62 && (int64_t(1) << (b + 1)) <= total) ++b;  // floor(log2(total))
  return std::max(8, std::min(16, b - 2));
}

// Calls fn(segment index, lo, hi) for the element range [begin, end) of the concatenation.
template <typename T, typename Fn>
inline void for_range(const MagSegment<T>* segs, const int64_t* off, int64_t count,
                      int64_t begin, int64_t end, Fn&& fn) {
  if (begin >= end) return;
  int64_t s = (std::upper_bound(off, off + count + 1, begin) - off) - 1;
  for (; s < count && off[s] < end; ++s) {
    const int64_t lo = std::max(begin, off[s]) - off[s];
    const int64_t hi = std::min(end, off[s + 1]) - off[s];
    if (hi > lo) fn(s, lo, hi);
  }
}

template <typename T>
inline void mag_hist(const T* x, int64_t n, int shift, int64_t* hist) {
  for (int64_t i = 0; i < n; ++i) ++hist[magnitude_key(x[i]) >> shift];
}

template <typename T>
inline void mag_collect(const T* x, int64_t n, int shift, typename MagTraits<T>::Key bin,
                        std::vector<typename MagTraits<T>::Key>& out) {
  for (int64_t i = 0; i < n; ++i) {
    const auto key = magnitude_key(x[i]);
    if ((key >> shift) == bin) out.push_back(key);
  }
}

// keep = key > t (no ties to keep: every key == t is removed). Vectorizes.
template <typename T>
inline void mag_write_gt(const T* x, uint8_t* keep, int64_t n, typename MagTraits<T>::Key t) {
  for (int64_t i = 0; i < n; ++i) keep[i] = static_cast<uint8_t>(magnitude_key(x[i]) > t);
}

// keep = key > t, except that ties are removed while *taken < need (position order).
template <typename T>
inline void mag_write_ties(const T* x, uint8_t* keep, int64_t n, typename MagTraits<T>::Key t,
                           int64_t need, int64_t* taken) {
  int64_t tk = *taken;
  for (int64_t i = 0; i < n; ++i) {
    const auto key = magnitude_key(x[i]);
    uint8_t kp = static_cast<uint8_t>(key > t);
    if (key == t) {
      kp = static_cast<uint8_t>(tk >= need);
      tk += tk < need;
    }
    keep[i] = kp;
  }
  *taken = tk;
}

template <typename T>
inline int64_t mag_count_eq(const T* x, int64_t n, typename MagTraits<T>::Key t) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += magnitude_key(x[i]) == t;
  return c;
}

// Threshold of one problem from its merged histogram and candidate keys.
// Returns T; sets *less (# keys < T) and *equal (# keys == T).
template <typename Key>
inline Key mag_threshold(std::vector<Key>& cand, int64_t rank_in_bin, int64_t less_bin,
                         int64_t* less, int64_t* equal) {
  std::nth_element(cand.begin(), cand.begin() + rank_in_bin, cand.end());
  const Key t = cand[static_cast<size_t>(rank_in_bin)];
  int64_t lt = 0, eq = 0;
  for (const Key c : cand) {
    lt += c < t;
    eq += c == t;
  }
  *less = less_bin + lt;
  *equal = eq;
  return t;
}

// Bin holding the key of rank k-1 (0-based); *less_bin = # keys in lower bins.
inline int64_t mag_find_bin(const int64_t* hist, int64_t nbins, int64_t k, int64_t* less_bin) {
  int64_t cum = 0;
  for (int64_t b = 0; b < nbins; ++b) {
    if (cum + hist[b] >= k) {
      *less_bin = cum;
      return b;
    }
    cum += hist[b];
  }
  *less_bin = cum;  // unreachable for 0 < k <= total
  return nbins - 1;
}

template <typename T>
inline void mag_fill(const MagSegment<T>* segs, int64_t count, uint8_t value) {
  for (int64_t s = 0; s < count; ++s) {
    if (segs[s].n > 0) std::memset(segs[s].keep, value, static_cast<size_t>(segs[s].n));
  }
}

// One problem on the calling thread. `hist` and `cand` are reusable scratch.
template <typename T>
void magnitude_problem_serial(const MagSegment<T>* segs, int64_t count, int64_t k,
                              std::vector<int64_t>& hist,
                              std::vector<typename MagTraits<T>::Key>& cand) {
  using Key = typename MagTraits<T>::Key;
  int64_t total = 0;
  for (int64_t s = 0; s < count; ++s) total += std::max<int64_t>(segs[s].n, 0);
  if (k <= 0) return mag_fill(segs, count, 1);
  if (k >= total) return mag_fill(segs, count, 0);

  const int bits = hist_bits(total);
  const int shift = MagTraits<T>::kBits - bits;
  const int64_t nbins = int64_t(1) << bits;
  hist.assign(static_cast<size_t>(nbins), 0);
  for (int64_t s = 0; s < count; ++s) mag_hist(segs[s].data, segs[s].n, shift, hist.data());
  int64_t less_bin = 0;
  const int64_t bin = mag_find_bin(hist.data(), nbins, k, &less_bin);
  cand.clear();
  cand.reserve(static_cast<size_t>(hist[bin]));
  for (int64_t s = 0; s < count; ++s) {
    mag_collect(segs[s].data, segs[s].n, shift, static_cast<Key>(bin), cand);
  }
  int64_t less = 0, equal = 0;
  const Key t = mag_threshold(cand, k - 1 - less_bin, less_bin, &less, &equal);
  const int64_t need = k - less;  // 1 <= need <= equal
  if (need == equal) {
    for (int64_t s = 0; s < count; ++s) mag_write_gt(segs[s].data, segs[s].keep, segs[s].n, t);
  } else {
    int64_t taken = 0;
    for (int64_t s = 0; s < count; ++s) {
      mag_write_ties(segs[s].data, segs[s].keep, segs[s].n, t, need, &taken);
    }
  }
}

#ifdef _OPENMP
// One problem split over `nth` threads (same result as the serial version).
template <typename T>
void magnitude_problem_parallel(const MagSegment<T>* segs, int64_t count, int64_t k, int nth) {
  using Key = typename MagTraits<T>::Key;
  std::vector<int64_t> offsets(static_cast<size_t>(count) + 1, 0);
  for (int64_t s = 0; s < count; ++s) {
    offsets[s + 1] = offsets[s] + std::max<int64_t>(segs[s].n, 0);
  }
  const int64_t total = offsets[count];
  if (k <= 0) return mag_fill(segs, count, 1);
  if (k >= total) return mag_fill(segs, count, 0);
  const int64_t* off = offsets.data();

  const int bits = hist_bits(total);
  const int shift = MagTraits<T>::kBits - bits;
  const int64_t nbins = int64_t(1) << bits;
  std::vector<int64_t> hist(static_cast<size_t>(nbins), 0);
  std::vector<std::vector<int64_t>> local_hist(static_cast<size_t>(nth));
  std::vector<std::vector<Key>> local_cand(static_cast<size_t>(nth));
  std::vector<int64_t> eq_before(static_cast<size_t>(nth) + 1, 0);
  int64_t bin = 0, less_bin = 0, less = 0, equal = 0;
  Key t = 0;
  std::vector<Key> cand;

#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t begin = split_point(total, team, tid);
    const int64_t end = split_point(total, team, tid + 1);

    std::vector<int64_t>& h = local_hist[static_cast<size_t>(tid)];
    h.assign(static_cast<size_t>(nbins), 0);
    for_range(segs, off, count, begin, end, [&](int64_t s, int64_t lo, int64_t hi) {
      mag_hist(segs[s].data + lo, hi - lo, shift, h.data());
    });
#pragma omp barrier
#pragma omp single
    {
      for (int i = 0; i < team; ++i) {
        const int64_t* hi = local_hist[static_cast<size_t>(i)].data();
        for (int64_t b = 0; b < nbins; ++b) hist[b] += hi[b];
      }
      bin = mag_find_bin(hist.data(), nbins, k, &less_bin);
    }  // implicit barrier
    std::vector<Key>& c = local_cand[static_cast<size_t>(tid)];
    for_range(segs, off, count, begin, end, [&](int64_t s, int64_t lo, int64_t hi) {
      mag_collect(segs[s].data + lo, hi - lo, shift, static_cast<Key>(bin), c);
    });
#pragma omp barrier
#pragma omp single
    {
      cand.reserve(static_cast<size_t>(hist[bin]));
      for (int i = 0; i < team; ++i) {
        const auto& ci = local_cand[static_cast<size_t>(i)];
        cand.insert(cand.end(), ci.begin(), ci.end());
      }
      t = mag_threshold(cand, k - 1 - less_bin, less_bin, &less, &equal);
    }  // implicit barrier
    const int64_t need = k - less;
    if (need == equal) {
      for_range(segs, off, count, begin, end, [&](int64_t s, int64_t lo, int64_t hi) {
        mag_write_gt(segs[s].data + lo, segs[s].keep + lo, hi - lo, t);
      });
    } else {
      int64_t mine = 0;
      for_range(segs, off, count, begin, end, [&](int64_t s, int64_t lo, int64_t hi) {
        mine += mag_count_eq(segs[s].data + lo, hi - lo, t);
      });
      eq_before[static_cast<size_t>(tid) + 1] = mine;
#pragma omp barrier
#pragma omp single
      {
        for (int i = 0; i < team; ++i) eq_before[i + 1] += eq_before[i];
      }  // implicit barrier
      int64_t taken = eq_before[static_cast<size_t>(tid)];
      for_range(segs, off, count, begin, end, [&](int64_t s, int64_t lo, int64_t hi) {
        mag_write_ties(segs[s].data + lo, segs[s].keep + lo, hi - lo, t, need, &taken);
      });
    }
  }
}
#endif

}  // namespace detail

// Writes keep flags (1 = kept, 0 = removed) for every problem; see the block comment above.
// num_threads <= 0 means omp_get_max_threads(). Never throws except std::bad_alloc.
template <typename T>
void magnitude_masks(const MagSegment<T>* segs, const MagProblem* probs, int64_t nprob,
                     int num_threads = 0) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "weights must be float or double");
  using Key = typename MagTraits<T>::Key;
  if (nprob <= 0) return;
  int64_t total = 0;
  for (int64_t p = 0; p < nprob; ++p) {
    for (int64_t s = 0; s < probs[p].count; ++s) {
      total += std::max<int64_t>(segs[probs[p].first + s].n, 0);
    }
  }
#ifdef _OPENMP
  int nth = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (total >= kMaskParallelThreshold && nth > 1) {
    if (nprob >= nth) {
#pragma omp parallel num_threads(nth)
      {
        std::vector<int64_t> hist;
        std::vector<Key> cand;
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < nprob; ++p) {
          detail::magnitude_problem_serial(segs + probs[p].first, probs[p].count, probs[p].k,
                                           hist, cand);
        }
      }
    } else {
      std::vector<int64_t> hist;
      std::vector<Key> cand;
      for (int64_t p = 0; p < nprob; ++p) {
        int64_t n = 0;
        for (int64_t s = 0; s < probs[p].count; ++s) {
          n += std::max<int64_t>(segs[probs[p].first + s].n, 0);
        }
        if (n >= kMaskParallelThreshold) {
          detail::magnitude_problem_parallel(segs + probs[p].first, probs[p].count, probs[p].k,
                                             nth);
        } else {
          detail::magnitude_problem_serial(segs + probs[p].first, probs[p].count, probs[p].k,
                                           hist, cand);
        }
      }
    }
    return;
  }
#else
  (void)num_threads;
#endif
  (void)total;
  std::vector<int64_t> hist;
  std::vector<Key> cand;
  for (int64_t p = 0; p < nprob; ++p) {
    detail::magnitude_problem_serial(segs + probs[p].first, probs[p].count, probs[p].k, hist,
                                     cand);
  }
}

}  // namespace kernels
}  // namespace miafw
