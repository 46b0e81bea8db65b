"""The compiled extension `resnet_fused._C` (csrc/): lazy, safe loading and availability.

Its ops' Python halves (wrappers, fake kernels; autograd is C++, csrc/autograd.cpp) are in
extension_ops.py, which every caller goes through (it registers the fake kernels before the first
call); when training uses them is training.py's rule.

Nothing here runs at `import resnet_fused`: the library is loaded on first use. A missing,
stale or broken library never raises from available()/unavailable_reason()/status(); the op
wrappers raise RuntimeError naming the reason. $RESNET_FUSED_DISABLE_EXT=1 turns it off.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from types import ModuleType
from typing import Callable, List, Optional, Tuple

import torch

DISABLE_ENV = "RESNET_FUSED_DISABLE_EXT"
# What this package expects of the library (its `ops_version`, csrc/resnet_fused.cpp); 2: the
# ops' autograd is C++. An older build would run the ops with no autograd at all: refused.
OPS_VERSION = 3
_BUILD_HINT = ("build it with `make install` (or `pip install --no-build-isolation --no-deps -e .`"
               " with torch installed)")

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None
_path: Optional[str] = None


def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    global _path
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None, f"disabled by ${DISABLE_ENV}"
    try:
        spec = importlib.util.find_spec("resnet_fused._C")
    except (ImportError, ValueError) as e:
        return None, f"looking for resnet_fused._C failed: {e}"
    if spec is None:
        return None, f"resnet_fused._C is not built; {_BUILD_HINT}"
    _path = spec.origin
    try:
        module = importlib.import_module("resnet_fused._C")
    except (ImportError, OSError) as e:
        return None, (f"{spec.origin} failed to load ({e}); rebuild it against torch "
                      f"{torch.__version__}: {_BUILD_HINT}")
    built = getattr(module, "torch_version", "")
    if built and built != torch.__version__:
        return None, (f"{spec.origin} was built against torch {built}, this is torch "
                      f"{torch.__version__}; {_BUILD_HINT}")
    version = getattr(module, "ops_version", 1)
    if version != OPS_VERSION:
        return None, (f"{spec.origin} was built from other sources (ops version {version}, this "
                      f"package needs {OPS_VERSION}); {_BUILD_HINT}")
    return module, None


_on_load: List[Callable[[], None]] = []  # run once the library has loaded (extension_ops)


def on_load(fn: Callable[[], None]) -> None:
    """Run `fn` when the library has loaded (now, if it already has)."""
    with _lock:
        if not _loaded:
            _on_load.append(fn)
            return
    if _module is not None:
        fn()


def load() -> Optional[ModuleType]:
    """The loaded `resnet_fused._C` module, or None (see unavailable_reason())."""
    global _loaded, _module, _reason
    if not _loaded:
        with _lock:
            if not _loaded:
                _module, _reason = _load()
                _loaded = True
                if _module is not None:
                    for fn in _on_load:
                        fn()
    return _module


def built_archs() -> Tuple[str, ...]:
    """GPU targets in the library: ('sm_80', 'sm_90', 'compute_90') ; () for a CPU-only build."""
    module = load()
    if module is None or not module.with_cuda:
        return ()
    return tuple(a for a in module.cuda_archs.split(",") if a)


def _runs_on(cap: Tuple[int, int], archs: Tuple[str, ...]) -> bool:
    """Whether a GPU of compute capability `cap` can run a fat binary holding `archs`:
    SASS sm_XY runs on X.Y..X.9; PTX compute_XY is JIT-compiled for any newer GPU."""
    here = cap[0] * 10 + cap[1]
    for arch in archs:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        v = int(num)
        if kind == "sm" and v // 10 == cap[0] and v <= here:
            return True
        if kind == "compute" and v <= here:
            return True
    return False


_capabilities: dict = {}  # CUDA device index -> compute capability (asked once per device)


# (compiled graphs ask it while tracing: the answer is a constant of the trace, and the first
# load, under a lock, runs eagerly instead of being traced)
@torch.compiler.assume_constant_result
def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the extension's ops can run (on `device`, or at all when None), else why not."""
    module = load()
    if module is None:
        return _reason
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"it has no kernels for {device.type} tensors (CPU and CUDA only)"
    if not module.with_cuda:
        return ("it was built without CUDA kernels (CPU only: torch without CUDA, no nvcc "
                "matching torch's CUDA, or RESNET_FUSED_NO_CUDA); rebuild with nvcc")
    if torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _capabilities.get(index)
        if cap is None:
            cap = _capabilities[index] = torch.cuda.get_device_capability(index)
        if not _runs_on(cap, built_archs()):
            return (f"it was built for {','.join(built_archs())}, which cannot run on this "
                    f"sm_{cap[0]}{cap[1]} GPU; rebuild with TORCH_CUDA_ARCH_LIST="
                    f"{cap[0]}.{cap[1]}")
    return None


def available(device: Optional[torch.device] = None) -> bool:
    return unavailable_reason(device) is None


def status() -> str:
    """One line for `python -m resnet_fused info`: built? for which archs? where?"""
    module = load()
    if module is None:
        return f"not available: {_reason}"
    cpu = f"CPU ({getattr(module, 'cpu_kernels', '?')})"
    if module.with_cuda:
        kernels = (f"{cpu} + CUDA kernels for {', '.join(built_archs()) or '?'} "
                   f"(nvcc {module.cuda_version or '?'})")
    else:
        kernels = f"{cpu} kernels only (no CUDA)"
    return f"built: {kernels}; torch {module.torch_version}; {_path}"


def require(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"resnet_fused extension unavailable for {device.type} tensors: "
                           f"{reason}")
