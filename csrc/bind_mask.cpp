// pybind11 binding of the multi-tensor mask kernel (csrc/kernels/mask.h).
//
// Arrays are taken as py::array, never as a force-cast py::array_t: a cast would silently
// copy and the in-place write would be lost.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
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

// The four (weight type, mask kind) groups of a validated list; each group runs as one
// parallel region. A model usually forms a single group.
struct Groups {
  std::vector<mk::MaskSegment<float, float>> g0;
  std::vector<mk::MaskSegment<float, uint8_t>> g1;
  std::vector<mk::MaskSegment<double, double>> g2;
  std::vector<mk::MaskSegment<double, uint8_t>> g3;

  explicit Groups(const std::vector<Pair>& pairs)
      : g0(collect<float, float>(pairs, WeightType::f32, MaskKind::same_float)),
        g1(collect<float, uint8_t>(pairs, WeightType::f32, MaskKind::boolean)),
        g2(collect<double, double>(pairs, WeightType::f64, MaskKind::same_float)),
        g3(collect<double, uint8_t>(pairs, WeightType::f64, MaskKind::boolean)) {}

  // Call without the GIL.
  void run(int num_threads) const {
    if (!g0.empty()) mk::apply_masks(g0, num_threads);
    if (!g1.empty()) mk::apply_masks(g1, num_threads);
    if (!g2.empty()) mk::apply_masks(g2, num_threads);
    if (!g3.empty()) mk::apply_masks(g3, num_threads);
  }
};

std::vector<Pair> validate_all(const py::sequence& tensors, const py::sequence& masks) {
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
  return pairs;
}

void apply_masks(const py::sequence& tensors, const py::sequence& masks, int num_threads) {
  std::vector<Pair> pairs = validate_all(tensors, masks);
  Groups groups(pairs);
  {
    py::gil_scoped_release release;
    groups.run(num_threads);
  }
  // `pairs` (and its references) is destroyed here, with the GIL held again.
}

// A validated (tensors, masks) list whose segment groups are built once; apply() is then
// one call with no per-tensor Python work except the optional owner check.
//
// `owners` (optional, one per tensor or None) are objects with a `data_ptr()` method (torch
// tensors) whose data pointer must still equal the array's at apply() time: if an owner's
// storage was reallocated (`p.data = ...`, `set_`, a growing `resize_`), the cached pointer
// is stale and apply() raises instead of writing into memory the owner no longer uses.
class MaskSet {
 public:
  MaskSet(const py::sequence& tensors, const py::sequence& masks, const py::object& owners)
      : pairs_(validate_all(tensors, masks)), groups_(pairs_) {
    if (!owners.is_none()) {
      const auto seq = py::reinterpret_borrow<py::sequence>(owners);
      if (py::len(seq) != pairs_.size()) {
        throw py::value_error("got " + std::to_string(py::len(seq)) + " owners for " +
                              std::to_string(pairs_.size()) + " tensors");
      }
      for (size_t i = 0; i < pairs_.size(); ++i) {
        py::object o = seq[i];
        if (o.is_none() || pairs_[i].n == 0) continue;
        const auto ptr = data_ptr_of(o);
        if (ptr != reinterpret_cast<std::uintptr_t>(pairs_[i].data)) {
          throw py::value_error("owners[" + std::to_string(i) +
                                "].data_ptr() differs from the data pointer of tensors[" +
                                std::to_string(i) + "]; pass the tensor the array views");
        }
        owners_.push_back(o);
        owner_index_.push_back(i);
      }
    }
    for (const Pair& p : pairs_) total_ += p.n;
  }

  // Index of the first tensor whose owner moved its storage, or -1.
  long moved() const {
    for (size_t j = 0; j < owners_.size(); ++j) {
      const size_t i = owner_index_[j];
      if (data_ptr_of(owners_[j]) != reinterpret_cast<std::uintptr_t>(pairs_[i].data)) {
        return static_cast<long>(i);
      }
    }
    return -1;
  }

  void apply(int num_threads) const {
    const long i = moved();
    if (i >= 0) {
      throw StaleError("tensors[" + std::to_string(i) +
                       "] no longer uses the storage this MaskSet was built for (its "
                       "data_ptr() changed: the tensor was reallocated); build a new one");
    }
    py::gil_scoped_release release;
    groups_.run(num_threads);
  }

