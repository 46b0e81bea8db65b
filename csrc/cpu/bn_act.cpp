// CPU launchers: bn_act_train and scale_shift_act, each with its backward, and bn_eval_fold's
// loop. Inputs are checked (ops.h), outputs allocated, and the element loops run from the
// kernel table for this CPU (kernels.h: compiled per instruction set, picked once).
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
    const std::optional<at::Tensor>& out, bool relu, bool grad_residual,
    const std::optional<at::Tensor>& center) {
  const Shape s = check_scale_shift_act_backward(grad_out, x, scale, out, relu, center);
  auto [grad_x, grad_scale, grad_shift, grad_res] =
      backward_outputs(x, s, relu && grad_residual);
  if (s.numel() == 0) return {grad_x, grad_scale, grad_shift, grad_res};
  cpu::kernels().scale_shift_act_backward(s, grad_out, x, scale, out, relu, center, grad_x,
                                          grad_scale, grad_shift, grad_res);
  return {grad_x, grad_scale, grad_shift, grad_res};
}

Fold bn_eval_fold_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                      const at::Tensor& running_var, double eps) {
  check_bn_eval(x, weight, bias, running_mean, running_var, "bn_eval_fold");
  const int64_t C = x.size(1);
  const at::ScalarType acc = opmath_type(x.scalar_type());
  at::Tensor f[4];  // inv_std, scale, shift, center (apart: outputs may not alias)
  for (auto& t : f) t = empty_channels(x, C, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_eval_fold_cpu", [&] {
    using A = scalar_t;
    A *inv = f[0].mutable_data_ptr<A>(), *scale = f[1].mutable_data_ptr<A>(),
      *shift = f[2].mutable_data_ptr<A>(), *center = f[3].mutable_data_ptr<A>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var.scalar_type(),
                                    "bn_eval_fold_cpu", [&] {
      const scalar_t* w = given(weight) ? weight->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* b = given(bias) ? bias->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* mean = running_mean.const_data_ptr<scalar_t>();
      const scalar_t* var = running_var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        inv[c] = A(1) / std::sqrt(A(var[c]) + A(eps));  // (as stock's CPU batch_norm)
        scale[c] = w ? A(w[c]) * inv[c] : inv[c];
        shift[c] = b ? A(b[c]) : A(0);
        center[c] = A(mean[c]);
      }
    });
  });
  return {f[0], f[1], f[2], f[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act_train", &bn_act_train_cpu);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cpu);
  m.impl("scale_shift_act", &scale_shift_act_cpu);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward_cpu);
  m.impl("bn_eval_fold", &bn_eval_fold_cpu);
}

}  // namespace resnet_fused
