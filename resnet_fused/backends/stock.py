"""The `torch` backend (stock PyTorch ops): conv2d, then the epilogue in fp32 (fp64 for fp64).

It runs on every device and dtype and is the reference the fused backends are tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    return None


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """Never: conv + a separate fp32 epilogue is the reference, not faster than stock's own
    conv -> BN -> ReLU modules (resnet50 batch 8 fp32 CPU: 458 ms vs 395 ms channels_last), so
    `auto` that lands here runs stock's path."""
    return False


def epilogue(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             residual: Optional[torch.Tensor], relu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """relu?(y * scale[c] + shift[c] + residual), computed in scale's dtype, one cast at the end."""
    acc = torch.addcmul(shift.view(1, -1, 1, 1), y.to(scale.dtype), scale.view(1, -1, 1, 1))
    if residual is not None:
        acc = acc + residual.to(scale.dtype)
    if relu:
        acc = torch.relu(acc)
    return acc.to(out_dtype)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return epilogue(y, scale, shift, residual, relu, x.dtype)
