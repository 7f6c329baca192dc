// pybind11 binding of the batched Gaussian KL kernels (csrc/kernels/gaussian_kl.h).
//
// Arrays are taken as py::array, never as a force-cast py::array_t: a cast would silently
// copy, and the result would not land in the caller's `out`. What the kernels need to stay in
// bounds (dtypes, shapes, d <= 128, contiguity, alignment) is checked here, naming the
// argument, and nothing is written to `out` when it fails. `out` not overlapping the inputs
// and jitter >= 0 are mia_core.kernels' rules (one check, on every backend): breaking them
// here gives wrong numbers or a factorisation error, never an out-of-bounds access.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_util.h"
#include "kernels/gaussian_kl.h"

namespace py = pybind11;
namespace mk = miafw::kernels;
using namespace miafw::bind;

namespace {

mk::KlDirection parse_direction(const std::string& s) {
  if (s == "forward") return mk::KlDirection::forward;
  if (s == "reverse") return mk::KlDirection::reverse;
  if (s == "symmetric") return mk::KlDirection::symmetric;
  throw py::value_error("unknown direction '" + s +
                        "'; allowed: 'forward', 'reverse', 'symmetric'");
}

mk::KlIsa parse_isa(const std::string& s) {
  if (s == "auto" || s == "avx512") return mk::KlIsa::avx512;
  if (s == "avx2") return mk::KlIsa::avx2;
  if (s == "baseline") return mk::KlIsa::baseline;
  throw py::value_error("unknown isa '" + s + "'; allowed: 'auto', 'avx512', 'avx2', 'baseline'");
}

const char* isa_name(mk::KlIsa isa) {
  switch (isa) {
    case mk::KlIsa::avx512:
      return "avx512";
    case mk::KlIsa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " + type_name(obj));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

// Checks shared by both kernels: float32/float64, one dtype, C-contiguous, aligned; `out` of
// shape (n,) and writeable. Returns true for float64.
bool check_common(const py::array* in, const char* const* names, const py::array& out, int64_t n) {
  const py::dtype f32 = py::dtype::of<float>();
  const py::dtype f64 = py::dtype::of<double>();
  const py::array& first = in[0];
  bool is64;
  if (first.dtype().equal(f64)) {
    is64 = true;
  } else if (first.dtype().equal(f32)) {
    is64 = false;
  } else {
    throw py::type_error(std::string(names[0]) + " has dtype " + dtype_name(first) +
                         "; allowed: float32 or float64 (native byte order)");
  }
  for (int k = 0; k < 4; ++k) {
    if (!in[k].dtype().equal(first.dtype())) {
      throw py::type_error(std::string(names[k]) + " has dtype " + dtype_name(in[k]) + " but " +
                           names[0] + " has dtype " + dtype_name(first) +
                           "; all inputs must share one dtype");
    }
    if (!c_contiguous(in[k])) {
      throw py::value_error(std::string(names[k]) + " is not C-contiguous; pass a contiguous array");
    }
    if (in[k].size() && !(is64 ? aligned_for<double>(in[k].data()) : aligned_for<float>(in[k].data()))) {
      throw py::value_error(std::string(names[k]) + " is not aligned for its dtype");
    }
  }
  if (!out.dtype().equal(first.dtype())) {
    throw py::type_error("out has dtype " + dtype_name(out) + "; expected " + dtype_name(first) +
                         " (the inputs' dtype)");
  }
  if (out.ndim() != 1 || out.shape(0) != n) {
    throw py::value_error("out has shape " + shape_str(out) + "; expected (" + std::to_string(n) +
                          ",), one value per batch index");
  }
  if (!c_contiguous(out)) throw py::value_error("out is not C-contiguous");
  if (!out.writeable()) throw py::value_error("out is read-only");
  if (n && !(is64 ? aligned_for<double>(out.data()) : aligned_for<float>(out.data()))) {
    throw py::value_error("out is not aligned for its dtype");
  }
  return is64;
}

void gaussian_kl(const py::handle& mu0_o, const py::handle& var0_o, const py::handle& mu1_o,
                 const py::handle& var1_o, const py::handle& out_o, const std::string& direction,
                 int num_threads, const std::string& isa) {
  static const char* const names[4] = {"mu0", "var0", "mu1", "var1"};
  const py::array in[4] = {as_array(mu0_o, "mu0"), as_array(var0_o, "var0"),
                           as_array(mu1_o, "mu1"), as_array(var1_o, "var1")};
  py::array out = as_array(out_o, "out");
  const mk::KlDirection dir = parse_direction(direction);
  const mk::KlIsa use = parse_isa(isa);
  const py::array& ref = in[0];
  if (ref.ndim() != 1 && ref.ndim() != 2) {
    throw py::value_error("mu0 has shape " + shape_str(ref) +
                          "; expected [N] (univariate) or [N, D] (diagonal)");
  }
  for (int k = 1; k < 4; ++k) {
    if (!same_shape(in[k], ref)) {
      throw py::value_error(std::string(names[k]) + " has shape " + shape_str(in[k]) +
                            " but mu0 has shape " + shape_str(ref) +
                            "; all inputs must have the same shape (no broadcasting)");
    }
  }
  const int64_t n = ref.shape(0);
  const int64_t d = ref.ndim() == 2 ? ref.shape(1) : 1;
  const bool is64 = check_common(in, names, out, n);
  void* optr = n ? out.mutable_data() : nullptr;  // may throw: before releasing the GIL
  mk::KlError err;
  {
    py::gil_scoped_release release;
    if (is64) {
      err = mk::gaussian_kl_diag<double>(
          static_cast<const double*>(in[0].data()), static_cast<const double*>(in[1].data()),
          static_cast<const double*>(in[2].data()), static_cast<const double*>(in[3].data()),
          static_cast<double*>(optr), n, d, dir, num_threads, use);
    } else {
      err = mk::gaussian_kl_diag<float>(
          static_cast<const float*>(in[0].data()), static_cast<const float*>(in[1].data()),
          static_cast<const float*>(in[2].data()), static_cast<const float*>(in[3].data()),
          static_cast<float*>(optr), n, d, dir, num_threads, use);
    }
  }
  if (!err.ok()) {
    const std::string name = err.arg == 0 ? "var0" : "var1";
    const std::string where = ref.ndim() == 2 ? std::to_string(err.index) + ", " + std::to_string(err.element)
                                              : std::to_string(err.index);
    throw py::value_error(name + "[" + where + "] is not a positive finite variance (batch index " +
                          std::to_string(err.index) + ")");
  }
}

void gaussian_kl_full(const py::handle& mu0_o, const py::handle& cov0_o, const py::handle& mu1_o,
                      const py::handle& cov1_o, const py::handle& out_o, const std::string& direction,
                      bool cholesky, double jitter, int num_threads, const std::string& isa) {
  static const char* const names[4] = {"mu0", "cov0", "mu1", "cov1"};
  const py::array in[4] = {as_array(mu0_o, "mu0"), as_array(cov0_o, "cov0"),
                           as_array(mu1_o, "mu1"), as_array(cov1_o, "cov1")};
  py::array out = as_array(out_o, "out");
  const mk::KlDirection dir = parse_direction(direction);
  const mk::KlIsa use = parse_isa(isa);
  const py::array& mu0 = in[0];
  if (mu0.ndim() != 2) {
    throw py::value_error("mu0 has shape " + shape_str(mu0) + "; expected [N, d]");
  }
  const int64_t n = mu0.shape(0), d = mu0.shape(1);
  if (d < 1 || d > mk::kKlMaxDim) {
    throw py::value_error("dimension d = " + std::to_string(d) + " is out of range; the full "
                          "covariance kernel supports 1 <= d <= " + std::to_string(mk::kKlMaxDim));
  }
  if (!same_shape(in[2], mu0)) {
    throw py::value_error("mu1 has shape " + shape_str(in[2]) + " but mu0 has shape " +
                          shape_str(mu0) + "; they must be equal (no broadcasting)");
  }
  for (int k : {1, 3}) {
    const py::array& c = in[k];
    if (c.ndim() != 3 || c.shape(0) != n || c.shape(1) != d || c.shape(2) != d) {
      throw py::value_error(std::string(names[k]) + " has shape " + shape_str(c) + "; expected (" +
                            std::to_string(n) + ", " + std::to_string(d) + ", " +
                            std::to_string(d) + ") for mu0 of shape " + shape_str(mu0));
    }
  }
  const bool is64 = check_common(in, names, out, n);
  void* optr = n ? out.mutable_data() : nullptr;  // may throw: before releasing the GIL
  mk::KlError err;
  {
    py::gil_scoped_release release;
    if (is64) {
      err = mk::gaussian_kl_full<double>(
          static_cast<const double*>(in[0].data()), static_cast<const double*>(in[1].data()),
          static_cast<const double*>(in[2].data()), static_cast<const double*>(in[3].data()),
          static_cast<double*>(optr), n, d, dir, cholesky, jitter, num_threads, use);
    } else {
      err = mk::gaussian_kl_full<float>(
          static_cast<const float*>(in[0].data()), static_cast<const float*>(in[1].data()),
          static_cast<const float*>(in[2].data()), static_cast<const float*>(in[3].data()),
          static_cast<float*>(optr), n, d, dir, cholesky, jitter, num_threads, use);
    }
  }
  if (!err.ok()) {
    const std::string name = err.arg == 0 ? "cov0" : "cov1";
    const std::string idx = std::to_string(err.index);
    if (cholesky) {
      throw py::value_error(name + "[" + idx + "] has a diagonal entry that is not positive and "
                            "finite, or is subnormal (< 2.2e-308) (batch index " + idx + "); with "
                            "cholesky=True the covariance arguments are lower-triangular "
                            "Cholesky factors");
    }
    throw py::value_error(name + "[" + idx + "] is not positive definite: its Cholesky "
                          "factorisation failed (batch index " + idx + "); pass jitter > 0 to "
                          "factorise cov + jitter * I");
  }
}

}  // namespace

MIAFW_BINDER(kl) {
  m.def("gaussian_kl", &gaussian_kl, py::arg("mu0"), py::arg("var0"), py::arg("mu1"),
        py::arg("var1"), py::arg("out"), py::kw_only(), py::arg("direction") = "forward",
        py::arg("num_threads") = 0, py::arg("isa") = "auto",
        R"doc(KL divergences of N pairs of univariate ([N]) or diagonal ([N, D]) Gaussians.

mu0, var0, mu1, var1: C-contiguous float32 or float64 arrays of one shape and dtype (variances,
    not standard deviations). out: C-contiguous writeable array of shape (N,) and the same
    dtype, disjoint from the inputs (not checked here); written in place (KL summed over D).
direction: 'forward' KL(N0||N1), 'reverse' KL(N1||N0), 'symmetric' their sum.
num_threads: OpenMP threads; 0 means omp_get_max_threads(). isa: upper bound on the SIMD
    variant ('auto' = best available, 'avx512', 'avx2', 'baseline'), for testing.

Raises TypeError / ValueError naming the argument; ValueError naming the first batch index
whose variance is not positive and finite (out is then unspecified). Releases the GIL.)doc");
  m.def("gaussian_kl_full", &gaussian_kl_full, py::arg("mu0"), py::arg("cov0"), py::arg("mu1"),
        py::arg("cov1"), py::arg("out"), py::kw_only(), py::arg("direction") = "forward",
        py::arg("cholesky") = false, py::arg("jitter") = 0.0, py::arg("num_threads") = 0,
        py::arg("isa") = "auto",
        R"doc(KL divergences of N pairs of full-covariance Gaussians, d <= 128, computed in double.

mu0, mu1: [N, d]; cov0, cov1: [N, d, d] covariances (lower triangle read) or, with
    cholesky=True, lower Cholesky factors (upper triangle ignored). All C-contiguous,
    one dtype (float32 or float64). out: (N,), same dtype, written in place.
jitter: >= 0 and finite (not checked here), added to each covariance's diagonal before
    factorising.
Raises ValueError naming the first batch index whose covariance is not positive definite
(or whose factor has a diagonal entry that is not positive and finite). Releases the GIL.)doc");
  m.def("kl_best_isa", [] { return std::string(isa_name(mk::kl_best_isa())); },
        "The SIMD variant the KL kernels use on this CPU: 'avx512', 'avx2' or 'baseline'.");
  m.attr("kl_parallel_threshold") = mk::kKlParallelThreshold;
  m.attr("kl_max_dim") = mk::kKlMaxDim;
}
