// pybind11 binding of the fake-quantize kernels (csrc/kernels/fake_quant.h).
//
// Arrays are taken as py::array, never as a force-cast py::array_t: a cast would silently
// copy, and writes into `out`, `codes` or derived `scale` / `zero_point` would be lost.
// What the kernels need to stay in bounds (dtypes, shapes, contiguity, alignment, the code
// range, the axis) is validated here, naming the argument, before the GIL is released. Rules
// about VALUES (a given scale > 0, an integer zero point in range, out not partially
// overlapping x or the mask) are mia_core.kernels' (one check, on every backend): breaking
// them here gives wrong numbers, never an out-of-bounds access.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bind_util.h"
#include "kernels/fake_quant.h"

namespace py = pybind11;
namespace mk = miafw::kernels;
using namespace miafw::bind;

namespace {

constexpr int64_t kQuantBound = 65536;  // |quant_min|, |quant_max| < 2^16 (1..16 bits)

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " + type_name(obj));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

bool is_f32(const py::array& a) { return a.dtype().equal(py::dtype::of<float>()); }
bool is_f64(const py::array& a) { return a.dtype().equal(py::dtype::of<double>()); }

// x: float32/float64, C-contiguous, aligned.
py::array check_x(const py::handle& obj) {
  py::array x = as_array(obj, "x");
  if (!is_f32(x) && !is_f64(x)) {
    throw py::type_error("x has dtype " + dtype_name(x) +
                         "; allowed: float32 or float64 (native byte order)");
  }
  if (!c_contiguous(x)) throw py::value_error("x is not C-contiguous; pass a contiguous array");
  if (x.size() && !(is_f32(x) ? aligned_for<float>(x.data()) : aligned_for<double>(x.data()))) {
    throw py::value_error("x is not aligned for its dtype");
  }
  return x;
}

std::uintptr_t lo_of(const py::array& a) { return reinterpret_cast<std::uintptr_t>(a.data()); }
std::uintptr_t hi_of(const py::array& a) {
  return lo_of(a) + static_cast<std::uintptr_t>(a.size() * a.itemsize());
}
bool overlaps(const py::array& a, const py::array& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  return lo_of(a) < hi_of(b) && lo_of(b) < hi_of(a);
}

// An output array: dtype/shape like `like` (dtype given), contiguous, writeable.
py::array check_out(const py::handle& obj, const char* name, const py::array& x,
                    const py::dtype& dt) {
  py::array o = as_array(obj, name);
  if (!o.dtype().equal(dt)) {
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(o) + "; expected " +
                         py::str(dt).cast<std::string>());
  }
  if (!same_shape(o, x)) {
    throw py::value_error(std::string(name) + " has shape " + shape_str(o) + " but x has shape " +
                          shape_str(x) + "; they must be equal");
  }
  if (!c_contiguous(o)) throw py::value_error(std::string(name) + " is not C-contiguous");
  if (!o.writeable()) throw py::value_error(std::string(name) + " is read-only");
  if (o.size() && reinterpret_cast<std::uintptr_t>(o.data()) % o.itemsize() != 0) {
    throw py::value_error(std::string(name) + " is not aligned for its dtype");
  }
  return o;
}

mk::QuantLayout layout_of(const py::array& x, const py::object& axis_obj) {
  mk::QuantLayout L{1, 1, static_cast<int64_t>(x.size())};
  if (axis_obj.is_none()) return L;
  const int64_t nd = x.ndim();
  int64_t axis = axis_obj.cast<int64_t>();
  if (axis < -nd || axis >= nd) {
    throw py::value_error("axis " + std::to_string(axis) + " is out of range for x with " +
                          std::to_string(nd) + " dimensions");
  }
  if (axis < 0) axis += nd;
  L.outer = 1;
  L.inner = 1;
  for (int64_t d = 0; d < axis; ++d) L.outer *= x.shape(d);
  L.channels = x.shape(axis);
  for (int64_t d = axis + 1; d < nd; ++d) L.inner *= x.shape(d);
  return L;
}

