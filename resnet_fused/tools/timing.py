"""Timing shared by the command-line tools (bench, profile) and the benchmark harness: the
machine's description, statistics, and the three ways a call is timed.

- measure(): per-call times, CUDA events on CUDA, time.perf_counter on CPU (calls are synchronous).
- interleaved(): CPU timing of several callables, round by round in a rotating order, so that load
  from other processes on a shared machine hits all of them alike.
- time_ms(): one median; triton.testing.do_bench on CUDA (L2 flushed between calls) when triton
  imports, else measure().

CPU timings carry the allocator's page faults: glibc returns freed memory to the system (heap
trimming, mmap for large blocks) and the next call faults it back in, a cost that differs between
models (their allocation order) and between runs. `interleaved` counts them per call and
`keep_heap_memory()` switches them off for the whole process (benchmarks/RESULTS.md, "Page
faults").
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import backends


# ----------------------------------------------------------------------------- environment --
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> Dict[str, str]:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "python":
           platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # not installed, or broken on this machine
        out["triton"] = "not available"
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except Exception:
        out["torchvision"] = "not available"
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- statistics --
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, q in [0, 1]."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    return {"median_ms": quantile(times_ms, 0.5), "p20_ms": quantile(times_ms, 0.2),
            "p80_ms": quantile(times_ms, 0.8), "reps": len(times_ms)}


def set_speedup(rows: Sequence[Dict[str, Any]]) -> None:
    """`speedup_vs_eager` on each timed row of one batch and dtype: the eager row's median over
    its own."""
    eager = next((r["median_ms"] for r in rows if r["provider"] == "eager" and "median_ms" in r),
                 None)
    if eager is not None:
        for r in rows:
            if "median_ms" in r:
                r["speedup_vs_eager"] = eager / r["median_ms"]


# ------------------------------------------------------------------------ host allocator --
def minor_faults() -> Optional[int]:
    """This process's minor page faults so far (None where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_call(fn: Callable[[], Any]) -> Tuple[float, Optional[int]]:
    """fn() timed as a synchronous call: its ms (time.perf_counter) and the minor page faults
    it took (None where the platform does not count them)."""
    f0 = minor_faults()
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, (None if f0 is None else minor_faults() - f0)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_heap_memory() -> str:
    """Keep freed memory in this process's heap (glibc: no mmap'd blocks, no trimming), so that
    repeated calls reuse it instead of faulting pages in again; for the whole process, every
    provider alike. Returns a description for the report; raises RuntimeError elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise RuntimeError(f"keep heap: needs glibc's mallopt, this is "
                           f"{platform.system()} {platform.libc_ver()[0] or 'without glibc'}")
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        raise RuntimeError("keep heap: glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
    return "glibc heap kept (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


# -------------------------------------------------------------------------------- timing --
def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, min_reps: int = 5,
            max_reps: int = 100, min_time_s: float = 1.0) -> List[float]:
    """Per-call times in ms: CUDA events on CUDA, perf_counter on CPU (calls are synchronous).

    Runs `warmup` untimed calls, then at least `min_reps` timed calls, more until `min_time_s`
    of timed work is done, at most `max_reps`.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        # A first synchronized probe sizes the batch of event-timed calls.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        probe = max(start.elapsed_time(end), 1e-3)
        n = int(min(max_reps, max(min_reps, math.ceil(min_time_s * 1e3 / probe))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    begin = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_reps and time.perf_counter() - begin >= min_time_s:
            break
    return times


def selected(name: Optional[str]):
    """Backend `name` selected (backends.backend), or the caller's selection for None."""
    return backends.backend(name) if name else contextlib.nullcontext()


def interleaved(runs: List[tuple], warmup: int, min_reps: int, max_reps: int,
                min_time_s: float, inference: bool = True,
                faults: Optional[List[List[int]]] = None) -> List[List[float]]:
    """CPU timing, fair on a shared machine: `runs` are (callable, backend name or None); each
    round calls every one once (in a rotating order), so load from other processes hits all
    alike. `min_time_s` is per callable. Returns per-call ms, one list per run. inference=False
    for callables that need autograd (training steps). `faults`, a list: gets one list per run
    of the minor page faults each timed call took (empty lists where the platform has no count).
    """
    n = len(runs)
    times: List[List[float]] = [[] for _ in range(n)]
    counted: List[List[int]] = [[] for _ in range(n)]
    with torch.inference_mode() if inference else contextlib.nullcontext():
        for _ in range(warmup):
            for run, name in runs:
                with selected(name):
                    run()
        begin = time.perf_counter()
        rnd = 0
        while rnd < max_reps:
            for k in range(n):
                i = (k + rnd) % n
                run, name = runs[i]
                with selected(name):
                    ms, faults_taken = cpu_call(run)
                times[i].append(ms)
                if faults_taken is not None:
                    counted[i].append(faults_taken)
            rnd += 1
            if rnd >= min_reps and time.perf_counter() - begin >= min_time_s * n:
                break
    if faults is not None:
        faults.extend(counted)
    return times


def time_ms(fn: Callable[[], Any], device: torch.device, min_time_s: float,
            min_reps: int = 3) -> float:
    """Median ms of fn(): do_bench on CUDA if triton imports, else CUDA events / perf_counter."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:  # triton missing or broken: CUDA events below
            do_bench = None
        if do_bench is not None:
            warmup, rep = max(5, int(min_time_s * 250)), max(20, int(min_time_s * 1000))
            try:
                return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
            except TypeError:  # an older triton without return_mode
                return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])
    times = measure(fn, device, warmup=1, min_reps=min_reps, max_reps=1000,
                    min_time_s=min_time_s)
    return quantile(times, 0.5)


# CPU peak probes: the primitive the convs run on (oneDNN convolutions, channels_last), a 3x3
# and a 1x1 with enough work to reach steady state: (batch, channels, height/width, kernel).
_CPU_CONV_PROBES = ((8, 256, 28, 3), (8, 1024, 28, 1))


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> Tuple[float, str]:
    """The device's peak as measured here. CUDA: one large square matmul in `dtype` (do_bench
    median). CPU: the best of that matmul and two large oneDNN convolutions (fastest of several
    calls each), since the BLAS a matmul calls is not what the convs run on and can be slower:
    a "% of peak" against the matmul alone could pass 100%."""
    n = 8192 if device.type == "cuda" else 2048
    if dtype == torch.float64 and device.type == "cuda":
        n = 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    note = ""
    if device.type == "cuda" and dtype == torch.float32:
        # cuDNN convs use TF32 when torch.backends.cudnn.allow_tf32 (default True): match it.
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        note = ", TF32" if torch.backends.cudnn.allow_tf32 else ", no TF32"
        try:
            ms = time_ms(lambda: a @ b, device, 0.3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    elif device.type == "cuda":
        ms = time_ms(lambda: a @ b, device, 0.3)
    else:
        ms = min(measure(lambda: a @ b, device, warmup=1, min_reps=5, max_reps=20,
                         min_time_s=1.0))
    if device.type == "cuda":
        return (2 * n ** 3 / (ms * 1e-3) / 1e12,
                f"{n}x{n}x{n} matmul, {str(dtype)[6:]}{note}, median")
    best = (2 * n ** 3 / (ms * 1e-3) / 1e12, f"{n}x{n}x{n} matmul")
    tried = [f"matmul {best[0] * 1e3:.0f}"]
    with torch.no_grad():
        for batch, c, hw, k in _CPU_CONV_PROBES:
            x = torch.randn(batch, c, hw, hw, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)
            w = torch.randn(c, c, k, k, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)
            ms = min(measure(lambda: torch.nn.functional.conv2d(x, w, padding=k // 2), device,
                             warmup=1, min_reps=5, max_reps=20, min_time_s=1.0))
            tf = 2 * batch * c * c * k * k * hw * hw / (ms * 1e-3) / 1e12
            tried.append(f"{k}x{k} conv {tf * 1e3:.0f}")
            if tf > best[0]:
                best = (tf, f"{k}x{k} conv {c}->{c} at {hw}x{hw}, batch {batch}, channels_last")
    return best[0], (f"{best[1]}, {str(dtype)[6:]}, fastest of >= 5; best of "
                     f"{', '.join(tried)} GFLOP/s")


__all__ = ["device_name", "versions", "synchronize", "quantile", "summarize", "set_speedup",
           "minor_faults", "cpu_call", "keep_heap_memory", "measure", "selected", "interleaved",
           "time_ms", "measured_peak_tflops"]
