// Autograd for the resnet_fused ops (bn_act_train, scale_shift_act, bn_eval_act and the backward
// ops), registered for the Autograd key in C++ (torch::autograd::Function), so a chain pays
// no Python autograd machinery: torch.library's Python autograd cost ~100 us of host time per
// call and as much in the backward (benchmarks/RESULTS.md, "Host overhead of a training
// chain"), more than stock BatchNorm + ReLU in total on small tensors. The formulas are those
// the Python registration had (docs/design.md, "Training BatchNorm"). The backward ops are not
// differentiable: recorded under create_graph, their node raises when a double backward
// reaches it; so under create_graph each op's backward runs a differentiable torch-ops formula
// instead (bn_act_train: torch's native_batch_norm_backward on the masked grad). bn_eval_fold
// has none: bn_eval_act differentiates the fold itself.
// Fake kernels: Python (resnet_fused/extension_ops.py); bn_eval.cpp's composites for bn_eval_*.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace resnet_fused {

using OptTensor = std::optional<at::Tensor>;

// The ops below the Autograd key (the device kernels, the fake kernels under torch.compile);
// these two are shared with bn_eval.cpp's composite (ops.h).
at::Tensor scale_shift_act_op(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const OptTensor& residual, bool relu,
                              const OptTensor& center) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::scale_shift_act", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, bool, const OptTensor&)>();
  return op.call(x, scale, shift, residual, relu, center);
}

Fold bn_eval_fold_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                     const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::bn_eval_fold", "")
                       .typed<Fold(const at::Tensor&, const OptTensor&, const OptTensor&,
                                   const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, bias, running_mean, running_var, eps);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const OptTensor& t) { return given(t) && t->requires_grad(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_train_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                const OptTensor& residual, const OptTensor& running_mean,
                const OptTensor& running_var, double momentum, double eps, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::bn_act_train", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, double, double,
                           bool)>();
  return op.call(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
    const OptTensor& out, const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu,
    bool grad_residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::bn_act_train_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(grad_out, x, weight, out, save_mean, save_invstd, relu, grad_residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
    const OptTensor& out, bool relu, bool grad_residual, const OptTensor& center) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::scale_shift_act_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, bool, bool, const OptTensor&)>();
  return op.call(grad_out, x, scale, out, relu, grad_residual, center);
}

at::Tensor bn_eval_act_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          double eps, const OptTensor& residual, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::bn_eval_act", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const at::Tensor&, const at::Tensor&, double,
                                         const OptTensor&, bool)>();
  return op.call(x, weight, bias, running_mean, running_var, eps, residual, relu);
}

// The edge index of each tensor argument that is given (torch::autograd::Function numbers only
// defined tensors), or -1: what `needs_input_grad` takes.
c10::List<int64_t> edge_indices(std::initializer_list<bool> given_args) {
  c10::List<int64_t> index;
  int64_t next = 0;
  for (bool g : given_args) index.push_back(g ? next++ : -1);
  return index;
}

// The layout the kernels use for x (and write their outputs in): NCHW when x is contiguous.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

bool needs(AutogradContext* ctx, const std::vector<int64_t>& edges, size_t arg) {
  return edges[arg] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edges[arg]));
}