  size_t size() const { return pairs_.size(); }
  int64_t total() const { return total_; }

  struct StaleError : std::runtime_error {
    using std::runtime_error::runtime_error;
  };

 private:
  static std::uintptr_t as_pointer(PyObject* r) {
    if (r == nullptr) throw py::error_already_set();
    const auto v = reinterpret_cast<std::uintptr_t>(PyLong_AsVoidPtr(r));
    Py_DECREF(r);
    if (PyErr_Occurred()) throw py::error_already_set();
    return v;
  }
  // o.data_ptr() as an integer (torch's data_ptr() itself is most of apply()'s per-tensor
  // cost, ~85 ns).
  static std::uintptr_t data_ptr_of(const py::object& o) {
    return as_pointer(PyObject_CallMethodNoArgs(o.ptr(), data_ptr_name()));
  }
  static PyObject* data_ptr_name() {
    // Interned once and leaked on purpose: a static py::object would be released after the
    // interpreter finalized.
    static PyObject* name = PyUnicode_InternFromString("data_ptr");
    return name;
  }

  std::vector<Pair> pairs_;
  Groups groups_;
  std::vector<py::object> owners_;
  std::vector<size_t> owner_index_;
  int64_t total_ = 0;
};

// ------------------------------------------------------------------ magnitude masks

template <typename T>
void run_magnitude(const std::vector<py::array>& ws, const std::vector<py::array>& keeps,
                   const std::vector<int64_t>& ks, int64_t models, bool global, int num_threads) {
  const size_t nt = ws.size();
  std::vector<mk::MagSegment<T>> segs;
  std::vector<mk::MagProblem> probs;
  std::vector<int64_t> inner(nt);
  for (size_t i = 0; i < nt; ++i) inner[i] = models ? static_cast<int64_t>(ws[i].size()) / models : 0;
  if (global) {
    segs.reserve(nt * static_cast<size_t>(models));
    for (int64_t m = 0; m < models; ++m) {
      probs.push_back({static_cast<int64_t>(segs.size()), static_cast<int64_t>(nt), ks[0]});
      for (size_t i = 0; i < nt; ++i) {
        const T* d = static_cast<const T*>(ws[i].data());
        uint8_t* k = static_cast<uint8_t*>(const_cast<void*>(keeps[i].data()));
        segs.push_back({inner[i] ? d + m * inner[i] : d, inner[i] ? k + m * inner[i] : k, inner[i]});
      }
    }
  } else {
    for (int64_t m = 0; m < models; ++m) {
      for (size_t i = 0; i < nt; ++i) {
        const T* d = static_cast<const T*>(ws[i].data());
        uint8_t* k = static_cast<uint8_t*>(const_cast<void*>(keeps[i].data()));
        probs.push_back({static_cast<int64_t>(segs.size()), 1, ks[i]});
        segs.push_back({inner[i] ? d + m * inner[i] : d, inner[i] ? k + m * inner[i] : k, inner[i]});
      }
    }
  }
  py::gil_scoped_release release;
  mk::magnitude_masks(segs.data(), probs.data(), static_cast<int64_t>(probs.size()), num_threads);
}

