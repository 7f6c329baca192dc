// pybind11 binding of the multi-tensor mask kernel (csrc/kernels/mask.h).
//
// Arrays are taken as py::array, never as a force-cast py::array_t: a cast would silently
// copy and the in-place write would be lost.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bind_util.h"
#include "kernels/mask.h"

namespace py = pybind11;
namespace mk = miafw::kernels;
using namespace miafw::bind;

namespace {

enum class WeightType { f32, f64 };
enum class MaskKind { same_float, boolean };

// One validated pair, with the references that keep both buffers alive while the GIL is
// released (another Python thread could otherwise drop the last reference mid-kernel).
struct Pair {
  py::array tensor;
  py::array mask;
  WeightType wt;
  MaskKind mk;
  void* data;
  const void* mask_data;
  int64_t n;
};

// Byte range of a buffer, for the aliasing check.
struct Range {
  std::uintptr_t lo, hi;  // [lo, hi)
  size_t index;           // list index
};

// A written range must not overlap another written range, nor any mask other than its own
// tensor's exact buffer: the kernel runs segments concurrently, the torch loop in order.
void check_no_aliasing(const std::vector<Pair>& pairs) {
  std::vector<Range> writes;
  writes.reserve(pairs.size());
  for (size_t i = 0; i < pairs.size(); ++i) {
    const Pair& p = pairs[i];
    if (p.n == 0) continue;
    const auto lo = reinterpret_cast<std::uintptr_t>(p.data);
    writes.push_back({lo, lo + static_cast<std::uintptr_t>(p.n * p.tensor.itemsize()), i});
  }
  std::sort(writes.begin(), writes.end(),
            [](const Range& a, const Range& b) { return a.lo < b.lo; });
  for (size_t k = 1; k < writes.size(); ++k) {
    if (writes[k].lo < writes[k - 1].hi) {
      const size_t a = std::min(writes[k - 1].index, writes[k].index);
      const size_t b = std::max(writes[k - 1].index, writes[k].index);
      throw py::value_error("tensors[" + std::to_string(a) + "] and tensors[" +
                            std::to_string(b) +
                            "] share memory; every tensor must own its buffer (mask tied "
                            "weights once, or use the torch backend)");
    }
  }
  // Written ranges are now sorted and disjoint, so their ends are sorted too.
  for (size_t i = 0; i < pairs.size(); ++i) {
    const Pair& p = pairs[i];
    if (p.n == 0) continue;
    const auto lo = reinterpret_cast<std::uintptr_t>(p.mask_data);
    const auto hi = lo + static_cast<std::uintptr_t>(p.n * p.mask.itemsize());
    auto it = std::upper_bound(writes.begin(), writes.end(), lo,
                               [](std::uintptr_t v, const Range& r) { return v < r.hi; });
    for (; it != writes.end() && it->lo < hi; ++it) {
      const bool own_buffer = it->index == i && lo == it->lo && hi == it->hi &&
                              p.mask.itemsize() == p.tensor.itemsize();
      if (!own_buffer) {
        throw py::value_error("masks[" + std::to_string(i) + "] overlaps the memory of tensors[" +
                              std::to_string(it->index) +
                              "], which is written in place; pass a separate mask buffer");
      }
    }
  }
}

Pair validate_pair(size_t i, const py::handle& t_obj, const py::handle& m_obj) {
  const std::string ti = "tensors[" + std::to_string(i) + "]";
  const std::string mi = "masks[" + std::to_string(i) + "]";
  if (!py::isinstance<py::array>(t_obj)) {
    throw py::type_error(ti + " must be a numpy.ndarray, got " + type_name(t_obj));
  }
  if (!py::isinstance<py::array>(m_obj)) {
    throw py::type_error(mi + " must be a numpy.ndarray, got " + type_name(m_obj));
  }
  auto t = py::reinterpret_borrow<py::array>(t_obj);
  auto m = py::reinterpret_borrow<py::array>(m_obj);

  // Not cached in statics: a static py::object would be released after the interpreter.
  const py::dtype f32 = py::dtype::of<float>();
  const py::dtype f64 = py::dtype::of<double>();
  const py::dtype b8 = py::dtype::of<bool>();

  WeightType wt;
  if (t.dtype().equal(f32)) {
    wt = WeightType::f32;
  } else if (t.dtype().equal(f64)) {
    wt = WeightType::f64;
  } else {
    throw py::type_error(ti + " has dtype " + dtype_name(t) +
                         "; allowed: float32 or float64 (native byte order)");
  }
  MaskKind mk;
  if (m.dtype().equal(b8)) {
    mk = MaskKind::boolean;
  } else if (m.dtype().equal(t.dtype())) {
    mk = MaskKind::same_float;
  } else {
    throw py::type_error(mi + " has dtype " + dtype_name(m) + "; allowed: bool or " +
                         dtype_name(t) + " (the dtype of " + ti + ")");
  }
  if (!same_shape(t, m)) {
    throw py::value_error(mi + " has shape " + shape_str(m) + " but " + ti + " has shape " +
                          shape_str(t) + "; they must be equal (no broadcasting)");
  }
  if (!c_contiguous(t)) {
    throw py::value_error(ti + " is not C-contiguous; pass a contiguous array "
                          "(numpy.ascontiguousarray would copy and lose the in-place write)");
  }
  if (!c_contiguous(m)) {
    throw py::value_error(mi + " is not C-contiguous; pass numpy.ascontiguousarray(mask)");
  }
  if (!t.writeable()) {
    throw py::value_error(ti + " is read-only; the mask is applied in place");
  }
  const int64_t n = static_cast<int64_t>(t.size());
  void* data = n ? t.mutable_data() : nullptr;
  const void* mask_data = n ? m.data() : nullptr;
  if (n) {
    const bool t_ok = wt == WeightType::f32 ? aligned_for<float>(data) : aligned_for<double>(data);
    if (!t_ok) throw py::value_error(ti + " is not aligned for its dtype");
    if (mk == MaskKind::same_float) {
      const bool m_ok =
          wt == WeightType::f32 ? aligned_for<float>(mask_data) : aligned_for<double>(mask_data);
      if (!m_ok) throw py::value_error(mi + " is not aligned for its dtype");
    }
  }
  return Pair{t, m, wt, mk, data, mask_data, n};
}

template <typename T, typename M>
std::vector<mk::MaskSegment<T, M>> collect(const std::vector<Pair>& pairs, WeightType wt,
                                           MaskKind kind) {
  std::vector<mk::MaskSegment<T, M>> segs;
  for (const Pair& p : pairs) {
    if (p.wt == wt && p.mk == kind && p.n > 0) {
      segs.push_back({static_cast<T*>(p.data), static_cast<const M*>(p.mask_data), p.n});
    }
  }
  return segs;
}

void apply_masks(const py::sequence& tensors, const py::sequence& masks, int num_threads) {
  const size_t count = py::len(tensors);
  if (py::len(masks) != count) {
    throw py::value_error("got " + std::to_string(count) + " tensors but " +
                          std::to_string(py::len(masks)) +
                          " masks; pass exactly one mask per tensor");
  }
  std::vector<Pair> pairs;
  pairs.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    pairs.push_back(validate_pair(i, tensors[i], masks[i]));
  }
  check_no_aliasing(pairs);