// ---- bn_act_train ------------------------------------------------------------------------------
struct BnActTrain : public torch::autograd::Function<BnActTrain> {
  // args: x, weight, bias, residual, running_mean, running_var, momentum, eps, relu
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, save_mean, save_invstd, new_rm, new_rv, scale, shift] =
        bn_act_train_op(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["edges"] = edge_indices({true, given(weight), given(bias), given(residual),
                                             given(running_mean), given(running_var)});
    // the grads of weight/bias come in x's arithmetic dtype: cast to the parameters'
    ctx->saved_data["weight_dtype"] = given(weight) ? static_cast<int64_t>(weight->scalar_type())
                                                    : int64_t{-1};
    ctx->saved_data["bias_dtype"] = given(bias) ? static_cast<int64_t>(bias->scalar_type())
                                                : int64_t{-1};
    ctx->mark_non_differentiable({save_mean, save_invstd, new_rm, new_rv, scale, shift});
    // x (BN's input) and the per-channel stats; the ReLU mask comes from `out`, which the next
    // layer saves anyway. Nothing else is kept: x_hat and the mask are recomputed.
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), relu ? out : at::Tensor(),
                            save_mean, save_invstd});
    ctx->set_materialize_grads(false);
    return {out, save_mean, save_invstd, new_rm, new_rv, scale, shift};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &out = saved[2];
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool need_x = needs(ctx, edges, 0), need_w = needs(ctx, edges, 1),
               need_b = needs(ctx, edges, 2), need_res = needs(ctx, edges, 3);
    variable_list result(9);
    if (!grads[0].defined() || !(need_x || need_w || need_b || need_res)) return result;
    at::Tensor grad_out, grad_x, grad_w, grad_b, grad_res;
    if (at::GradMode::is_enabled()) {
      // create_graph (a double backward may follow: gradient penalties, R1 regularisation):
      // the ReLU mask, then torch's own batch-norm backward on this step's statistics, which
      // is differentiable: the graph stock's modules would record, and the same numbers
      grad_out = grads[0];
      if (relu) grad_out = at::where(out <= 0, at::zeros({}, grad_out.options()), grad_out);
      std::tie(grad_x, grad_w, grad_b) = at::native_batch_norm_backward(
          grad_out, x, weight.defined() ? OptTensor(weight) : std::nullopt, std::nullopt,
          std::nullopt, saved[3], saved[4], /*train=*/true, ctx->saved_data["eps"].toDouble(),
          {need_x, need_w && weight.defined(), need_b});
      grad_res = grad_out;
    } else {
      grad_out = grads[0].contiguous(layout_of(x));
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(grad_x, grad_w, grad_b, grad_res) = bn_act_train_backward_op(
          grad_out, x, weight, out, saved[3], saved[4], relu, relu && need_res);
    }
    const int64_t w_dtype = ctx->saved_data["weight_dtype"].toInt();
    const int64_t b_dtype = ctx->saved_data["bias_dtype"].toInt();
    if (need_x) result[0] = grad_x;
    if (need_w && w_dtype >= 0) result[1] = grad_w.to(static_cast<at::ScalarType>(w_dtype));
    if (need_b && b_dtype >= 0) result[2] = grad_b.to(static_cast<at::ScalarType>(b_dtype));
    if (need_res) result[3] = relu ? grad_res : grad_out;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_train_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& residual, const OptTensor& running_mean,
                      const OptTensor& running_var, double momentum, double eps, bool relu) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
        requires_grad(residual))) {  // nothing to record: straight to the kernel
    at::AutoDispatchBelowADInplaceOrView below;
    return bn_act_train_op(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                           relu);
  }
  auto r = BnActTrain::apply(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                             relu);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

// ---- scale_shift_act ---------------------------------------------------------------------------
struct ScaleShiftAct : public torch::autograd::Function<ScaleShiftAct> {
  // args: x, scale, shift, residual, relu, center
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const OptTensor& residual, bool relu,
                            const OptTensor& center) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = scale_shift_act_op(x, scale, shift, residual, relu, center);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["edges"] =
        edge_indices({true, true, true, given(residual), false, given(center)});
    ctx->save_for_backward({x, scale, relu ? out : at::Tensor(), center.value_or(at::Tensor())});
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1], &out = saved[2], &center = saved[3];
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool need_x = needs(ctx, edges, 0), need_scale = needs(ctx, edges, 1),
               need_shift = needs(ctx, edges, 2), need_res = needs(ctx, edges, 3),
               need_center = needs(ctx, edges, 5);
    variable_list result(6);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    if (x.device().is_cpu() && !at::GradMode::is_enabled()) {
      // one sweep of the CPU kernel: the masked grad, grad_x and both sums together
      const at::Tensor g = grad.to(x.scalar_type()).contiguous(layout_of(x));
      at::AutoDispatchBelowADInplaceOrView below;
      auto [grad_x, grad_scale, grad_shift, grad_res] = scale_shift_act_backward_op(
          g, x, scale, out, relu, relu && need_res,
          center.defined() ? OptTensor(center) : std::nullopt);
      if (need_x) result[0] = grad_x;
      if (need_scale) result[1] = grad_scale;
      if (need_shift) result[2] = grad_shift;
      if (need_res) result[3] = relu ? grad_res : g;
      if (need_center) result[5] = -scale * grad_shift;
      return result;
    }
    // create_graph or CUDA: the differentiable torch-ops formula
    at::Tensor g = grad.to(scale.scalar_type());
    if (relu) g = at::where(out <= 0, at::zeros({}, g.options()), g);
    const at::Tensor per_channel_scale = scale.view({1, -1, 1, 1});
    at::Tensor g_shift;
    if (need_shift || need_center) g_shift = g.sum({0, 2, 3});
    if (need_x) result[0] = (g * per_channel_scale).to(x.scalar_type());
    if (need_scale) {
      at::Tensor xc = x.to(g.scalar_type());
      if (center.defined()) xc = xc - center.view({1, -1, 1, 1});
      result[1] = (g * xc).sum({0, 2, 3});
    }
    if (need_shift) result[2] = g_shift;
    if (need_res) result[3] = g.to(x.scalar_type());
    if (need_center) result[5] = -scale * g_shift;
    return result;
  }
};

