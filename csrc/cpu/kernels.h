// The CPU kernels' table: the element loops of bn_act_train (+ backward) and scale_shift_act,
// compiled once per instruction set (kernels_generic.cpp: the compiler's baseline;
// kernels_avx2.cpp: AVX2 + FMA on x86-64) and picked once at run time (bn_act.cpp), as ATen does
// for its own kernels. Every header the kernels need is included here, before a TU switches
// its target, so only the kernels themselves are compiled for the wider instruction set.
#pragma once

#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace resnet_fused {
namespace cpu {

// Inputs are checked (ops.h) and outputs allocated by the caller; Shape gives the layout.
struct Kernels {
  const char* isa;
  void (*bn_forward)(const Shape& s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, double momentum, double eps,
                     bool relu, at::Tensor& out, at::Tensor& save_mean, at::Tensor& save_invstd,
                     at::Tensor& new_rm, at::Tensor& new_rv, at::Tensor& scale,
                     at::Tensor& shift);
  void (*bn_backward)(const Shape& s, const at::Tensor& grad_out, const at::Tensor& x,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
                      const at::Tensor& save_invstd, bool relu, at::Tensor& grad_x,
                      at::Tensor& grad_w, at::Tensor& grad_b, at::Tensor& grad_res);
  void (*scale_shift_act)(const Shape& s, const at::Tensor& x, const at::Tensor& scale,
                          const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                          bool relu, const std::optional<at::Tensor>& center, at::Tensor& out);
  void (*scale_shift_act_backward)(const Shape& s, const at::Tensor& grad_out,
                                   const at::Tensor& x, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& out, bool relu,
                                   const std::optional<at::Tensor>& center,
                                   at::Tensor& grad_x, at::Tensor& grad_scale,
                                   at::Tensor& grad_shift, at::Tensor& grad_res);
};

#if defined(__x86_64__) && defined(__GNUC__)
#define RESNET_FUSED_AVX2_KERNELS 1
#endif

namespace generic { extern const Kernels table; }
#ifdef RESNET_FUSED_AVX2_KERNELS
namespace avx2 { extern const Kernels table; }
#endif

// The widest table this CPU runs; ATEN_CPU_CAPABILITY=default (torch's own switch) forces the
// baseline one.
const Kernels& kernels();

}  // namespace cpu
}  // namespace resnet_fused
