"""The `triton` backend: `conv_bn_act` as one implicit-GEMM Triton kernel (see conv.py).

Runs on CUDA tensors (compute capability 8.0+), and on CPU tensors when TRITON_INTERPRET=1 (Triton's
interpreter runs the same kernel code; slow, for tests). Importing this package imports neither
Triton nor the GPU; both happen on first use.

Per-layer `auto`: when the selected backend is `auto` (which resolves to `triton` on CUDA) and the
`cuda` backend (cuDNN conv + fused epilogue) is usable too, the first call for each problem bucket
times both and later calls in that bucket run the faster one (resnet_fused/tuning.py: buckets,
the no-timing mode, the on-disk cache). Both read the same packed weight
(channels_last, the model's dtype), so the fold cache entry keyed on `triton` serves both.
Set RESNET_FUSED_PER_LAYER_AUTO=0 to always run Triton under `auto`.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

from ... import tuning
from ...ops import out_hw

_PER_LAYER_ENV = "RESNET_FUSED_PER_LAYER_AUTO"


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


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """channels_last (C_out, KH, KW, C_in/groups in memory): K is contiguous per output channel.
    Same logical shape and dtype as the `cuda` backend's weight, so the two can share it."""
    return weight.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Per-layer choice between triton and cuda under `auto`: measured once per shape bucket
# --------------------------------------------------------------------------------------------
def _time_ms(fn, reps: int = 10) -> float:
    fn()  # warm-up: compiles / tunes on first use
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _per_layer_choice(x, weight, scale, shift, residual, stride, padding, dilation, groups,
                      relu) -> str:
    """'triton' or 'cuda' for this call; only consulted when the selection is 'auto' on CUDA."""
    from .. import get_backend, load, unavailable_reason as backend_reason
    if os.environ.get(_PER_LAYER_ENV, "1").strip() == "0" or get_backend() != "auto":
        return "triton"
    if _interpreting() or backend_reason("cuda", x.device) is not None:
        return "triton"
    from . import conv
    n, _, h, w = x.shape
    oh, ow = out_hw(h, w, weight.shape[2:], stride, padding, dilation)
    layout = "cl" if x.stride(1) == 1 else "other"
    key = (f"backend|{str(x.dtype)[6:]}|tf32{int(torch.backends.cudnn.allow_tf32)}|"
           f"M{tuning.bucket(n * oh * ow)}|w{tuple(weight.shape)}|g{groups}|s{tuple(stride)}|"
           f"p{tuple(padding)}|d{tuple(dilation)}|res{int(residual is not None)}|"
           f"relu{int(relu)}|{layout}")
    args = (x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    run = {"triton": lambda: conv.conv_bn_act(*args),
           "cuda": lambda: load("cuda").conv_bn_act(*args)}
    return tuning.decide(x.device, key, ("triton", "cuda"),
                         measure=lambda name: _time_ms(run[name]), heuristic=lambda: "triton")


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    if x.dtype == torch.float64:
        # fp64 models are not a performance target: the stock composition keeps them exact.
        from .. import stock
        return stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, relu)
    if x.is_cuda and _per_layer_choice(x, weight, scale, shift, residual, stride, padding,
                                       dilation, groups, relu) == "cuda":
        from .. import load
        return load("cuda").conv_bn_act(x, weight, scale, shift, residual, stride, padding,
                                        dilation, groups, relu)
    from . import conv
    return conv.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups,
                            relu)
