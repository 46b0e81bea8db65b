"""The `torch` backend (stock PyTorch ops): conv2d, then the epilogue in fp32 (fp64 for fp64).

It runs on every device and dtype and is the reference the fused backends are tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import Prepared


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    return None


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """Never: conv + a separate fp32 epilogue is the reference, not faster than stock's own
    conv -> BN -> ReLU modules (resnet50 batch 8 fp32 CPU: 458 ms vs 395 ms channels_last), so
    `auto` that lands here runs stock's path."""
    return False


class Broadcast(Prepared):
    """The default form plus scale/shift as (1, C, 1, 1) views, made once, not per call."""
    __slots__ = ("scale4", "shift4")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__(weight.contiguous(memory_format=torch.channels_last), scale, shift)
        self.scale4, self.shift4 = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def prepare(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> Broadcast:
    return Broadcast(weight, scale, shift)


def run(prepared: Broadcast, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    """relu?(conv(x) * scale[c] + shift[c] + residual): the epilogue in scale's dtype, one
    rounding to x's dtype at the end."""
    y = F.conv2d(x, prepared.weight, None, stride, padding, dilation, groups)
    if y.dtype != prepared.scale.dtype:
        y = y.to(prepared.scale.dtype)
    acc = torch.addcmul(prepared.shift4, y, prepared.scale4)
    if residual is not None:
        acc += residual  # (promotes a low-precision residual to acc's dtype)
    if relu:
        torch.relu_(acc)
    return acc if acc.dtype == x.dtype else acc.to(x.dtype)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    """The reference composition on plain tensors (other backends delegate what they skip)."""
    return run(prepare(weight, scale, shift), x, residual, stride, padding, dilation, groups,
               relu)