at::Tensor scale_shift_act_autograd(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& shift, const OptTensor& residual, bool relu,
                                    const OptTensor& center) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || scale.requires_grad() || shift.requires_grad() ||
        requires_grad(residual) || requires_grad(center))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return scale_shift_act_op(x, scale, shift, residual, relu, center);
  }
  return ScaleShiftAct::apply(x, scale, shift, residual, relu, center);
}

// ---- bn_eval_act -------------------------------------------------------------------------------
// The fold (bn_eval_fold: a loop on CPU) then scale_shift_act centred on the running mean (so
// the weight's grad is a sum of centred products, as stock's), one node for autograd.
struct BnEvalAct : public torch::autograd::Function<BnEvalAct> {
  // args: x, weight, bias, running_mean, running_var, eps, residual, relu
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                            const OptTensor& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, double eps,
                            const OptTensor& residual, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [inv_std, scale, shift, center] =
        bn_eval_fold_op(x, weight, bias, running_mean, running_var, eps);
    at::Tensor out = scale_shift_act_op(x, scale, shift, residual, relu, center);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(
        given(bias) ? bias->scalar_type() : shift.scalar_type());
    ctx->saved_data["edges"] = edge_indices({true, given(weight), given(bias), true, true, false,
                                             given(residual), false});
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), running_mean, running_var,
                            relu ? out : at::Tensor(), inv_std, scale, center});
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3],
                     &out = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool need_x = needs(ctx, edges, 0), need_w = needs(ctx, edges, 1),
               need_b = needs(ctx, edges, 2), need_mean = needs(ctx, edges, 3),
               need_var = needs(ctx, edges, 4), need_res = needs(ctx, edges, 6);
    variable_list result(8);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    const OptTensor w = weight.defined() ? OptTensor(weight) : std::nullopt;
    at::Tensor inv_std, scale, center, g, g_shift, g_scale;  // g_scale: sum g * (x - mean)
    if (x.device().is_cpu() && !at::GradMode::is_enabled()) {
      // one sweep of the CPU kernel: the masked grad, grad_x and both sums together
      inv_std = saved[5], scale = saved[6], center = saved[7];
      g = grad.to(x.scalar_type()).contiguous(layout_of(x));
      at::AutoDispatchBelowADInplaceOrView below;
      at::Tensor grad_x, grad_res;
      std::tie(grad_x, g_scale, g_shift, grad_res) =
          scale_shift_act_backward_op(g, x, scale, out, relu, relu && need_res, center);
      if (need_x) result[0] = grad_x;
      if (need_res) result[6] = relu ? grad_res : g;
    } else {
      // create_graph or CUDA: the differentiable torch-ops formula, the fold redone from the
      // saved inputs so that it is differentiated too
      std::tie(inv_std, scale, std::ignore, center) = bn_eval_fold_torch(
          x, w, std::nullopt, mean, var, ctx->saved_data["eps"].toDouble());
      g = grad.to(scale.scalar_type());
      if (relu) g = at::where(out <= 0, at::zeros({}, g.options()), g);
      if (need_x) result[0] = (g * scale.view({1, -1, 1, 1})).to(x.scalar_type());
      if (need_res) result[6] = g.to(x.scalar_type());
      if (need_b || need_mean) g_shift = g.sum({0, 2, 3});
      if (need_w || need_var)
        g_scale = (g * (x.to(g.scalar_type()) - center.view({1, -1, 1, 1}))).sum({0, 2, 3});
    }
    if (need_w) result[1] = (g_scale * inv_std).to(weight.scalar_type());
    if (need_b) result[2] = g_shift.to(c10::ScalarType(ctx->saved_data["bias_dtype"].toInt()));
    if (need_mean) result[3] = (-scale * g_shift).to(mean.scalar_type());
    if (need_var) result[4] = (g_scale * scale * inv_std * inv_std * -0.5).to(var.scalar_type());
    return result;
  }
};

