"""The extension's ops: Python wrappers and fake kernels (torch.compile, torch.export).

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
  resnet_fused::bn_eval_act(x, weight?, bias?, running_mean, running_var, eps, residual?, relu)
      -> eval-mode BatchNorm2d (+ residual) (+ ReLU) from BN's own tensors: scale_shift_act
         with the fold inside, so autograd records one node (layers.grad_chain)

Autograd is C++ (csrc/autograd.cpp: no Python per call; under create_graph each op's backward
runs a differentiable formula, so double backward works); bn_eval_act's forward is C++ for every
device (fake tensors too); the other fake kernels are registered here when the library loads
(extension.on_load, below). Callers use the wrappers (never torch.ops.resnet_fused.* directly),
which import this.
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


def bn_eval_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """relu?(batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps) +
    residual) in one pass, output in x's layout (its parameters' dtype: x's, or fp32 for
    fp16/bf16 x)."""
    return torch.ops.resnet_fused.bn_eval_act(x, weight, bias, running_mean, running_var,
                                              float(eps), residual, bool(relu))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels use for x (and write their outputs in): NCHW when x is
    contiguous (also when it is both), else channels_last."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


# ---- fake kernels (registered once, when the library loads) ---------------------------------
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


def _fake_scale_shift_act_backward(grad_out, x, scale, out, relu, grad_residual, center=None):
    return _fake_grads(x, relu, grad_residual)


def _fake_scale_shift_act(x, scale, shift, residual, relu, center=None):
    return torch.empty_like(x, memory_format=memory_format(x))


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
    _registered = True


extension.on_load(register)