  // Group by (weight type, mask kind); each group runs as one parallel region. A model
  // usually forms a single group.
  auto g0 = collect<float, float>(pairs, WeightType::f32, MaskKind::same_float);
  auto g1 = collect<float, uint8_t>(pairs, WeightType::f32, MaskKind::boolean);
  auto g2 = collect<double, double>(pairs, WeightType::f64, MaskKind::same_float);
  auto g3 = collect<double, uint8_t>(pairs, WeightType::f64, MaskKind::boolean);
  {
    py::gil_scoped_release release;
    if (!g0.empty()) mk::apply_masks(g0, num_threads);
    if (!g1.empty()) mk::apply_masks(g1, num_threads);
    if (!g2.empty()) mk::apply_masks(g2, num_threads);
    if (!g3.empty()) mk::apply_masks(g3, num_threads);
  }
  // `pairs` (and its references) is destroyed here, with the GIL held again.
}

}  // namespace

MIAFW_BINDER(mask) {
  m.def("apply_masks", &apply_masks, py::arg("tensors"), py::arg("masks"), py::kw_only(),
        py::arg("num_threads") = 0,
        R"doc(Apply masks to arrays in place, all pairs in one parallel region.

tensors: sequence of C-contiguous, writeable float32/float64 numpy arrays (written in place).
masks: sequence of C-contiguous arrays, masks[i] of dtype bool or tensors[i].dtype and
    shape tensors[i].shape. Float masks multiply (w * m); bool masks zero where False.
num_threads: OpenMP threads to use; 0 means omp_get_max_threads().

Below 65536 total elements runs serially. Raises TypeError (dtype, non-array) or ValueError
(length, shape, contiguity, read-only, overlapping buffers) naming the list index; nothing is
written when validation fails. Releases the GIL while the kernel runs.)doc");
}
