// What the kernel headers share: the static split of work over an OpenMP team, and CPU
// feature detection for the kernels compiled for several instruction sets.
//
// Torch- and pybind11-free, like every header in csrc/kernels.

#pragma once

#include <algorithm>
#include <cstdint>

namespace miafw {
namespace kernels {

// First item of thread `tid`'s share of `total` items split as evenly as possible over `nth`
// threads. Monotone in tid; even_split(.., 0) == 0 and even_split(.., nth) == total.
inline int64_t even_split(int64_t total, int nth, int tid) {
  if (tid <= 0) return 0;
  if (tid >= nth) return total;
  const int64_t q = total / nth;
  const int64_t r = total % nth;
  return q * tid + std::min<int64_t>(tid, r);
}

// As even_split, with interior boundaries rounded down to a multiple of 16 elements so that
// neighbouring threads rarely write the same cache line.
inline int64_t split_point(int64_t total, int nth, int tid) {
  if (tid <= 0) return 0;
  if (tid >= nth) return total;
  return even_split(total, nth, tid) & ~int64_t(15);
}

// Whether this CPU (and OS) runs the AVX-512 subset the multi-ISA kernels target
// (F, DQ, VL, BW). Always false where the kernels are built for the baseline only.
inline bool cpu_has_avx512() {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

}  // namespace kernels
}  // namespace miafw
