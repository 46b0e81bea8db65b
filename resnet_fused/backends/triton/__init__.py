"""The `triton` backend: `conv_bn_act` as one implicit-GEMM Triton kernel (see conv.py).

Runs on CUDA tensors (compute capability 8.0+), and on CPU tensors when TRITON_INTERPRET=1 (Triton's
interpreter runs the same kernel code; slow, for tests). Importing this package imports neither
Triton nor the GPU; both happen on first use.

Per-layer `auto`: when the selected backend is `auto` (which resolves to `triton` on CUDA) and the
`cuda` backend (cuDNN conv + fused epilogue) is usable too, the first call for each problem shape
times both and later calls with that shape run the faster one. Both read the same packed weight
(channels_last, the model's dtype), so the fold cache entry keyed on `triton` serves both.
Set RESNET_FUSED_PER_LAYER_AUTO=0 to always run Triton under `auto`.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

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
# Per-layer choice between triton and cuda under `auto`, measured once per shape
# --------------------------------------------------------------------------------------------
_choice: Dict[Tuple, str] = {}


def _shape_key(x, weight, residual, stride, padding, dilation, groups, relu) -> Tuple:
    return (x.device, x.dtype, tuple(x.shape), tuple(x.stride()), tuple(weight.shape),
            tuple(weight.stride()), None if residual is None else tuple(residual.stride()),
            tuple(stride), tuple(padding), tuple(dilation), groups, bool(relu),
            torch.backends.cudnn.allow_tf32)


def _time_ms(fn, reps: int = 10) -> float:
    fn()  # warm-up: compiles / autotunes on first use
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
    key = _shape_key(x, weight, residual, stride, padding, dilation, groups, relu)
    choice = _choice.get(key)
    if choice is not None:
        return choice
    if _interpreting() or backend_reason("cuda", x.device) is not None:
        return "triton"
    if torch.cuda.is_current_stream_capturing():
        return "triton"  # cannot time inside a CUDA graph capture; decide on an eager call
    from . import conv
    cuda_backend = load("cuda")
    args = (x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    t_triton = _time_ms(lambda: conv.conv_bn_act(*args))
    t_cuda = _time_ms(lambda: cuda_backend.conv_bn_act(*args))
    choice = "cuda" if t_cuda < t_triton else "triton"
    _choice[key] = choice
    return choice


def per_layer_choices() -> Dict[Tuple, str]:
    """What per-layer `auto` picked so far, by problem key (for benchmarks and reports)."""
    return dict(_choice)


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
