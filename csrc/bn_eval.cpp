// bn_eval_act and bn_eval_fold for every device (CompositeExplicitAutograd: CUDA, and meta/fake
// tensors under torch.compile), from the other ops and torch ops; CPU has its own fold loop
// (cpu/bn_act.cpp), which wins over the composite there. Autograd: autograd.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace resnet_fused {

Fold bn_eval_fold_torch(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps) {
  check_bn_eval(x, weight, bias, running_mean, running_var, "bn_eval_fold");
  const at::ScalarType acc = opmath_type(x.scalar_type());
  // (copies where a result would alias another or an input: an op's outputs may not)
  at::Tensor inv_std = at::rsqrt(running_var.to(acc) + eps);
  at::Tensor scale = given(weight) ? weight->to(acc) * inv_std : inv_std.clone();
  at::Tensor shift = given(bias) ? bias->to(acc, false, true) : at::zeros_like(inv_std);
  return {inv_std, scale, shift, running_mean.to(acc, false, true)};
}

namespace {

at::Tensor bn_eval_act_composite(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 double eps, const std::optional<at::Tensor>& residual,
                                 bool relu) {
  auto [inv_std, scale, shift, center] =
      bn_eval_fold_op(x, weight, bias, running_mean, running_var, eps);
  return scale_shift_act_op(x, scale, shift, residual, relu, center);
}

}  // namespace
}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("bn_eval_act", &resnet_fused::bn_eval_act_composite);
  m.impl("bn_eval_fold", &resnet_fused::bn_eval_fold_torch);
}