// A per-channel parameter array of dtype `dt` and shape (C,), contiguous.
py::array check_param(const py::handle& obj, const char* name, const py::dtype& dt, int64_t C,
                      bool writeable) {
  py::array p = as_array(obj, name);
  if (!p.dtype().equal(dt)) {
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(p) + "; expected " +
                         py::str(dt).cast<std::string>() + " (the dtype of x)");
  }
  if (p.ndim() != 1 || p.shape(0) != C) {
    throw py::value_error(std::string(name) + " has shape " + shape_str(p) + "; expected (" +
                          std::to_string(C) + ",) (one value per channel)");
  }
  if (!c_contiguous(p)) throw py::value_error(std::string(name) + " is not C-contiguous");
  if (writeable && !p.writeable()) {
    throw py::value_error(std::string(name) + " is read-only but is written (derived parameters)");
  }
  return p;
}

void check_range(int64_t quant_min, int64_t quant_max) {
  if (!(quant_min < quant_max) || quant_min <= -kQuantBound || quant_max >= kQuantBound) {
    throw py::value_error("quant_min=" + std::to_string(quant_min) + ", quant_max=" +
                          std::to_string(quant_max) +
                          ": need quant_min < quant_max, both within (-65536, 65536)");
  }
}

const char* quant_isa_name(mk::QuantIsa isa) {
  switch (isa) {
    case mk::QuantIsa::avx512:
      return "avx512";
    case mk::QuantIsa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// "auto" or a named instruction set this CPU supports (ValueError otherwise).
mk::QuantIsa parse_quant_isa(const std::string& s) {
  mk::QuantIsa isa;
  if (s == "auto") return mk::QuantIsa::automatic;
  if (s == "baseline") {
    isa = mk::QuantIsa::baseline;
  } else if (s == "avx2") {
    isa = mk::QuantIsa::avx2;
  } else if (s == "avx512") {
    isa = mk::QuantIsa::avx512;
  } else {
    throw py::value_error("unknown isa '" + s + "'; allowed: 'auto', 'avx512', 'avx2', 'baseline'");
  }
  if (!mk::quant_isa_supported(isa)) {
    throw py::value_error("isa '" + s + "' is not supported by this CPU / build (best: '" +
                          quant_isa_name(mk::quant_best_isa()) + "')");
  }
  return isa;
}

mk::QuantStore parse_quant_store(const std::string& s) {
  if (s == "auto") return mk::QuantStore::automatic;
  if (s == "regular") return mk::QuantStore::regular;
  if (s == "streaming") return mk::QuantStore::streaming;
  throw py::value_error("unknown store '" + s + "'; allowed: 'auto', 'regular', 'streaming'");
}

template <typename T>
py::object run_fq(const py::array& x, const py::object& mask_obj, py::array out,
                  const py::object& codes_obj, mk::QuantLayout L, py::array scale,
                  py::array zero_point, const mk::QuantSpec& spec, int num_threads,
                  mk::QuantIsa isa, mk::QuantStore store) {
  const int64_t C = L.channels;
  T* s = static_cast<T*>(scale.mutable_data());
  T* z = static_cast<T*>(zero_point.mutable_data());
  std::vector<T> inv(static_cast<size_t>(C));
  if (!spec.derive) {
    for (int64_t c = 0; c < C; ++c) inv[c] = T(1) / s[c];  // values checked by mia_core.kernels
  }
  mk::QuantParams<T> params{s, inv.data(), z};
  const T* xp = static_cast<const T*>(x.data());
  T* op = x.size() ? static_cast<T*>(out.mutable_data()) : nullptr;
  int32_t* cp = nullptr;
  py::array codes;
  if (!codes_obj.is_none()) {
    codes = check_out(codes_obj, "codes", x, py::dtype::of<int32_t>());
    if (overlaps(codes, x) || overlaps(codes, out)) {
      throw py::value_error("codes overlaps the memory of x or out; pass a separate buffer");
    }
    cp = static_cast<int32_t*>(codes.mutable_data());
  }
  bool ok = true;
  if (mask_obj.is_none()) {
    py::gil_scoped_release release;
    ok = mk::fake_quantize<T, mk::qdetail::NoMask>(xp, nullptr, op, cp, L, params, spec,
                                                   num_threads, isa, store);
  } else {
    py::array m = as_array(mask_obj, "mask");
    const bool is_bool = m.dtype().equal(py::dtype::of<bool>());
    if (!is_bool && !m.dtype().equal(x.dtype())) {
      throw py::type_error("mask has dtype " + dtype_name(m) + "; allowed: bool or " +
                           dtype_name(x) + " (the dtype of x)");
    }
    if (!same_shape(m, x)) {
      throw py::value_error("mask has shape " + shape_str(m) + " but x has shape " +
                            shape_str(x) + "; they must be equal (no broadcasting)");
    }
    if (!c_contiguous(m)) throw py::value_error("mask is not C-contiguous");
    if (cp && overlaps(m, codes)) {
      throw py::value_error("mask overlaps the memory of codes; pass a separate buffer");
    }
    if (!is_bool && m.size() && !aligned_for<T>(m.data())) {
      throw py::value_error("mask is not aligned for its dtype");
    }
    if (is_bool) {
      const uint8_t* mp = static_cast<const uint8_t*>(m.data());
      py::gil_scoped_release release;
      ok = mk::fake_quantize<T, uint8_t>(xp, mp, op, cp, L, params, spec, num_threads, isa,
                                         store);
    } else {
      const T* mp = static_cast<const T*>(m.data());
      py::gil_scoped_release release;
      ok = mk::fake_quantize<T, T>(xp, mp, op, cp, L, params, spec, num_threads, isa, store);
    }
  }
  return py::bool_(ok);
}

py::object fake_quantize(const py::handle& x_obj, const py::handle& out_obj,
                         const py::object& axis, int64_t quant_min, int64_t quant_max,
                         int scheme, const py::handle& scale_obj, const py::handle& zp_obj,
                         bool derive, bool stochastic, uint64_t seed, const py::object& codes,
                         const py::object& mask, int num_threads, const std::string& isa_name,
                         const std::string& store_name) {
  const mk::QuantIsa isa = parse_quant_isa(isa_name);
  const mk::QuantStore store = parse_quant_store(store_name);
  py::array x = check_x(x_obj);
  py::array out = check_out(out_obj, "out", x, x.dtype());
  check_range(quant_min, quant_max);
  if (scheme != 0 && scheme != 1) {
    throw py::value_error("scheme=" + std::to_string(scheme) + "; allowed: 0 (affine), 1 (symmetric)");
  }
  const mk::QuantLayout L = layout_of(x, axis);
  py::array scale = check_param(scale_obj, "scale", x.dtype(), L.channels, derive);
  py::array zp = check_param(zp_obj, "zero_point", x.dtype(), L.channels, derive);
  if (overlaps(scale, out) || overlaps(zp, out) || overlaps(scale, zp)) {
    throw py::value_error("scale / zero_point overlap out or each other");
  }
  mk::QuantSpec spec{quant_min, quant_max,
                     scheme == 1 ? mk::QuantScheme::symmetric : mk::QuantScheme::affine, derive,
                     stochastic, seed};
  if (is_f32(x)) {
    return run_fq<float>(x, mask, out, codes, L, scale, zp, spec, num_threads, isa, store);
  }
  return run_fq<double>(x, mask, out, codes, L, scale, zp, spec, num_threads, isa, store);
}

void fake_quantize_sign(const py::handle& x_obj, const py::handle& out_obj, const py::object& axis,
                        const py::handle& scale_obj, bool derive, int num_threads) {
  py::array x = check_x(x_obj);
  py::array out = check_out(out_obj, "out", x, x.dtype());
  const mk::QuantLayout L = layout_of(x, axis);
  py::array scale = check_param(scale_obj, "scale", x.dtype(), L.channels, derive);
  if (overlaps(scale, out)) throw py::value_error("scale overlaps out");
  if (is_f32(x)) {
    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    float* sp = static_cast<float*>(scale.mutable_data());
    py::gil_scoped_release release;
    mk::fake_quantize_sign<float>(xp, op, L, sp, derive, num_threads);
  } else {
    const double* xp = static_cast<const double*>(x.data());
    double* op = static_cast<double*>(out.mutable_data());
    double* sp = static_cast<double*>(scale.mutable_data());
    py::gil_scoped_release release;
    mk::fake_quantize_sign<double>(xp, op, L, sp, derive, num_threads);
  }
}

template <typename T>
bool has_nan(const T* p, int64_t n) {
  uint8_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint8_t>(p[i] != p[i]);
  return bad != 0;
}

py::object fake_quantize_ternary(const py::handle& x_obj, const py::handle& out_obj,
                                 const py::object& axis, const py::handle& zero_count_obj,
                                 const py::handle& scale_obj, int num_threads) {
  py::array x = check_x(x_obj);
  py::array out = check_out(out_obj, "out", x, x.dtype());
  if (overlaps(out, x)) {
    throw py::value_error("out overlaps x; the ternary kernel needs a separate output buffer");
  }
  const mk::QuantLayout L = layout_of(x, axis);
  py::array zc = check_param(zero_count_obj, "zero_count", py::dtype::of<int64_t>(), L.channels,
                             false);
  py::array scale = check_param(scale_obj, "scale", x.dtype(), L.channels, true);
  if (overlaps(scale, out)) throw py::value_error("scale overlaps out");
  const int64_t* zp = static_cast<const int64_t*>(zc.data());
  const int64_t n = static_cast<int64_t>(x.size());
  if (is_f32(x)) {
    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    float* sp = static_cast<float*>(scale.mutable_data());
    py::gil_scoped_release release;
    if (has_nan(xp, n)) return py::bool_(false);
    mk::fake_quantize_ternary<float>(xp, op, L, zp, sp, num_threads);
  } else {
    const double* xp = static_cast<const double*>(x.data());
    double* op = static_cast<double*>(out.mutable_data());
    double* sp = static_cast<double*>(scale.mutable_data());
    py::gil_scoped_release release;
    if (has_nan(xp, n)) return py::bool_(false);
    mk::fake_quantize_ternary<double>(xp, op, L, zp, sp, num_threads);
  }
  return py::bool_(true);
}

}  // namespace

MIAFW_BINDER(quant) {
  m.attr("quant_parallel_threshold") = mk::kQuantParallelThreshold;
  m.attr("quant_scale_floor") = mk::kQuantScaleFloor;
  m.def("quant_best_isa", [] { return std::string(quant_isa_name(mk::quant_best_isa())); },
        "Instruction set fake_quantize(isa='auto') runs: 'avx512', 'avx2' or 'baseline'.");
  m.def("fake_quantize", &fake_quantize, py::arg("x"), py::arg("out"), py::kw_only(),
        py::arg("axis") = py::none(), py::arg("quant_min"), py::arg("quant_max"),
        py::arg("scheme") = 0, py::arg("scale"), py::arg("zero_point"), py::arg("derive"),
        py::arg("stochastic") = false, py::arg("seed") = 0, py::arg("codes") = py::none(),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("isa") = "auto",
        py::arg("store") = "auto",
        R"doc(Fake-quantize x into out (optionally masked), one parallel region.

x: C-contiguous float32/float64 array. out: same dtype and shape, C-contiguous, writeable;
    x itself or disjoint from x and mask (not checked here). axis: None (per tensor) or the
    channel axis (negative allowed).
quant_min < quant_max: integer range, both within (-65536, 65536). scheme: 0 affine, 1 symmetric
    (only used when derive). scale, zero_point: arrays of x's dtype and shape (C,) (C = 1 per
    tensor); read when derive is False (scale finite and > 0, zero_point an integer in range:
    mia_core.kernels checks these values, this function does not), written when derive is True
    (min-max of the (masked) data, 0 included, floor 2^-23).
stochastic, seed: stochastic rounding from a counter-based hash of (seed, flat index).
codes: optional int32 array like x that receives the integer codes.
mask: optional bool or x-dtype array like x: the quantized value is mask ? x : 0 (bool) or x * mask.
num_threads: OpenMP threads; 0 means omp_get_max_threads().
isa: instruction set of the quantization loop: 'auto' (best supported), 'avx512', 'avx2' or
    'baseline' (ValueError when unsupported here); results are bit-identical for every isa.
store: how out is written: 'auto' (non-temporal stores when out has >= 16 MiB), 'regular' or
    'streaming' (non-temporal for every long span); results are identical.

Returns False (nothing written) when derive is True and the data hold NaN or inf; else True.
Raises TypeError / ValueError naming the argument; releases the GIL while the kernel runs.)doc");
  m.def("fake_quantize_sign", &fake_quantize_sign, py::arg("x"), py::arg("out"), py::kw_only(),
        py::arg("axis") = py::none(), py::arg("scale"), py::arg("derive"),
        py::arg("num_threads") = 0,
        R"doc(out = x < 0 ? -s : +s per channel; s = mean |x| written into scale when derive.)doc");
  m.def("fake_quantize_ternary", &fake_quantize_ternary, py::arg("x"), py::arg("out"),
        py::kw_only(), py::arg("axis") = py::none(), py::arg("zero_count"), py::arg("scale"),
        py::arg("num_threads") = 0,
        R"doc(Ternary {-s, 0, +s}: per channel the zero_count[c] smallest |x| (ties: lower index)
become 0, the rest sign(x) * s with s = mean |x| of the kept entries (written into scale).
out must not overlap x. Returns False (nothing written) when x holds NaN.)doc");
}
