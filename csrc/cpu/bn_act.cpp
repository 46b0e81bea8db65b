// CPU launchers: bn_act_train and scale_shift_act, each with its backward. Inputs are checked (ops.h),
// outputs allocated, and the element loops run from the kernel table for this CPU
// (kernels.h: compiled per instruction set, picked once).
#include "kernels.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace resnet_fused {
namespace cpu {

const Kernels& kernels() {
  static const Kernels* const best = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) return &generic::table;
#ifdef RESNET_FUSED_AVX2_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return &avx2::table;
#endif
    return &generic::table;
  }();
  return *best;
}

}  // namespace cpu

namespace {

// Both backward ops return (grad_x, two per-channel sums in x's arithmetic dtype, the residual's
// grad or an empty tensor); the sums are zero for an empty x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(const at::Tensor& x,
                                                                           const Shape& s,
                                                                           bool grad_residual) {
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor sum0 = empty_channels(x, s.C, acc), sum1 = empty_channels(x, s.C, acc);
  if (s.numel() == 0) {
    sum0.zero_();
    sum1.zero_();
  }
  return {empty_like_layout(x, s.layout), sum0, sum1,
          grad_residual ? empty_like_layout(x, s.layout) : empty_channels(x, 0, x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_train_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  const auto [s, pdtype] =
      check_bn_act_train(x, weight, bias, residual, running_mean, running_var);
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor out = empty_like_layout(x, s.layout);
  at::Tensor save_mean = empty_channels(x, s.C, acc), save_invstd = empty_channels(x, s.C, acc);
  const int64_t rc = given(running_mean) ? s.C : 0;
  at::Tensor new_rm = empty_channels(x, rc, pdtype), new_rv = empty_channels(x, rc, pdtype);
  at::Tensor scale = empty_channels(x, s.C, acc), shift = empty_channels(x, s.C, acc);
  if (s.C == 0) return {out, save_mean, save_invstd, new_rm, new_rv, scale, shift};
  cpu::kernels().bn_forward(s, x, weight, bias, residual, running_mean, running_var, momentum,
                            eps, relu, out, save_mean, save_invstd, new_rm, new_rv, scale, shift);
  return {out, save_mean, save_invstd, new_rm, new_rv, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool relu, bool grad_residual) {
  const Shape s =
      check_bn_act_train_backward(grad_out, x, weight, out, save_mean, save_invstd, relu);
  auto [grad_x, grad_w, grad_b, grad_res] = backward_outputs(x, s, relu && grad_residual);
  if (s.numel() == 0) return {grad_x, grad_w, grad_b, grad_res};
  cpu::kernels().bn_backward(s, grad_out, x, weight, out, save_mean, save_invstd, relu, grad_x,
                             grad_w, grad_b, grad_res);
  return {grad_x, grad_w, grad_b, grad_res};
}

at::Tensor scale_shift_act_cpu(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                               bool relu, const std::optional<at::Tensor>& center) {
  const Shape s = check_scale_shift_act(x, scale, shift, residual, center);
  at::Tensor out = empty_like_layout(x, s.layout);
  if (s.numel() == 0) return out;
  cpu::kernels().scale_shift_act(s, x, scale, shift, residual, relu, center, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& out, bool relu, bool grad_residual) {
  const Shape s = check_scale_shift_act_backward(grad_out, x, scale, out, relu);
  auto [grad_x, grad_scale, grad_shift, grad_res] =
      backward_outputs(x, s, relu && grad_residual);
  if (s.numel() == 0) return {grad_x, grad_scale, grad_shift, grad_res};
  cpu::kernels().scale_shift_act_backward(s, grad_out, x, scale, out, relu, grad_x, grad_scale,
                                          grad_shift, grad_res);
  return {grad_x, grad_scale, grad_shift, grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act_train", &bn_act_train_cpu);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cpu);
  m.impl("scale_shift_act", &scale_shift_act_cpu);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward_cpu);
}

}  // namespace resnet_fused
