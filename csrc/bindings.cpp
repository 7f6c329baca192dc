// pybind11 face of the miafw kernels: numpy buffers in, raw pointers to csrc/kernels/*.h.
//
// Torch CPU tensors reach this module as zero-copy numpy views (mia_core/kernels.py is the
// only caller meant for users). Arrays are taken as py::array, never as a force-cast
// py::array_t: a cast would silently copy and the in-place write would be lost.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bind_util.h"
#include "kernels/mask.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
namespace mk = miafw::kernels;

namespace {

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string compiler_string() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = compiler_string();
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["openmp"] = openmp_enabled();
#ifdef _OPENMP
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp_version"] = py::none();
#endif
#ifdef MIAFW_WITH_CUDA
  d["cuda"] = true;  // csrc/cuda/*.cu compiled in (setup.py: MIAFW_CUDA=1 and nvcc found)
#else
  d["cuda"] = false;
#endif
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                  std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  d["mask_parallel_threshold"] = mk::kMaskParallelThreshold;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "miafw native kernels (CPU, numpy buffers). Use mia_core.kernels, not this module.";

  // Each op's csrc/bind_<op>.cpp registers its functions (MIAFW_BINDER); bind them in a
  // stable order.
  auto all = miafw::bind::binders();
  std::sort(all.begin(), all.end());
  for (const auto& entry : all) entry.second(m);

  m.def("openmp_enabled", &openmp_enabled, "Whether the extension was built with OpenMP.");
  m.def("max_threads", &max_threads,
        "omp_get_max_threads() in the calling thread (1 without OpenMP).");
  m.def("build_info", &build_info,
        "Dict describing the build: compiler, cplusplus, openmp, openmp_version, cuda, "
        "pybind11, mask_parallel_threshold.");
}
