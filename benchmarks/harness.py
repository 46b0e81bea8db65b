"""Shared pieces of the pytest-benchmark suites: device-correct timing inside pedantic mode and
the extra_info every benchmark records.

Timing: the pedantic target runs one call. On CUDA it is bracketed by CUDA events and ends with a
synchronize, so pytest-benchmark's host clock (started after `setup` synchronized) covers the
device work too; the device times from the events are kept and reported in extra_info
(`device_median_ms`), and images/s, TFLOP/s and GB/s are computed from them. On CPU every call is
synchronous and timed with time.perf_counter, and its minor page faults are counted
(`page_faults_per_call`, the median: glibc's allocator faults freed memory in again,
resnet_fused.tools.timing).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch

from resnet_fused.tools import timing


def device_or_skip(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU variant: no CUDA device visible on this machine")
    return torch.device(name)


class Timed:
    """A pedantic target recording each call's time (CUDA events on CUDA, perf_counter on CPU)."""

    def __init__(self, fn: Callable[[], Any], device: torch.device):
        self.fn, self.device = fn, device
        self.times_ms: List[float] = []
        self.faults: List[int] = []

    def setup(self) -> None:
        timing.synchronize(self.device)

    def __call__(self) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.times_ms.append(start.elapsed_time(end))
        else:
            ms, faults = timing.cpu_call(self.fn)
            self.times_ms.append(ms)
            if faults is not None:
                self.faults.append(faults)


def run_pedantic(benchmark, fn: Callable[[], Any], device: torch.device, *, rounds: int,
                 warmup_rounds: int = 1, grad: bool = False) -> Timed:
    """grad=True for targets that run autograd (training ops), else under inference_mode."""
    timed = Timed(fn, device)
    with torch.enable_grad() if grad else torch.inference_mode():
        benchmark.pedantic(timed, setup=timed.setup, rounds=rounds, warmup_rounds=warmup_rounds,
                           iterations=1)
    # pytest-benchmark runs warm-up rounds through the same target: drop them.
    if len(timed.times_ms) > rounds:
        timed.times_ms = timed.times_ms[-rounds:]
        timed.faults = timed.faults[-rounds:]
    return timed


def record(benchmark, device: torch.device, dtype: torch.dtype, timed: Timed, *,
           images: Optional[int] = None, macs: Optional[int] = None,
           min_bytes: Optional[int] = None, **more: Any) -> Dict[str, Any]:
    """Fill benchmark.extra_info: device, dtype, versions, and rates from the median call."""
    median = statistics.median(timed.times_ms) if timed.times_ms else float("nan")
    v = timing.versions()
    info: Dict[str, Any] = {"device": timing.device_name(device), "dtype": str(dtype)[6:],
                            "torch": v["torch"], "triton": v["triton"],
                            "device_median_ms": median, "timing": (
                                "CUDA events" if device.type == "cuda" else "perf_counter")}
    if median and median == median:
        if images:
            info["images_per_s"] = images / median * 1e3
        if macs:
            info["tflops"] = 2 * macs / (median * 1e-3) / 1e12
        if min_bytes:
            info["gbps_min_traffic"] = min_bytes / (median * 1e-3) / 1e9
    if timed.faults:
        info["page_faults_per_call"] = statistics.median(timed.faults)
    info.update(more)
    benchmark.extra_info.update(info)
    return info
