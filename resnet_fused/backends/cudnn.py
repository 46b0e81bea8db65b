"""The `cudnn` backend: each chain as ONE cuDNN kernel (the extension's conv_bn_act_cudnn: cuDNN's
graph API fuses the conv with scale, shift, residual add and ReLU, fp32 on the accumulator; no
conv output written to memory and read back, which the `cuda` backend's two launches pay).

Where it runs: CUDA, fp16/bf16, groups 1, in an extension built with the cuDNN frontend headers
(`make cudnn-frontend`; `info` says which), and only for problems cuDNN accepts (runtime fusion
has layout and alignment conditions: the extension's cudnn_fused_support asks cuDNN once per
problem). Everything else -- fp32/fp64, grouped convs, refused problems -- runs the `cuda`
backend's path (cuDNN conv + fused epilogue), so selecting `cudnn` is always safe; problems that
fell back are listed by `fallbacks()` and logged once at debug level.

NaN: ReLU must keep NaN as stock's does. cuDNN's ReLU node is checked once per device on a tiny
problem with a NaN planted; if it drops the NaN, ReLU chains run the graph without its ReLU node
and apply a NaN-keeping torch.relu_ to the output (one more pass, still one conv kernel).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import extension
from . import Prepared, prepare_default as prepare  # noqa: F401  (the protocol's prepare)
from . import cuda

logger = logging.getLogger("resnet_fused")

DTYPES = (torch.float16, torch.bfloat16)


def frontend_reason() -> Optional[str]:
    """None when the extension holds the fused cuDNN graph op, else why not."""
    module = extension.load()
    if module is None:
        return f"the resnet_fused extension is unavailable: {extension.unavailable_reason()}"
    if not getattr(module, "cudnn_frontend", ""):
        return ("the extension was built without the cuDNN frontend headers (`make "
                "cudnn-frontend` before building, or $RESNET_FUSED_CUDNN_FRONTEND)")
    return None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    return cuda.unavailable_reason(device) or frontend_reason()


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """Where per-layer auto may pick it (measured against the others per layer)."""
    return device.type == "cuda" and dtype in DTYPES


# problem key -> why cuDNN's fused graph cannot run it ("" when it can); asked once per problem
_support: Dict[Tuple, str] = {}
_relu_keeps_nan: Dict[int, bool] = {}  # CUDA device index -> cuDNN's ReLU node keeps NaN


def _key(x, weight, residual, stride, padding, dilation, relu) -> Tuple:
    return (x.device, x.dtype, tuple(x.shape), tuple(weight.shape), residual is not None,
            tuple(stride), tuple(padding), tuple(dilation), relu)


def _fused(x, weight, scale, shift, residual, stride, padding, dilation, relu) -> torch.Tensor:
    return torch.ops.resnet_fused.conv_bn_act_cudnn(x, weight, scale, shift, residual,
                                                    list(stride), list(padding), list(dilation),
                                                    relu)


def relu_keeps_nan(device: torch.device) -> bool:
    """Whether cuDNN's fused ReLU node keeps a NaN (checked once per device, 1x1 conv, 8 ch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    keeps = _relu_keeps_nan.get(index)
    if keeps is None:
        x = torch.ones(1, 8, 4, 4, device=device, dtype=torch.float16)
        x[0, :, 1, 2] = float("nan")
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.eye(8, device=device, dtype=torch.float16).view(8, 8, 1, 1).contiguous(
            memory_format=torch.channels_last)
        ones = torch.ones(8, device=device)
        args = (x, w, None, [1, 1], [0, 0], [1, 1], True)
        if torch.ops.resnet_fused.cudnn_fused_support(*args):
            keeps = False  # cannot ask: ReLU applied apart (always right)
        else:
            out = _fused(x, w, ones, ones - 1, None, [1, 1], [0, 0], [1, 1], True)
            keeps = bool(torch.isnan(out[0, :, 1, 2]).all())
        _relu_keeps_nan[index] = keeps
        logger.info("cudnn backend: cuDNN's fused ReLU %s NaN on cuda:%d%s", "keeps" if keeps
                    else "drops", index, "" if keeps else "; ReLU runs as a separate pass")
    return keeps


def supported(x, weight, residual, stride, padding, dilation, groups, relu) -> str:
    """"" when this problem runs as one cuDNN kernel, else why not (remembered per problem)."""
    if x.dtype not in DTYPES:
        return f"cuDNN fused graphs run fp16/bf16 here, got {x.dtype}"
    if groups != 1:
        return "cuDNN's graph conv node has no groups"
    key = _key(x, weight, residual, stride, padding, dilation, relu)
    reason = _support.get(key)
    if reason is None:
        reason = _support[key] = torch.ops.resnet_fused.cudnn_fused_support(
            x, weight, residual, list(stride), list(padding), list(dilation), relu)
        if reason:
            logger.debug("cudnn backend: %s (x %s, weight %s); this problem runs conv + "
                         "epilogue", reason, tuple(x.shape), tuple(weight.shape))
    return reason


def _graph_relu(x: torch.Tensor, relu: bool) -> bool:
    """Whether the graph itself applies the ReLU (else a NaN-keeping pass after it does)."""
    return relu and x.dtype in DTYPES and relu_keeps_nan(x.device)


def fallback_reason(x, weight, residual, stride, padding, dilation, groups, relu) -> str:
    """"" when `run` takes this chain (channels_last x and residual) as one cuDNN kernel, else
    why it runs the `cuda` path."""
    return supported(x, weight, residual, stride, padding, dilation, groups, _graph_relu(x, relu))


def fallbacks() -> Dict[Tuple, str]:
    """Problems seen so far that ran the `cuda` path instead, with cuDNN's reason."""
    return {k: v for k, v in _support.items() if v}


def run(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    weight, scale, shift = prepared
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    residual = None if residual is None else residual.contiguous(memory_format=cl)
    fused_relu = _graph_relu(x, relu)
    if supported(x, weight, residual, stride, padding, dilation, groups, fused_relu):
        return cuda.run(prepared, x, residual, stride, padding, dilation, groups, relu)
    out = _fused(x, weight, scale, shift, residual, stride, padding, dilation, fused_relu)
    return torch.relu_(out) if relu and not fused_relu else out
