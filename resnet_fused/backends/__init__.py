"""The backends of `conv_bn_act`: one protocol, a registry, the user's selection.

A backend is a module of this package that provides
  unavailable_reason(device: torch.device | None) -> str | None
      None when usable (for that device, or in general when device is None), else a sentence
      naming what is missing.
  prepare(weight, scale, shift) -> Prepared
      What the kernel reads, made once per fold-cache entry (fold.py, the one weight cache):
      a packed or scale-folded weight, a blocked layout, ... `weight` is already in the run
      dtype; the result exposes .weight/.scale/.shift (the contract's tensors) for graph paths.
  run(prepared, x, residual, stride, padding, dilation, groups, relu) -> Tensor
      The contract's output on checked arguments (ops.py owns the contract and the checks).
  accelerates(device, dtype) -> bool
      Where it beats stock's own conv -> BN -> ReLU modules (measured); `auto` runs stock's
      modules elsewhere (MODULES).

Names a user selects: NAMES. 'auto' resolves per device and dtype here (`auto_choice`) and on
CUDA per layer in autoselect.py (the PER_LAYER backend). The selection is read ONCE per chain
call, by `resolve`, and the concrete name is passed down (to the fold cache's key and to the
op), never re-read from a global.

Modules are imported lazily, so importing resnet_fused never imports triton or the extension and
never touches the GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

logger = logging.getLogger("resnet_fused")

NAMES = ("auto", "triton", "cuda", "cudnn", "onednn", "torch")
# What 'auto' may resolve to besides NAMES: per-layer triton/cuda/cudnn on CUDA (autoselect.py), and
# stock's own conv -> BN -> ReLU modules where no backend beats them (not a backend: no kernel).
PER_LAYER = "triton+cuda"
MODULES = "modules"
PER_LAYER_ENV = "RESNET_FUSED_PER_LAYER_AUTO"  # 0: `auto` on CUDA runs Triton on every layer
_MODULES = {"torch": "resnet_fused.backends.stock", "triton": "resnet_fused.backends.triton",
            "cuda": "resnet_fused.backends.cuda", "cudnn": "resnet_fused.backends.cudnn",
            "onednn": "resnet_fused.backends.onednn",
            PER_LAYER: "resnet_fused.backends.autoselect"}
ENV_VAR = "RESNET_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class Prepared:
    """A prepared form: the contract's weight, scale and shift (unpack as `w, s, b = prepared`);
    backends subclass it to keep more (a blocked weight, broadcast views). The default keeps
    the weight channels_last (K contiguous per output channel, what the Triton kernel, cuDNN
    and oneDNN read without a reorder), scale and shift as given."""
    __slots__ = ("weight", "scale", "shift")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        self.weight, self.scale, self.shift = weight, scale, shift

    def __iter__(self):
        return iter((self.weight, self.scale, self.shift))


def prepare_default(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> Prepared:
    return Prepared(weight.contiguous(memory_format=torch.channels_last), scale, shift)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown resnet_fused backend {name!r}; expected one of "
                         f"{', '.join(NAMES)}")
    return name


_loaded: dict = {}


def load(name: str) -> ModuleType:
    """The backend module `name` (concrete, not 'auto'); imported on first use (then a dict hit)."""
    module = _loaded.get(name)
    if module is None:
        if name not in _MODULES:
            raise ValueError(f"unknown resnet_fused backend {name!r}; expected one of "
                             f"{', '.join(_MODULES)}")
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    if name == "auto":
        return None
    if name != PER_LAYER:
        _check_name(name)
    try:
        module = load(name)
    except ImportError as e:  # a backend whose dependency is missing
        return f"importing it failed: {e}"
    return module.unavailable_reason(device)


def _require(name: str, device: Optional[torch.device] = None) -> None:
    reason = unavailable_reason(name, device)
    if reason is not None:
        where = f" for {device.type} tensors" if device is not None else ""
        raise BackendUnavailableError(
            f"resnet_fused backend {name!r} is unavailable{where}: {reason}")


# The process default (set_backend(), else $RESNET_FUSED_BACKEND, else 'auto'), and the selection
# of `with backend(...)`, local to the thread / asyncio task that entered it (a context variable),
# so concurrent blocks never see each other's choice.
_default: Optional[str] = None
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("resnet_fused_backend",
                                                                       default=None)


def get_backend() -> str:
    """The selected backend name: the innermost `with backend(...)` of this thread/context, else
    set_backend()'s process default, else $RESNET_FUSED_BACKEND, else 'auto'."""
    global _default
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _default is None:
        name = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        try:
            _check_name(name)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
        _default = name
    return _default


def set_backend(name: str) -> None:
    """Set the process default for every later conv_bn_act call (all threads; a `with backend()`
    block still wins inside it). Raises if the backend cannot run here at all."""
    global _default
    _require(_check_name(name))
    _default = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with resnet_fused.backend("torch"): ...`: the selection for this thread / context only."""
    _require(_check_name(name))
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


@torch.compiler.assume_constant_result  # traced graphs bake the choice made at trace time
def resolve(device: torch.device, name: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> str:
    """What runs a chain on `device` for the selection `name` (default: the current one): `name`
    itself if it can run there; for 'auto' `auto_choice(device, dtype)`."""
    name = get_backend() if name is None else _check_name(name)
    # Every chain of every call asks: the answer is remembered per selection, device and dtype
    # and the switches that change it at run time. (An unavailable explicit backend raises each
    # time, never remembered.)
    key = (name, device, dtype, torch.backends.mkldnn.enabled,
           os.environ.get(PER_LAYER_ENV) if name == "auto" and device.type == "cuda" else None)
    resolved = _resolved.get(key)
    if resolved is None:
        if name == "auto":
            resolved = auto_choice(device, dtype)
        else:
            _require(name, device)
            resolved = name
        _resolved[key] = resolved
    return resolved


_resolved: dict = {}


# --- what `auto` runs: per device and dtype here; per layer on CUDA in autoselect.py ----------
def device_choice(device: torch.device) -> str:
    """The concrete backend 'auto' runs on `device`."""
    if device.type == "cuda":
        usable = [n for n in ("triton", "cuda") if unavailable_reason(n, device) is None]
        if len(usable) == 2 and os.environ.get(PER_LAYER_ENV, "1").strip() != "0":
            return PER_LAYER
        return usable[0] if usable else "torch"
    # CPU: oneDNN's fused conv (fp32). resnet50 batch 8 fp32, 2 threads: 1.38-1.42x torchvision
    # eager uncontended, 1.3x the torch backend (benchmarks/RESULTS.md).
    if unavailable_reason("onednn", device) is None:
        return "onednn"
    return "torch"


def auto_choice(device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """What 'auto' runs for activations of `dtype` on `device`: the device's backend, or
    MODULES (stock's conv -> BN -> ReLU) where that backend does not beat them."""
    name = device_choice(device)
    if dtype is not None and not load(name).accelerates(device, dtype):
        return MODULES
    return name


def prepare(name: str, weight: torch.Tensor, scale: torch.Tensor,
            shift: torch.Tensor) -> Prepared:
    """Backend `name`'s prepared form of (weight, scale, shift)."""
    return load(name).prepare(weight, scale, shift)
