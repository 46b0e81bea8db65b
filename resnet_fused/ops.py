"""The op contract: `conv_bn_act`, registered as the torch custom op `resnet_fused::conv_bn_act`.

    conv_bn_act(x, weight, scale, shift, *, residual=None, stride=1, padding=0,
                dilation=1, groups=1, relu=True)
      = relu?(conv2d(x, weight) * scale[c] + shift[c] + residual)

`scale`/`shift` are BatchNorm folded per output channel, fp32 (fp64 for fp64 inputs); the
output has x's dtype. The custom op runs the backend its caller resolved (backends/), has a
fake kernel (torch.compile, torch.export) and an autograd formula built from stock ops. Input is
checked once per call: here for the public function, by layers.conv_bn for a model's chains.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends

IntOr2 = Union[int, Sequence[int]]


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"conv_bn_act: {what} must be an int, got {type(v).__name__} {v!r}")
    return v


def _pair(v: IntOr2, what: str) -> List[int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"conv_bn_act: {what} must be an int or a pair of ints, got {v!r}")
        return [_int(i, what) for i in v]
    return [_int(v, what)] * 2


def out_hw(h: int, w: int, k: Sequence[int], stride, padding, dilation) -> Tuple[int, int]:
    """Output height and width of a conv (the one formula for it)."""
    return tuple((size + 2 * p - d * (kk - 1) - 1) // s + 1
                 for size, kk, s, p, d in zip((h, w), k, stride, padding, dilation))


def channels_last_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def epilogue_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scale/shift and of the epilogue arithmetic for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(x, weight, scale, shift, residual, stride, padding, dilation, groups) -> None:
    """Raise a clear error naming what was expected and what came, before any kernel runs."""
    def shape(t):
        return tuple(t.shape)

    for name, t in (("x", x), ("weight", weight), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_bn_act: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: expected x of shape (N, C, H, W), got a {x.dim()}-D tensor "
                         f"of shape {shape(x)}")
    if weight.dim() != 4:
        raise ValueError(f"conv_bn_act: expected weight of shape (C_out, C_in/groups, KH, KW), got "
                         f"shape {shape(weight)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"conv_bn_act: expected a floating-point x (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv_bn_act: expected weight dtype to equal x dtype {x.dtype}, got "
                        f"{weight.dtype}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"conv_bn_act: groups must be >= 1 and divide C_out={weight.shape[0]}, "
                         f"got {groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"conv_bn_act: expected x with {weight.shape[1] * groups} channels "
                         f"(weight {shape(weight)}, groups={groups}), got {x.shape[1]} "
                         f"(x {shape(x)})")
    c_out, want = weight.shape[0], epilogue_dtype(x.dtype)
    for name, t in (("scale", scale), ("shift", shift)):
        if shape(t) != (c_out,):
            raise ValueError(f"conv_bn_act: expected {name} of shape ({c_out},), got {shape(t)}")
        if t.dtype != want:
            raise TypeError(f"conv_bn_act: expected {name} of dtype {want} for {x.dtype} input, "
                            f"got {t.dtype}")
    tensors = [("weight", weight), ("scale", scale), ("shift", shift)]
    if residual is not None:
        tensors.append(("residual", residual))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"conv_bn_act: expected {name} on x's device {x.device}, got "
                             f"{t.device}")
    for name, v in (("stride", stride), ("dilation", dilation)):
        if min(v) < 1:
            raise ValueError(f"conv_bn_act: {name} must be >= 1, got {v}")
    if min(padding) < 0:
        raise ValueError(f"conv_bn_act: padding must be >= 0, got {padding}")
    oh, ow = out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"conv_bn_act: input {shape(x)} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}, dilation {dilation}")
    if residual is not None:
        out_shape = (x.shape[0], c_out, oh, ow)
        if shape(residual) != out_shape:
            raise ValueError(f"conv_bn_act: expected residual of shape {out_shape}, got "
                             f"{shape(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv_bn_act: expected residual dtype {x.dtype}, got "
                            f"{residual.dtype}")


def run(backend: str, prepared: backends.Prepared, x: torch.Tensor,
        residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    """Backend `backend` on checked arguments and its prepared weight, returning the contract's
    output: a fresh channels_last tensor (the fake kernel and the real one agree on strides; it
    never aliases x or the residual). Backends that allocate it so cost nothing here."""
    out = backends.load(backend).run(prepared, x, residual, stride, padding, dilation, groups,
                                     relu)
    n, c, h, w = out.shape
    if out.stride() != (h * w * c, 1, w * c, c) or out is x or out is residual:
        out = torch.empty(out.shape, dtype=out.dtype, device=out.device,
                          memory_format=torch.channels_last).copy_(out)
    return out


@torch.library.custom_op("resnet_fused::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor, residual: Optional[torch.Tensor], stride: List[int],
                    padding: List[int], dilation: List[int], groups: int, relu: bool,
                    backend: Optional[str] = None) -> torch.Tensor:
    """`backend`: the concrete backend the caller resolved (None: resolve the selection now)."""
    if backend is None:
        backend = backends.resolve(x.device)
    return run(backend, backends.prepare(backend, weight, scale, shift), x, residual, stride,
               padding, dilation, groups, relu)


def _dispatch_modes_active() -> bool:
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)  # private: assume a mode
    return length is None or length() > 0


def plain_eager(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """True when dispatching through the custom op adds nothing but host time: plain tensors, no
    autograd to record, no tracing, compiling, __torch_function__ or dispatch mode. (Every chain
    of every call asks: plain checks, cheapest first.)"""
    return not _capturing() and plain_tensors(x, *tensors)


def _capturing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def plain_tensors(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """plain_eager for a caller that knows nothing is being compiled or traced."""
    grad = torch.is_grad_enabled()
    for t in (x, *tensors):
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    # plain tensors: only a torch-function mode could intercept (x stands for all of them)
    return not torch.overrides.has_torch_function((x,)) and not _dispatch_modes_active()


def apply(backend: str, prepared: backends.Prepared, x: torch.Tensor,
          residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
          dilation: Sequence[int], groups: int, relu: bool,
          capturing: Optional[bool] = None) -> torch.Tensor:
    """The op on checked arguments: in plain eager the backend directly on its prepared form,
    else the registered custom op (autograd, compile, export, tracing, modes). `capturing`:
    whether torch.compile or jit.trace runs, where the caller already asked (None: ask)."""
    weight, scale, shift = prepared.weight, prepared.scale, prepared.shift
    if capturing is None:
        capturing = _capturing()
    if not capturing and plain_tensors(x, weight, scale, shift, residual):
        return run(backend, prepared, x, residual, stride, padding, dilation, groups, relu)
    return _conv_bn_act_op(x, weight, scale, shift, residual, list(stride), list(padding),
                           list(dilation), groups, relu, backend)


def empty_output(x: torch.Tensor, weight: torch.Tensor, stride, padding,
                 dilation) -> torch.Tensor:
    """The contract's output, uninitialised (fake kernels)."""
    oh, ow = out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@_conv_bn_act_op.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend=None):
    return empty_output(x, weight, stride, padding, dilation)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, _ = inputs
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _backward(ctx, grad):
    x, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    g = grad.to(scale.dtype)
    if ctx.relu:
        g = g * (output > 0)
    grad_x = grad_w = grad_scale = grad_shift = grad_res = None
    need_x, need_w, need_scale, need_shift, need_res = ctx.needs_input_grad[:5]
    if need_res and ctx.has_residual:
        grad_res = g.to(x.dtype)
    if need_shift:
        grad_shift = g.sum((0, 2, 3))
    if need_scale:  # recompute the conv rather than save it: cheap next to memory
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        grad_scale = (g * y.to(g.dtype)).sum((0, 2, 3))
    if need_x or need_w:
        gy = (g * scale.view(1, -1, 1, 1)).to(x.dtype)
        if need_x:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, gy, stride, padding, dilation,
                                                groups)
        if need_w:
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, gy, stride, padding, dilation,
                                                 groups)
    return grad_x, grad_w, grad_scale, grad_shift, grad_res, None, None, None, None, None, None


_conv_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, residual: Optional[torch.Tensor] = None, stride: IntOr2 = 1,
                padding: IntOr2 = 0, dilation: IntOr2 = 1, groups: int = 1,
                relu: bool = True) -> torch.Tensor:
    """relu?(conv2d(x, weight) * scale[c] + shift[c] + residual) in one fused op.

    Under torch.autocast, x, weight and residual are cast to the autocast dtype as stock conv
    does; scale/shift stay fp32.
    """
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    groups = _int(groups, "groups")
    if (isinstance(x, torch.Tensor) and x.device.type != "meta"
            and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype.is_floating_point and dtype != torch.float64:
            x, weight = x.to(dtype), weight.to(dtype)
            residual = None if residual is None else residual.to(dtype)
    check_inputs(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    backend = backends.resolve(x.device)
    if plain_eager(x, weight, scale, shift, residual):
        return run(backend, backends.prepare(backend, weight, scale, shift), x, residual, stride,
                   padding, dilation, groups, relu)
    return _conv_bn_act_op(x, weight, scale, shift, residual, stride, padding, dilation, groups,
                           relu, backend)
