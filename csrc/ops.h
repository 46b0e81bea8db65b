// Argument checks and output allocation shared by the CPU and CUDA implementations of
//   resnet_fused::bn_act_train, resnet_fused::bn_act_train_backward, resnet_fused::scale_shift_act
// (schemas in resnet_fused.cpp). Both devices run exactly the same checks.
#pragma once

#include "common.h"

#include <ATen/ops/empty.h>

#include <tuple>

namespace resnet_fused {

struct Shape {
  Layout layout;
  int64_t N, C, HW;
  int64_t count() const { return N * HW; }     // values per channel
  int64_t numel() const { return N * C * HW; }
};

inline Shape shape_of(const at::Tensor& x, Layout l) {
  return Shape{l, x.size(0), x.size(1), x.size(2) * x.size(3)};
}

inline at::Tensor empty_like_layout(const at::Tensor& x, Layout l) {
  return at::empty(x.sizes(), x.options().memory_format(memory_format(l)));
}

inline at::Tensor empty_channels(const at::Tensor& x, int64_t C, at::ScalarType dtype) {
  return at::empty({C}, x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

// bn_act_train: returns the layout of x and the dtype of the BN parameters / running stats.
inline std::pair<Shape, at::ScalarType> check_bn_act_train(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "bn_act_train";
  const Layout l = check_activation(x, op, "x");
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, op,
              ": expected running_mean and running_var both given or both None, got ",
              has_rm ? "running_mean" : "running_var", " only");
  const at::ScalarType pdtype = check_bn_params(
      {{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
       {&running_var, "running_var"}}, x, op);
  if (residual.has_value() && residual->defined()) check_like_x(*residual, "residual", x, l, op);
  const Shape s = shape_of(x, l);
  TORCH_CHECK(s.C == 0 || s.count() > 1, op,
              ": expected more than 1 value per channel when training, got input of shape ",
              x.sizes());
  return {s, pdtype};
}

inline Shape check_bn_act_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool relu) {
  constexpr const char* op = "bn_act_train_backward";
  const Layout l = check_activation(x, op, "x");
  check_like_x(grad_out, "grad_out", x, l, op);
  check_bn_params({{&weight, "weight"}}, x, op);
  if (relu) {
    TORCH_CHECK(out.has_value() && out->defined(), op,
                ": expected the forward output `out` (for the ReLU mask) when relu=True, got None");
    check_like_x(*out, "out", x, l, op);
  }
  const at::ScalarType acc = opmath_type(x.scalar_type());
  check_channel_vector(save_mean, "save_mean", x.size(1), x, acc, op);
  check_channel_vector(save_invstd, "save_invstd", x.size(1), x, acc, op);
  return shape_of(x, l);
}

inline Shape check_scale_shift_act(const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& center) {
  constexpr const char* op = "scale_shift_act";
  const Layout l = check_activation(x, op, "x");
  const at::ScalarType acc = opmath_type(x.scalar_type());
  check_channel_vector(scale, "scale", x.size(1), x, acc, op);
  check_channel_vector(shift, "shift", x.size(1), x, acc, op);
  if (center.has_value() && center->defined())
    check_channel_vector(*center, "center", x.size(1), x, acc, op);
  if (residual.has_value() && residual->defined()) check_like_x(*residual, "residual", x, l, op);
  return shape_of(x, l);
}

inline Shape check_scale_shift_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& scale,
                                            const std::optional<at::Tensor>& out, bool relu,
                                            const std::optional<at::Tensor>& center) {
  constexpr const char* op = "scale_shift_act_backward";
  const Layout l = check_activation(x, op, "x");
  check_like_x(grad_out, "grad_out", x, l, op);
  check_channel_vector(scale, "scale", x.size(1), x, opmath_type(x.scalar_type()), op);
  if (relu) {
    TORCH_CHECK(out.has_value() && out->defined(), op,
                ": expected the forward output `out` (for the ReLU mask) when relu=True, got None");
    check_like_x(*out, "out", x, l, op);
  }
  if (center.has_value() && center->defined())
    check_channel_vector(*center, "center", x.size(1), x, opmath_type(x.scalar_type()), op);
  return shape_of(x, l);
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// bn_eval_fold / bn_eval_act: x an activation, BN's tensors per-channel vectors of one dtype
// (x's, or Float for Half/BFloat16 x).
inline void check_bn_eval(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, const char* op) {
  check_activation(x, op, "x");
  const std::optional<at::Tensor> mean(running_mean), var(running_var);
  check_bn_params({{&weight, "weight"}, {&bias, "bias"}, {&mean, "running_mean"},
                   {&var, "running_var"}}, x, op);
}

// BN's eval fold in x's arithmetic dtype (fp32; fp64 for fp64 x), with torch ops (recorded by
// autograd where it records; bn_eval.cpp): (inv_std, scale = weight * inv_std, shift = bias,
// center = running_mean), inv_std = 1 / sqrt(running_var + eps).
using Fold = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Fold bn_eval_fold_torch(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps);

// The dispatcher's entry to scale_shift_act and bn_eval_fold (autograd.cpp), for a composite.
at::Tensor scale_shift_act_op(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                              bool relu, const std::optional<at::Tensor>& center);
Fold bn_eval_fold_op(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double eps);

}  // namespace resnet_fused
