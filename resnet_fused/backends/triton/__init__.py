"""The `triton` backend: `conv_bn_act` as one implicit-GEMM Triton kernel (see conv.py).

Runs on CUDA tensors (compute capability 8.0+), and on CPU tensors when TRITON_INTERPRET=1 (Triton's
interpreter runs the same kernel code; slow, for tests). Importing this package imports neither
Triton nor the GPU; both happen on first use.

`auto` on CUDA picks between this backend and `cuda` per layer: backends/autoselect.py.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import Prepared, prepare_default as prepare  # noqa: F401  (the protocol's prepare)


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"Triton is not importable ({type(e).__name__}: {e}); install triton"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_reason(index: Optional[int]) -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device is available (CPU tensors need TRITON_INTERPRET=1)"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"the Triton kernels need compute capability 8.0+ (Ampere or newer); this GPU is "
                f"{major}.{minor}")
    return None


def _interpreting() -> bool:
    from . import conv
    return conv.interpreting()


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the triton backend can run on `device` (or anywhere, for device None)."""
    reason = _import_error()
    if reason is not None:
        return reason
    if device is not None:
        device = torch.device(device)
    if _interpreting():
        if device is None or device.type in ("cpu", "cuda"):
            return None
        return f"under TRITON_INTERPRET=1 it runs on cpu and cuda tensors, not {device.type}"
    if device is None:
        if _cuda_reason(None) is None:
            return None
        return ("no usable CUDA device, and TRITON_INTERPRET=1 (the interpreter, for CPU tensors) "
                "is not set")
    if device.type == "cuda":
        return _cuda_reason(device.index)
    if device.type == "cpu":
        return ("on CPU tensors the Triton kernels run only under the interpreter: set "
                "TRITON_INTERPRET=1 (slow; meant for tests)")
    return f"it runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device.type}"


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """On CUDA: conv, BN and ReLU in one kernel (fp64 runs the stock composition)."""
    return device.type == "cuda" and dtype != torch.float64


def run(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    weight, scale, shift = prepared
    if x.dtype == torch.float64:
        # fp64 models are not a performance target: the stock composition keeps them exact.
        from .. import stock
        return stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, relu)
    from . import conv
    return conv.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups,
                            relu)