at::Tensor bn_eval_act_autograd(const at::Tensor& x, const OptTensor& weight,
                                const OptTensor& bias, const at::Tensor& running_mean,
                                const at::Tensor& running_var, double eps,
                                const OptTensor& residual, bool relu) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
        running_mean.requires_grad() || running_var.requires_grad() || requires_grad(residual))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return bn_eval_act_op(x, weight, bias, running_mean, running_var, eps, residual, relu);
  }
  return BnEvalAct::apply(x, weight, bias, running_mean, running_var, eps, residual, relu);
}

// ---- the backward ops: recorded only under create_graph, where their own backward is an error --
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A backward op whose outputs carry a node that raises `message` when differentiated.
template <const char* message>
struct NotDifferentiable : public torch::autograd::Function<NotDifferentiable<message>> {
  template <typename Op, typename... Args>
  static variable_list forward(AutogradContext* ctx, const Op& op, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [a, b, c, d] = op(args...);
    return {a, b, c, d};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, message);
    return {};
  }
};

constexpr char kBnDoubleBackward[] =
    "resnet_fused: double backward through bn_act_train is not supported; set "
    "$RESNET_FUSED_DISABLE_EXT=1 to train with stock BatchNorm where higher-order gradients are "
    "needed";
constexpr char kSsaBackwardOnly[] =
    "resnet_fused: scale_shift_act_backward is not differentiable (create_graph through "
    "scale_shift_act runs its differentiable formula instead)";

Grads bn_act_train_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                                     const OptTensor& weight, const OptTensor& out,
                                     const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                     bool relu, bool grad_residual) {
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || x.requires_grad() || requires_grad(weight) ||
        requires_grad(out))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return bn_act_train_backward_op(grad_out, x, weight, out, save_mean, save_invstd, relu,
                                    grad_residual);
  }
  auto r = NotDifferentiable<kBnDoubleBackward>::apply(
      &bn_act_train_backward_op, grad_out, x, weight, out, save_mean, save_invstd, relu,
      grad_residual);
  return {r[0], r[1], r[2], r[3]};
}

Grads scale_shift_act_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& scale, const OptTensor& out, bool relu,
                                        bool grad_residual, const OptTensor& center) {
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || x.requires_grad() || scale.requires_grad() ||
        requires_grad(out) || requires_grad(center))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return scale_shift_act_backward_op(grad_out, x, scale, out, relu, grad_residual, center);
  }
  auto r = NotDifferentiable<kSsaBackwardOnly>::apply(&scale_shift_act_backward_op, grad_out, x,
                                                      scale, out, relu, grad_residual, center);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("bn_act_train", &resnet_fused::bn_act_train_autograd);
  m.impl("bn_act_train_backward", &resnet_fused::bn_act_train_backward_autograd);
  m.impl("scale_shift_act", &resnet_fused::scale_shift_act_autograd);
  m.impl("scale_shift_act_backward", &resnet_fused::scale_shift_act_backward_autograd);
  m.impl("bn_eval_act", &resnet_fused::bn_eval_act_autograd);
}

