"""One conv -> BN (-> + residual) (-> ReLU) chain, the unit every ResNet block is made of.

In eval mode with a foldable norm layer it is ONE `conv_bn_act` call on folded weights. In train
mode (or with a norm layer that cannot be folded) it keeps torchvision's exact semantics; the
training path is `train_chain`, the seam where fused training kernels plug in.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backends, extension
from .fold import fold, foldable
from .ops import conv_bn_act


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


def train_chain(conv: nn.Module, bn: nn.Module, x: torch.Tensor,
                residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """torchvision's semantics: conv, bn, += residual, relu. With a plain nn.BatchNorm2d in
    training mode and the extension built, BN(+residual)(+ReLU) is one fused bn_act_train
    (same statistics, running-stat updates and gradients); otherwise the stock op sequence."""
    y = conv(x)
    if extension.bn_act_supported(bn, y, residual):
        return extension.batch_norm_act(bn, y, residual, relu)
    out = bn(y)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor, *,
            residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    if not fusable(conv, bn):
        return train_chain(conv, bn, x, residual, relu)
    dtype = compute_dtype(x)
    if x.dtype != conv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"resnet_fused: expected input dtype {conv.weight.dtype} (the model's "
                        f"parameters), got {x.dtype}")
    weight, scale, shift = fold(conv, bn, dtype, backends.resolve(x.device))
    return conv_bn_act(x, weight, scale, shift, residual=residual, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       relu=relu)
