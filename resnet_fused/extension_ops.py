"""The extension's ops: Python wrappers, fake kernels (torch.compile, torch.export) and autograd.

Schemas (csrc/resnet_fused.cpp):
  resnet_fused::bn_act_train(x, weight?, bias?, residual?, running_mean?, running_var?,
                             momentum, eps, relu) -> (out, save_mean, save_invstd,
                                                      new_running_mean, new_running_var,
                                                      scale, shift)
      training-mode BatchNorm2d (+ residual) (+ ReLU) in one op; functional: the caller copies
      new_running_* into its buffers (training.batch_norm_act). scale/shift: the factors of
      out = relu?((x - save_mean) * scale + shift + residual), for recomputing it.
  resnet_fused::bn_act_train_backward(...)  its backward (grad x, weight, bias, residual)
  resnet_fused::scale_shift_act(x, scale, shift, residual?, relu, center?)
      -> relu?((x - center) * scale + shift + residual): the conv epilogue (center None), and
         bn_act_train's output again from its save_mean, scale and shift (bit for bit)
  resnet_fused::scale_shift_act_backward(...)  its backward (CPU kernel; torch ops elsewhere)

The fake kernels and autograd formulas are registered when the library loads (extension.on_load,
below); callers use the wrappers (never torch.ops.resnet_fused.* directly), which import this.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import extension
from .ops import epilogue_dtype


require = extension.require


# ---- op wrappers -----------------------------------------------------------------------------
def bn_act_train(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                 running_var: Optional[torch.Tensor], momentum: float, eps: float,
                 relu: bool) -> Tuple[torch.Tensor, ...]:
    """(out, save_mean, save_invstd, new_running_mean, new_running_var, scale, shift); see the
    module doc."""
    require(x.device)
    return torch.ops.resnet_fused.bn_act_train(x, weight, bias, residual, running_mean,
                                               running_var, float(momentum), float(eps),
                                               bool(relu))


def bn_act_train_backward(grad_out: torch.Tensor, x: torch.Tensor,
                          weight: Optional[torch.Tensor], out: Optional[torch.Tensor],
                          save_mean: torch.Tensor, save_invstd: torch.Tensor, relu: bool,
                          grad_residual: bool) -> Tuple[torch.Tensor, ...]:
    """(grad_x, grad_weight, grad_bias, grad_residual or empty) of bn_act_train, in x's layout;
    `out` (the forward's output) gives the ReLU mask."""
    grad_out = grad_out.contiguous(memory_format=memory_format(x))
    return torch.ops.resnet_fused.bn_act_train_backward(
        grad_out, x, weight, out, save_mean, save_invstd, bool(relu), bool(grad_residual))


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    residual: Optional[torch.Tensor] = None, relu: bool = True,
                    center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu?((x - center[c]) * scale[c] + shift[c] + residual) in one pass (center None: 0);
    scale/shift/center fp32 (fp64 for fp64)."""
    require(x.device)
    return torch.ops.resnet_fused.scale_shift_act(x, scale, shift, residual, bool(relu), center)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels use for x (and write their outputs in): NCHW when x is
    contiguous (also when it is both), else channels_last."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


# ---- fake kernels and autograd (registered once, when the library loads) --------------------
def _fake_bn_act_train(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                       relu):
    fmt, acc, c = memory_format(x), epilogue_dtype(x.dtype), x.shape[1]
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    pdtype = params[0].dtype if params else acc
    n_running = c if running_mean is not None else 0
    return (torch.empty_like(x, memory_format=fmt), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc), x.new_empty((n_running,), dtype=pdtype),
            x.new_empty((n_running,), dtype=pdtype), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc))


def _fake_grads(x, relu, grad_residual):
    """Both backward ops' outputs: (grad_x, two per-channel grads, grad_residual or empty)."""
    fmt, acc, c = memory_format(x), epilogue_dtype(x.dtype), x.shape[1]
    grad_res = (torch.empty_like(x, memory_format=fmt) if relu and grad_residual
                else x.new_empty((0,)))
    return (torch.empty_like(x, memory_format=fmt), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc), grad_res)


def _fake_bn_act_train_backward(grad_out, x, weight, out, save_mean, save_invstd, relu,
                                grad_residual):
    return _fake_grads(x, relu, grad_residual)


def _fake_scale_shift_act_backward(grad_out, x, scale, out, relu, grad_residual):
    return _fake_grads(x, relu, grad_residual)