void magnitude_masks(const py::sequence& tensors, const py::sequence& keeps,
                     const std::vector<int64_t>& ks, int64_t models, bool global,
                     int num_threads) {
  const size_t nt = py::len(tensors);
  if (py::len(keeps) != nt) {
    throw py::value_error("got " + std::to_string(nt) + " tensors but " +
                          std::to_string(py::len(keeps)) + " keep arrays");
  }
  if (models < 0) throw py::value_error("models must be >= 0");
  if (ks.size() != (global ? size_t(1) : nt) && !(global && nt == 0)) {
    throw py::value_error("ks must hold one count (global) or one per tensor (tensor scope)");
  }
  std::vector<py::array> ws, out;
  bool f64 = false;
  for (size_t i = 0; i < nt; ++i) {
    const std::string ti = "tensors[" + std::to_string(i) + "]";
    const std::string ki = "keeps[" + std::to_string(i) + "]";
    if (!py::isinstance<py::array>(tensors[i])) {
      throw py::type_error(ti + " must be a numpy.ndarray, got " + type_name(tensors[i]));
    }
    if (!py::isinstance<py::array>(keeps[i])) {
      throw py::type_error(ki + " must be a numpy.ndarray, got " + type_name(keeps[i]));
    }
    auto w = py::reinterpret_borrow<py::array>(tensors[i]);
    auto k = py::reinterpret_borrow<py::array>(keeps[i]);
    const bool is64 = w.dtype().equal(py::dtype::of<double>());
    if (!is64 && !w.dtype().equal(py::dtype::of<float>())) {
      throw py::type_error(ti + " has dtype " + dtype_name(w) +
                           "; allowed: float32 or float64 (native byte order)");
    }
    if (i == 0) {
      f64 = is64;
    } else if (is64 != f64) {
      throw py::type_error(ti + " has dtype " + dtype_name(w) +
                           " but tensors[0] has another; all tensors must share one dtype");
    }
    if (!k.dtype().equal(py::dtype::of<bool>())) {
      throw py::type_error(ki + " has dtype " + dtype_name(k) + "; allowed: bool");
    }
    if (!same_shape(w, k)) {
      throw py::value_error(ki + " has shape " + shape_str(k) + " but " + ti + " has shape " +
                            shape_str(w));
    }
    if (!c_contiguous(w) || !c_contiguous(k)) {
      throw py::value_error(ti + " and " + ki + " must be C-contiguous");
    }
    if (!k.writeable()) throw py::value_error(ki + " is read-only");
    if (w.size() && !(is64 ? aligned_for<double>(w.data()) : aligned_for<float>(w.data()))) {
      throw py::value_error(ti + " is not aligned for its dtype");
    }
    // models == 1 also accepts unstacked arrays: the whole array is the one model.
    if (models != 1 && (w.ndim() < 1 || w.shape(0) != models)) {
      throw py::value_error(ti + " has shape " + shape_str(w) + "; expected a leading "
                            "dimension of " + std::to_string(models) + " models");
    }
    ws.push_back(w);
    out.push_back(k);
  }
  for (size_t i = 0; i < ks.size(); ++i) {
    if (ks[i] < 0) throw py::value_error("ks[" + std::to_string(i) + "] is negative");
  }
  if (nt == 0) return;
  if (f64) {
    run_magnitude<double>(ws, out, ks, models, global, num_threads);
  } else {
    run_magnitude<float>(ws, out, ks, models, global, num_threads);
  }
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
  py::register_exception<MaskSet::StaleError>(m, "StaleMaskSetError", PyExc_RuntimeError);
  py::class_<MaskSet>(m, "MaskSet", R"doc(A validated (tensors, masks) list, ready to apply repeatedly.

MaskSet(tensors, masks, owners=None): validates exactly as apply_masks (same errors), keeps
references to every array and builds the kernel's segment lists once. owners: optional
sequence (one per tensor, entries may be None) of objects with data_ptr() (torch tensors)
checked at every apply(): if one reallocated its storage, apply() raises StaleMaskSetError
(a RuntimeError) and writes nothing.)doc")
      .def(py::init<const py::sequence&, const py::sequence&, const py::object&>(),
           py::arg("tensors"), py::arg("masks"), py::arg("owners") = py::none())
      .def("apply", &MaskSet::apply, py::kw_only(), py::arg("num_threads") = 0,
           "Apply every mask in place (one parallel region per dtype/mask-kind group); "
           "releases the GIL. num_threads: 0 means omp_get_max_threads().")
      .def("moved", &MaskSet::moved,
           "Index of the first tensor whose owner reallocated its storage, or -1.")
      .def("__len__", &MaskSet::size)
      .def_property_readonly("total", &MaskSet::total, "Total elements over all tensors.");

  m.def("magnitude_masks", &magnitude_masks, py::arg("tensors"), py::arg("keeps"),
        py::arg("ks"), py::kw_only(), py::arg("models"), py::arg("global_scope"),
        py::arg("num_threads") = 0,
        R"doc(Write magnitude keep-masks (True = kept) into preallocated bool arrays.

tensors: C-contiguous float32 or float64 arrays (one dtype for all), each with a leading
    dimension of `models` (models=1 also accepts unstacked arrays: one model).
keeps: bool arrays of the same shapes, written.
ks: entries to remove per problem: one count for global scope (every model's tensors form one
    problem, in list order), one per tensor for tensor scope (each model's tensor alone).
Exactly k smallest |w| are removed per problem; NaN counts as the largest magnitude; ties
(equal magnitudes, -0.0 == +0.0, NaN == NaN) remove the lower position first.)doc");
}
