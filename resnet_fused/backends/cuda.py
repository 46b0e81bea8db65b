"""The `cuda` backend: stock cuDNN conv2d without bias, then the extension's fused epilogue
`resnet_fused::scale_shift_act` -- relu?(y * scale[c] + shift[c] + residual) in one pass with
16-byte vector loads/stores (csrc/cuda/bn_act.cu). Two launches per conv_bn_act instead of the
stock four or five; what `auto` falls back to where the Triton conv is slower.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import extension, extension_ops
from . import Prepared, prepare_default as prepare  # noqa: F401  (the protocol's prepare)


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    reason = extension.unavailable_reason()
    if reason is not None:
        return f"the resnet_fused extension is unavailable: {reason}"
    if not extension.built_archs():
        return ("the resnet_fused extension was built without CUDA kernels (CPU only); rebuild "
                "it where nvcc matches torch's CUDA")
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        device = torch.device("cuda")
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, got {device.type} tensors"
    return extension.unavailable_reason(device)


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN's conv plus one fused epilogue pass instead of BN's and ReLU's separate passes."""
    return device.type == "cuda"


def run(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    weight, scale, shift = prepared
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    # The epilogue writes its output in y's layout; the op contract wants channels_last.
    if not y.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    if residual is not None and not (
            residual.is_contiguous() if y.is_contiguous()
            else residual.is_contiguous(memory_format=torch.channels_last)):
        residual = residual.contiguous(memory_format=torch.channels_last)
    return extension_ops.scale_shift_act(y, scale, shift, residual, relu)
