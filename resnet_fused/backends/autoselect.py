"""Per-layer `auto` on CUDA: the backend PER_LAYER = 'triton+cuda'.

(Per device and per dtype, `auto` is decided by the registry, backends.auto_choice; on CUDA,
where triton and cuda are usable, it resolves to this backend.) The first call of each
problem bucket times the Triton kernel against the `cuda` backend (cuDNN conv + fused epilogue)
and, where the extension has it, the `cudnn` backend (one cuDNN fused kernel per chain), and
later calls in that bucket run the fastest. Decisions live in the tuning store
(tuning.py: buckets, $RESNET_FUSED_TUNING=cached for no run-time timing, the on-disk cache).
All read the same prepared form (the default: channels_last weight in the model's dtype).
$RESNET_FUSED_PER_LAYER_AUTO=0 turns the per-layer choice off (auto then runs Triton).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import tuning
from ..ops import out_hw
from . import Prepared, load, prepare_default, unavailable_reason as backend_reason

REQUIRED = ("triton", "cuda")  # what per-layer auto needs; "cudnn" joins where available
CANDIDATES = (*REQUIRED, "cudnn")


_candidates: dict = {}  # device -> its candidates (asked on every chain call)


def candidates(device: torch.device) -> tuple:
    """The backends timed per layer on `device`."""
    names = _candidates.get(device)
    if names is None:
        names = _candidates[device] = tuple(
            n for n in CANDIDATES if n in REQUIRED or backend_reason(n, device) is None)
    return names


# --- the per-layer backend ------------------------------------------------------------------
def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    for name in REQUIRED:
        reason = backend_reason(name, device)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    return load("triton").accelerates(device, dtype)


def prepare(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> Prepared:
    return prepare_default(weight, scale, shift)  # what every candidate reads


def _time_ms(fn: Callable[[], torch.Tensor], reps: int = 10) -> float:
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


def layer_key(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              groups: int, relu: bool) -> str:
    """The tuning key of a per-layer decision: the problem with M = N*OH*OW bucketed."""
    n, _, h, w = x.shape
    oh, ow = out_hw(h, w, weight.shape[2:], stride, padding, dilation)
    layout = "cl" if x.stride(1) == 1 else "other"
    return (f"backend|{str(x.dtype)[6:]}|tf32{int(torch.backends.cudnn.allow_tf32)}|"
            f"M{tuning.bucket(n * oh * ow)}|w{tuple(weight.shape)}|g{groups}|s{tuple(stride)}|"
            f"p{tuple(padding)}|d{tuple(dilation)}|res{int(residual is not None)}|"
            f"relu{int(relu)}|{layout}")


def choose(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
           relu: bool) -> str:
    """'triton', 'cuda' or 'cudnn' for this problem: measured once per bucket, then
    remembered."""
    if x.dtype == torch.float64:
        return "triton"  # (fp64 runs the stock composition either way)
    args = (x, residual, stride, padding, dilation, groups, relu)
    key = layer_key(x, prepared.weight, residual, stride, padding, dilation, groups, relu)

    def measure(name: str) -> float:
        return _time_ms(lambda: load(name).run(prepared, *args))

    return tuning.decide(x.device, key, candidates(x.device), measure=measure,
                         heuristic=lambda: "triton")


def run(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    name = choose(prepared, x, residual, stride, padding, dilation, groups, relu)
    return load(name).run(prepared, x, residual, stride, padding, dilation, groups, relu)
