"""One conv -> BN (-> + residual) (-> ReLU) chain, the unit every ResNet block is made of.

In eval mode with a foldable norm layer it is ONE `conv_bn_act` call on folded weights. In train
mode (or with a norm layer that cannot be folded) it keeps torchvision's exact semantics; the
training path is `train_chain`, the seam where fused training kernels plug in.

Captured graphs get what they can hold: torch.jit.trace and torch.fx record `graph_chain` (the
fold computed from the parameters, then the fused op), so they follow later weight changes and
never bake a fold; ONNX export, meta tensors, hooks and swapped activations run torchvision's
module sequence (`module_chain`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, extension
from .fold import fold, foldable, scale_shift
from .ops import apply, check_inputs, conv_bn_act, out_hw


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convs run in: autocast's when it is on (as stock conv), else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point \
            and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """True when conv -> bn can run as one folded conv_bn_act call right now."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not bn.training and foldable(bn))


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                      "_global_backward_hooks", "_global_backward_pre_hooks")


def observed(*modules: Optional[nn.Module]) -> bool:
    """True when calling the modules would do more than their math: hooks on any of them or
    global module hooks, which a fused call would skip. (nn.Module keeps hooks in private dicts;
    a torch without them counts as hooked: unfused but correct.)"""
    registry = torch.nn.modules.module
    if any(getattr(registry, name, True) for name in _GLOBAL_HOOK_DICTS):
        return True
    return any(m is not None and any(getattr(m, name, True) for name in _HOOK_DICTS)
               for m in modules)


def module_chain(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                 residual: Optional[torch.Tensor], act: Optional[nn.Module]) -> torch.Tensor:
    """Exactly torchvision's sequence of module calls (hooks fire, any activation module)."""
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return act(out) if act is not None else out


def train_chain(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """torchvision's semantics: conv, bn, += residual, relu. With a plain nn.BatchNorm2d in
    training mode and the extension built, BN(+residual)(+ReLU) is one fused bn_act_train
    (same statistics, running-stat updates and gradients); otherwise the stock op sequence."""
    y = conv(x)
    if extension.bn_act_supported(bn, y, residual):
        return extension.batch_norm_act(bn, y, residual, relu)
    return bn_tail(bn, y, residual, relu)


def bn_tail(bn: nn.Module, y: torch.Tensor, residual: Optional[torch.Tensor],
            relu: bool) -> torch.Tensor:
    """bn(y) (+ residual) (-> ReLU) with stock ops, in place as torchvision does (`out` is bn's
    fresh output)."""
    out = bn(y)
    if residual is not None:
        out += residual
    return torch.relu_(out) if relu else out


@torch.fx.wrap  # one call_function node in an FX graph; runs (fused) when the graph runs
def graph_chain(x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                residual: Optional[torch.Tensor], stride: List[int], padding: List[int],
                dilation: List[int], groups: int, relu: bool) -> torch.Tensor:
    """The eval chain as a traced graph records it: the fold computed from the tensors on every
    call (a cache would be baked into the graph), then the fused op."""
    dtype = compute_dtype(x)
    scale, shift = scale_shift(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                               dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    residual = None if residual is None else residual.to(dtype)
    if not torch.jit.is_tracing():  # (jit.trace: shapes are the example's, checks are noise)
        check_inputs(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    return apply(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)


def _capturing(x) -> bool:
    """torch.fx symbolic tracing (x is a Proxy) or torch.jit.trace."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def _stock_only(x) -> bool:
    """ONNX export (standard ONNX ops, not our custom op) or meta tensors (shapes only)."""
    if torch.onnx.is_in_onnx_export():
        return True
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
            residual: Optional[torch.Tensor] = None,
            act: Optional[nn.Module] = None) -> torch.Tensor:
    """One chain of a torchvision ResNet: act?(bn(conv(x)) + residual), `act` the block's ReLU
    module (None: no activation). One rule for train and eval: hooks on conv, bn or act (or
    global module hooks), or an activation that is not nn.ReLU, run the module sequence as
    torchvision does; otherwise eval with a foldable BN is one fused conv_bn_act call, and train
    runs train_chain (fused BN+ReLU where the extension allows)."""
    if (observed(conv, bn, act) or (act is not None and type(act) is not nn.ReLU)
            or _stock_only(x)):
        return module_chain(conv, bn, x, residual, act)
    relu = act is not None
    if _capturing(x):
        if not fusable(conv, bn):
            return module_chain(conv, bn, x, residual, act)
        return graph_chain(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var, bn.eps, residual, list(conv.stride),
                           list(conv.padding), list(conv.dilation), conv.groups, relu)
    if not fusable(conv, bn):
        return train_chain(conv, bn, x, residual, relu)
    dtype = compute_dtype(x)
    if x.dtype != conv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"resnet_fused: expected input dtype {conv.weight.dtype} (the model's "
                        f"parameters), got {x.dtype}")
    backend = backends.resolve(x.device)
    weight, scale, shift = fold(conv, bn, dtype, backend)
    if not torch.compiler.is_compiling() and backends.auto_declines(backend, x.device, dtype):
        # auto: stock's ops are faster here; run them on the cached channels_last weight (the
        # model's own NCHW weight would be reordered by every conv). Compiled and exported graphs
        # keep the op, which resolves its backend when it runs.
        y = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return bn_tail(bn, y, residual, relu)
    if dtype != x.dtype or not _consistent(conv, x, residual):
        # autocast casts, and odd inputs get the op's full checks and clear errors
        return conv_bn_act(x, weight, scale, shift, residual=residual, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                           relu=relu)
    return apply(x, weight, scale, shift, residual, list(conv.stride), list(conv.padding),
                 list(conv.dilation), conv.groups, relu, backend)


def _consistent(conv: nn.Conv2d, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """The few facts the fold does not already guarantee (the weight, scale and shift are built
    from conv/bn on conv's device): a 4-D x with conv's channels on its device, and a residual
    of the output's shape, dtype and device."""
    if x.dim() != 4 or x.shape[1] != conv.in_channels or x.device != conv.weight.device:
        return False
    if residual is None:
        return True
    if residual.dtype != x.dtype or residual.device != x.device:
        return False
    return tuple(residual.shape) == (x.shape[0], conv.out_channels, *out_hw(
        x.shape[2], x.shape[3], conv.kernel_size, conv.stride, conv.padding, conv.dilation))
