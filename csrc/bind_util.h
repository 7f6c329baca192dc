// Shared helpers of the pybind11 bindings: array checks with readable messages, and the
// binder registry through which each op's binding file adds its functions to mia_core._C
// (so each op lives in its own csrc/bind_<op>.cpp and bindings.cpp never changes per op).

#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace miafw {
namespace bind {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

// All registered binders, in registration order (bindings.cpp sorts them by name, since the
// order of static initialisation across translation units is unspecified).
inline std::vector<std::pair<std::string, Binder>>& binders() {
  static std::vector<std::pair<std::string, Binder>> all;
  return all;
}

struct RegisterBinder {
  RegisterBinder(const char* name, Binder fn) { binders().emplace_back(name, fn); }
};

inline std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__qualname__")).cast<std::string>();
}

inline std::string dtype_name(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

inline bool same_shape(const py::array& a, const py::array& b) {
  if (a.ndim() != b.ndim()) return false;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) != b.shape(d)) return false;
  }
  return true;
}

inline bool c_contiguous(const py::array& a) {
  return (a.flags() & py::array::c_style) == py::array::c_style;
}

template <typename T>
inline bool aligned_for(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % alignof(T) == 0;
}

}  // namespace bind
}  // namespace miafw

// Defines `static void NAME##_binder(py::module_& m)` and registers it with the module.
// Usage in csrc/bind_<op>.cpp:   MIAFW_BINDER(kl) { m.def("gaussian_kl", ...); }
#define MIAFW_BINDER(NAME)                                                          \
  static void NAME##_binder(pybind11::module_& m);                                 \
  static ::miafw::bind::RegisterBinder NAME##_binder_registration(#NAME, &NAME##_binder); \
  static void NAME##_binder(pybind11::module_& m)
