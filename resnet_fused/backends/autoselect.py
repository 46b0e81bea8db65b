"""What `auto` runs, decided in one place.

Per device (`device_choice`): CUDA -> per-layer triton-or-cuda when both are usable (else the
one that is, else torch); CPU -> onednn if its self-check passes, else torch.

Per dtype (`choice`): a backend states where it beats stock's own conv -> BN -> ReLU modules
(`accelerates`, measured: benchmarks/RESULTS.md); elsewhere `auto` runs stock's modules (MODULES).

Per layer (this module is also the backend PER_LAYER = 'triton+cuda'): the first call of each
problem bucket times the Triton kernel against the `cuda` backend (cuDNN conv + fused epilogue)
and later calls in that bucket run the faster one. Decisions live in the tuning store
(tuning.py: buckets, $RESNET_FUSED_TUNING=cached for no run-time timing, the on-disk cache).
Both read the same prepared form (the default: channels_last weight in the model's dtype).
$RESNET_FUSED_PER_LAYER_AUTO=0 turns the per-layer choice off (auto then runs Triton).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from .. import tuning
from ..ops import out_hw
from . import MODULES, Prepared, load, prepare_default, unavailable_reason as backend_reason

PER_LAYER_ENV = "RESNET_FUSED_PER_LAYER_AUTO"
CANDIDATES = ("triton", "cuda")


def device_choice(device: torch.device) -> str:
    """The concrete backend 'auto' runs on `device`."""
    if device.type == "cuda":
        usable = [n for n in CANDIDATES if backend_reason(n, device) is None]
        if len(usable) == 2 and os.environ.get(PER_LAYER_ENV, "1").strip() != "0":
            return "triton+cuda"
        return usable[0] if usable else "torch"
    # CPU: oneDNN's fused conv (fp32). resnet50 batch 8 fp32, 2 threads: 1.38-1.42x torchvision
    # eager uncontended, 1.3x the torch backend (benchmarks/RESULTS.md).
    if backend_reason("onednn", device) is None:
        return "onednn"
    return "torch"


def choice(device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """What 'auto' runs for activations of `dtype` on `device`: the device's backend, or
    MODULES (stock's conv -> BN -> ReLU) where that backend does not beat them. Remembered per
    (device, dtype) and the switches that change it (every chain of every call asks)."""
    key = (device, dtype, torch.backends.mkldnn.enabled, os.environ.get(PER_LAYER_ENV))
    name = _choices.get(key)
    if name is None:
        name = device_choice(device)
        if dtype is not None and not load(name).accelerates(device, dtype):
            name = MODULES
        _choices[key] = name
    return name


_choices: dict = {}


# --- the per-layer backend ------------------------------------------------------------------
def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    for name in CANDIDATES:
        reason = backend_reason(name, device)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    return load("triton").accelerates(device, dtype)


def prepare(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> Prepared:
    return prepare_default(weight, scale, shift)  # what both candidates read


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
    """'triton' or 'cuda' for this problem: measured once per bucket, then remembered."""
    if x.dtype == torch.float64:
        return "triton"  # (fp64 runs the stock composition either way)
    args = (x, residual, stride, padding, dilation, groups, relu)
    key = layer_key(x, prepared.weight, residual, stride, padding, dilation, groups, relu)

    def measure(name: str) -> float:
        return _time_ms(lambda: load(name).run(prepared, *args))

    return tuning.decide(x.device, key, CANDIDATES, measure=measure, heuristic=lambda: "triton")


def run(prepared: Prepared, x: torch.Tensor, residual: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        relu: bool) -> torch.Tensor:
    name = choose(prepared, x, residual, stride, padding, dilation, groups, relu)
    return load(name).run(prepared, x, residual, stride, padding, dilation, groups, relu)
