// mia_core._cuda_emu: the CUDA twins (csrc/cuda/*.cu, bound by csrc/cuda/bind_cuda.cpp exactly
// as in a CUDA build's mia_core._C) run on the CPU through the host emulation of the CUDA
// runtime (host_cuda.h). For tests only: "device pointers" are host pointers (torch CPU
// tensors' data_ptr()), every launch runs at once on the calling thread, one thread of the
// grid after the other, and the stream is only recorded. Slow on purpose; never a backend.
//
// Besides the twins' functions it exposes the emulated device's knobs (configure) and what
// happened (stats), so that tests can shrink the grid, reverse the thread order, refuse the
// stream-ordered allocator, inject launch and allocation failures, and count launches and
// live allocations.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "bind_util.h"
#include "cuda_emu/host_cuda.h"

namespace py = pybind11;
namespace emu = miafw::cuda_emu;

namespace {

cudaError_t parse_error(const std::string& name) {
  if (name.empty() || name == "cudaSuccess") return cudaSuccess;
  for (cudaError_t e : {cudaErrorInvalidValue, cudaErrorMemoryAllocation,
                        cudaErrorInvalidConfiguration, cudaErrorLaunchFailure,
                        cudaErrorNotSupported}) {
    if (name == cudaGetErrorName(e)) return e;
  }
  throw py::value_error("unknown CUDA error '" + name + "'; allowed: '', 'cudaErrorInvalidValue', "
                        "'cudaErrorMemoryAllocation', 'cudaErrorInvalidConfiguration', "
                        "'cudaErrorLaunchFailure', 'cudaErrorNotSupported'");
}

void configure(int multiprocessors, bool malloc_async, const std::string& order,
               const std::string& fail_next_launch, const std::string& fail_next_malloc) {
  if (multiprocessors < 1) {
    throw py::value_error("multiprocessors=" + std::to_string(multiprocessors) + "; must be >= 1");
  }
  emu::Order o;
  if (order == "forward") {
    o = emu::Order::forward;
  } else if (order == "reverse") {
    o = emu::Order::reverse;
  } else {
    throw py::value_error("unknown order '" + order + "'; allowed: 'forward', 'reverse'");
  }
  const cudaError_t fl = parse_error(fail_next_launch);
  const cudaError_t fm = parse_error(fail_next_malloc);
  emu::State& s = emu::state();
  s.multiprocessors = multiprocessors;
  s.malloc_async = malloc_async;
  s.order = o;
  s.fail_next_launch = fl;
  s.fail_next_malloc = fm;
}

py::dict stats() {
  const emu::State& s = emu::state();
  py::dict d;
  d["multiprocessors"] = s.multiprocessors;
  d["malloc_async"] = s.malloc_async;
  d["order"] = s.order == emu::Order::forward ? "forward" : "reverse";
  d["launches"] = s.launches;
  d["last_kernel"] = s.last_kernel;
  d["last_blocks"] = s.last_blocks;
  d["last_threads"] = s.last_threads;
  d["last_stream"] = s.last_stream;
  d["live_allocations"] = s.live_allocations;
  d["pooled_allocations"] = s.pooled_allocations;
  d["synchronizations"] = s.synchronizations;
  d["threads_run"] = s.threads_run;
  return d;
}

void reset() {
  const int64_t live = emu::state().live_allocations;  // memory still held stays counted
  emu::state() = emu::State();
  emu::state().live_allocations = live;
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "miafw's CUDA twins run on the CPU through a host emulation of the CUDA runtime "
            "(tests only; see csrc/cuda_emu/host_cuda.h).";
  auto all = miafw::bind::binders();
  std::sort(all.begin(), all.end());
  for (const auto& entry : all) entry.second(m);

  m.def("configure", &configure, py::kw_only(), py::arg("multiprocessors") = 2,
        py::arg("malloc_async") = true, py::arg("order") = "forward",
        py::arg("fail_next_launch") = "", py::arg("fail_next_malloc") = "",
        R"doc(Set the emulated device: SM count (grids are capped at 8 blocks per SM),
whether cudaMallocAsync is supported, the thread order of a launch ('forward' or 'reverse'),
and an error (CUDA error name) to inject into the next launch / allocation. Every call
resets all five to the given values (defaults: 2, True, 'forward', none, none).)doc");
  m.def("stats", &stats, "What the emulated device did since the last reset() (dict).");
  m.def("reset", &reset, "Zero the counters and restore the default configuration "
        "(live_allocations is kept: it counts memory actually held).");
}