def _fake_scale_shift_act(x, scale, shift, residual, relu, center=None):
    return torch.empty_like(x, memory_format=memory_format(x))


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, momentum, eps, relu = inputs
    out, save_mean, save_invstd, *per_channel = output
    ctx.relu = relu
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(save_mean, save_invstd, *per_channel)
    # x (BN's input) and the per-channel stats; the ReLU mask comes from `out`, which the next
    # layer saves anyway. Nothing else is kept: x_hat and the mask are recomputed.
    ctx.save_for_backward(x, weight, out if relu else None, save_mean, save_invstd)


def _bn_backward(ctx, grad_out, *unused):
    x, weight, out, save_mean, save_invstd = ctx.saved_tensors
    need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
    nothing = (None,) * 9
    if grad_out is None or not (need_x or need_w or need_b or need_res):
        return nothing
    grad_x, grad_w, grad_b, grad_res = bn_act_train_backward(
        grad_out, x, weight, out, save_mean, save_invstd, ctx.relu, ctx.relu and need_res)
    w_dtype, b_dtype = ctx.param_dtypes
    return (grad_x if need_x else None,
            grad_w.to(w_dtype) if need_w and w_dtype is not None else None,
            grad_b.to(b_dtype) if need_b and b_dtype is not None else None,
            (grad_res if ctx.relu else grad_out) if need_res else None,
            None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("resnet_fused: double backward through bn_act_train is not supported; "
                       f"set ${extension.DISABLE_ENV}=1 to train with stock BatchNorm where "
                       "higher-order gradients are needed")


def _kernel_backward_only(ctx, *grads):  # (double backward runs the torch-ops formula instead)
    raise RuntimeError("resnet_fused: scale_shift_act_backward is not differentiable")


def _ssa_setup_context(ctx, inputs, output):
    x, scale, shift, residual, relu, center = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, scale, output if relu else None, center)


def _ssa_backward(ctx, grad):
    x, scale, out, center = ctx.saved_tensors
    # (`center` left out of the call: five inputs, five grads)
    need_x, need_scale, need_shift, need_res, _, need_center = (*ctx.needs_input_grad, False)[:6]
    n_inputs = len(ctx.needs_input_grad)
    if x.device.type == "cpu" and center is None and not torch.is_grad_enabled():
        # one sweep of the CPU kernel: the masked grad, grad_x and both sums together
        # (create_graph, or a center: the torch-ops formula below)
        grad = grad.to(x.dtype).contiguous(memory_format=memory_format(x))
        grad_x, grad_scale, grad_shift, grad_res = \
            torch.ops.resnet_fused.scale_shift_act_backward(
                grad, x, scale, out, ctx.relu, bool(ctx.relu and need_res))
        return (grad_x if need_x else None, grad_scale if need_scale else None,
                grad_shift if need_shift else None,
                (grad_res if ctx.relu else grad) if need_res else None, None, None)[:n_inputs]
    g = grad.to(scale.dtype)
    if ctx.relu:
        g = torch.where(out <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
    xc = x.to(g.dtype) if center is None else x.to(g.dtype) - center.view(1, -1, 1, 1)
    g_shift = g.sum((0, 2, 3)) if need_shift or need_center else None
    return (
        (g * scale.view(1, -1, 1, 1)).to(x.dtype) if need_x else None,
        (g * xc).sum((0, 2, 3)) if need_scale else None,
        g_shift if need_shift else None,
        g.to(x.dtype) if need_res else None,
        None,
        -scale * g_shift if need_center else None,
    )[:n_inputs]


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    lib = torch.library
    lib.register_fake("resnet_fused::bn_act_train", _fake_bn_act_train)
    lib.register_fake("resnet_fused::bn_act_train_backward", _fake_bn_act_train_backward)
    lib.register_fake("resnet_fused::scale_shift_act", _fake_scale_shift_act)
    lib.register_fake("resnet_fused::scale_shift_act_backward", _fake_scale_shift_act_backward)
    lib.register_autograd("resnet_fused::bn_act_train", _bn_backward,
                          setup_context=_bn_setup_context)
    lib.register_autograd("resnet_fused::bn_act_train_backward", _no_double_backward)
    lib.register_autograd("resnet_fused::scale_shift_act", _ssa_backward,
                          setup_context=_ssa_setup_context)
    lib.register_autograd("resnet_fused::scale_shift_act_backward", _kernel_backward_only)
    _registered = True


extension.on_load(register)
