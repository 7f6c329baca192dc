// Host entry points of the CUDA twins (csrc/cuda/*.cu), in plain C++: no CUDA, torch or
// pybind11 header is needed to call them, so csrc/cuda/bind_cuda.cpp is compiled by the
// ordinary C++ compiler and only the .cu files by nvcc.
//
// Conventions shared by every function here:
//   * pointers are DEVICE pointers passed as uintptr_t (torch's Tensor.data_ptr()), all on
//     the current device; `stream` is a cudaStream_t passed as uintptr_t (0: legacy default
//     stream; torch's torch.cuda.current_stream().cuda_stream);
//   * work is only enqueued on `stream` (nothing synchronises, except where noted);
//   * nothing throws: the return value is "" on success, else an error message (the CUDA
//     error string of cudaGetLastError / the failing runtime call, or an argument error);
//   * element type codes: dtype 0 = float32, 1 = float64.
//
// The arithmetic of each op is the CPU header's (csrc/kernels/*.h); see each .cu file.

#pragma once

#include <cstdint>
#include <string>

namespace miafw {
namespace cuda {

// Segment kinds of cuda_apply_masks: weight dtype x mask kind.
enum MaskKind : int32_t {
  kMaskF32Float = 0,  // float32 weights, float32 mask: w = w * m
  kMaskF32Bool = 1,   // float32 weights, bool/uint8 mask: w = m ? w : +0.0
  kMaskF64Float = 2,  // float64 weights, float64 mask
  kMaskF64Bool = 3,   // float64 weights, bool/uint8 mask
};

// Multi-tensor in-place mask application in ONE kernel launch over the concatenation of
// all segments (grid-stride loop; the segment of an element is found by binary search over
// prefix offsets). data[i], mask[i]: device pointers of segment i; sizes[i] >= 0 elements;
// kinds[i]: MaskKind. The host arrays (count entries each) are copied into a stream-ordered
// device buffer (cudaMallocAsync, freed with cudaFreeAsync on the same stream).
// Written ranges must not overlap other segments' data or masks (the caller checks).
std::string apply_masks(const uint64_t* data, const uint64_t* mask, const int64_t* sizes,
                        const int32_t* kinds, int64_t count, uintptr_t stream);

// KL divergence of n pairs of diagonal Gaussians with d components (row-major [n, d]; d = 1:
// univariate); direction 0 forward KL(0||1), 1 reverse, 2 symmetric; out[n] (d components
// summed in double, stored in the element type). err: device pointer to ONE uint64 that
// the caller initialised to UINT64_MAX (all bits set); it receives atomicMin over
// 2 * (row * d + component) + arg of every invalid variance (not > 0 and finite; arg 0 =
// var0, 1 = var1), i.e. the first bad element in row-major order, var0 before var1.
// err may be 0 (no report). After an error the contents of out are unspecified.
std::string gaussian_kl_diag(uintptr_t mu0, uintptr_t var0, uintptr_t mu1, uintptr_t var1,
                             uintptr_t out, int64_t n, int64_t d, int direction, int dtype,
                             uintptr_t err, uintptr_t stream);

// Mask kinds of fake_quantize.
enum QuantMaskKind : int32_t {
  kQuantMaskNone = 0,   // no mask: the value quantized is x
  kQuantMaskBool = 1,   // bool/uint8 mask like x: m ? x : +0.0
  kQuantMaskFloat = 2,  // mask of x's dtype like x: x * m
};

// Affine fake quantization with GIVEN parameters over the (outer, channels, inner) layout of a
// contiguous tensor (per tensor: (1, 1, n)), nearest (ties to even) or stochastic rounding,
// of x or of the masked x (the fused mask + fake-quantize pass). Per element the arithmetic
// of csrc/kernels/quant_elem.h (the CPU kernel's own functions, compiled for the device):
// bit-identical to the CPU kernel, stochastic results included (u = uniform(seed, index)).
// scale, zero_point: device arrays of `channels` values of the element type (scales finite,
// > 0 with a finite reciprocal; zero points exact integers in [quant_min, quant_max]: the
// caller checks). mask: device pointer of a mask like x (mask_kind), or 0 with kQuantMaskNone.
// NaN propagates to out (code quant_min); +-inf clamp to the range ends. out may be x (in
// place). codes: device int32 array of outer*channels*inner entries, or 0.
std::string fake_quantize(uintptr_t x, uintptr_t mask, int mask_kind, uintptr_t out,
                          uintptr_t codes, int64_t outer, int64_t channels, int64_t inner,
                          uintptr_t scale, uintptr_t zero_point, int64_t quant_min,
                          int64_t quant_max, bool stochastic, uint64_t seed, int dtype,
                          uintptr_t stream);

}  // namespace cuda
}  // namespace miafw
