// pybind11 face of the CUDA twins (csrc/cuda/*.cu). Compiled only in a CUDA build
// (setup.py: MIAFW_CUDA=1 and nvcc found); plain C++, includes no CUDA or torch header.
//
// Everything is passed as integers: device pointers (torch's Tensor.data_ptr()), sizes and
// the stream (torch.cuda.current_stream().cuda_stream). The functions only enqueue work on
// that stream; mia_core/kernels/_mask.py, _kl.py and _quant.py are the callers meant for
// users and check devices, dtypes, shapes, contiguity and aliasing before calling. CUDA errors
// raise RuntimeError with the CUDA error text.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bind_util.h"
#include "cuda/cuda_ops.h"

namespace py = pybind11;
namespace mc = miafw::cuda;

namespace {

void check(const std::string& status) {
  if (!status.empty()) throw std::runtime_error("miafw CUDA kernel failed: " + status);
}

int parse_dtype(const std::string& s) {
  if (s == "float32") return 0;
  if (s == "float64") return 1;
  throw py::value_error("unknown dtype '" + s + "'; allowed: 'float32', 'float64'");
}

int parse_direction(const std::string& s) {
  if (s == "forward") return 0;
  if (s == "reverse") return 1;
  if (s == "symmetric") return 2;
  throw py::value_error("unknown direction '" + s + "'; allowed: 'forward', 'reverse', 'symmetric'");
}

void cuda_apply_masks(const std::vector<uint64_t>& data, const std::vector<uint64_t>& masks,
                      const std::vector<int64_t>& sizes, const std::vector<int32_t>& kinds,
                      uintptr_t stream) {
  const size_t n = data.size();
  if (masks.size() != n || sizes.size() != n || kinds.size() != n) {
    throw py::value_error("cuda_apply_masks: data, masks, sizes and kinds must have one entry "
                          "per segment (got " + std::to_string(n) + ", " +
                          std::to_string(masks.size()) + ", " + std::to_string(sizes.size()) +
                          ", " + std::to_string(kinds.size()) + ")");
  }
  std::string status;
  {
    py::gil_scoped_release release;
    status = mc::apply_masks(data.data(), masks.data(), sizes.data(), kinds.data(),
                             static_cast<int64_t>(n), stream);
  }
  check(status);
}

void cuda_gaussian_kl(uintptr_t mu0, uintptr_t var0, uintptr_t mu1, uintptr_t var1, uintptr_t out,
                      int64_t n, int64_t d, const std::string& direction, const std::string& dtype,
                      uintptr_t err, uintptr_t stream) {
  const int dir = parse_direction(direction);
  const int dt = parse_dtype(dtype);
  std::string status;
  {
    py::gil_scoped_release release;
    status = mc::gaussian_kl_diag(mu0, var0, mu1, var1, out, n, d, dir, dt, err, stream);
  }
  check(status);
}

int parse_mask_kind(const std::string& s) {
  if (s == "none") return mc::kQuantMaskNone;
  if (s == "bool") return mc::kQuantMaskBool;
  if (s == "float") return mc::kQuantMaskFloat;
  throw py::value_error("unknown mask_kind '" + s + "'; allowed: 'none', 'bool', 'float'");
}

void cuda_fake_quantize(uintptr_t x, uintptr_t out, uintptr_t codes, int64_t outer,
                        int64_t channels, int64_t inner, uintptr_t scale, uintptr_t zero_point,
                        int64_t quant_min, int64_t quant_max, const std::string& dtype,
                        uintptr_t mask, const std::string& mask_kind, bool stochastic,
                        uint64_t seed, uintptr_t stream) {
  const int dt = parse_dtype(dtype);
  const int mk = parse_mask_kind(mask_kind);
  std::string status;
  {
    py::gil_scoped_release release;
    status = mc::fake_quantize(x, mask, mk, out, codes, outer, channels, inner, scale,
                               zero_point, quant_min, quant_max, stochastic, seed, dt, stream);
  }
  check(status);
}

}  // namespace

MIAFW_BINDER(cuda) {
  m.def("cuda_apply_masks", &cuda_apply_masks, py::arg("data"), py::arg("masks"), py::arg("sizes"),
        py::arg("kinds"), py::kw_only(), py::arg("stream") = 0,
        R"doc(In-place multi-tensor mask application on the GPU, ONE kernel launch.

data, masks: device pointers (int) of each segment; sizes: element counts; kinds: per segment
0 float32 * float32 mask, 1 float32 with bool mask, 2 float64 * float64 mask, 3 float64 with
bool mask. stream: cudaStream_t as int (0 = default stream). Only enqueues work; the caller
guarantees devices, contiguity and no overlap of written ranges. Raises RuntimeError with the
CUDA error text.)doc");
  m.def("cuda_gaussian_kl", &cuda_gaussian_kl, py::arg("mu0"), py::arg("var0"), py::arg("mu1"),
        py::arg("var1"), py::arg("out"), py::arg("n"), py::arg("d"), py::kw_only(),
        py::arg("direction") = "forward", py::arg("dtype") = "float32", py::arg("err") = 0,
        py::arg("stream") = 0,
        R"doc(Univariate / diagonal Gaussian KL on the GPU (device pointers as ints).

Inputs row-major [n, d] of `dtype`, out [n]. err: device pointer to one uint64 preset to all
ones (or 0 for no report); receives min over invalid variances of 2 * (row * d + j) + arg
(arg 0: var0, 1: var1). Only enqueues work on `stream`. Raises RuntimeError with the CUDA
error text.)doc");
  m.def("cuda_fake_quantize", &cuda_fake_quantize, py::arg("x"), py::arg("out"), py::arg("codes"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("scale"),
        py::arg("zero_point"), py::kw_only(), py::arg("quant_min"), py::arg("quant_max"),
        py::arg("dtype") = "float32", py::arg("mask") = 0, py::arg("mask_kind") = "none",
        py::arg("stochastic") = false, py::arg("seed") = 0, py::arg("stream") = 0,
        R"doc(Affine fake quantization with given parameters on the GPU, optionally masked.

x, out: device pointers of a contiguous (outer, channels, inner) tensor (out may be x);
codes: int32 device pointer or 0; scale, zero_point: device arrays of `channels` values of
`dtype`. mask: device pointer of a contiguous mask like x, with mask_kind 'bool' (m ? x : 0)
or 'float' (x * m, dtype of x); 'none' (default) ignores it. stochastic: seeded stochastic
rounding (u from (seed, flat index)), else nearest, ties to even. The CPU kernel's per-element
code (csrc/kernels/quant_elem.h): bit-identical to it. Only enqueues work on `stream`.
Raises RuntimeError with the CUDA error text.)doc");
}
