"""Backend registry and selection for `conv_bn_act`.

A backend is a module in this package with two functions:
  unavailable_reason(device: torch.device | None) -> str | None
      None when usable (for that device, or in general when device is None),
      else a sentence naming what is missing.
  conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu) -> Tensor
and optionally
  pack_weight(weight) -> Tensor   (same logical shape, layout the kernel likes; default channels_last)
  accelerates(device, dtype) -> bool   (where it beats stock's module sequence; default: always)

Modules are imported lazily, so importing resnet_fused never imports triton or the
extension and never touches the GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

NAMES = ("auto", "triton", "cuda", "onednn", "torch")
_MODULES = {"torch": "resnet_fused.backends.stock", "triton": "resnet_fused.backends.triton",
            "cuda": "resnet_fused.backends.cuda", "onednn": "resnet_fused.backends.onednn"}
ENV_VAR = "RESNET_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown resnet_fused backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


_loaded: dict = {}


def load(name: str) -> ModuleType:
    """The backend module `name` (not 'auto'); imported on first use (hot path: a dict hit)."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[_check_name(name)])
    return module


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    if _check_name(name) == "auto":
        return None
    try:
        module = load(name)
    except ImportError as e:  # a backend whose dependency is missing
        return f"importing it failed: {e}"
    return module.unavailable_reason(device)


def _require(name: str, device: Optional[torch.device] = None) -> None:
    reason = unavailable_reason(name, device)
    if reason is not None:
        where = f" for {device.type} tensors" if device is not None else ""
        raise BackendUnavailableError(f"resnet_fused backend {name!r} is unavailable{where}: {reason}")


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


def auto_choice(device: torch.device) -> str:
    """What 'auto' runs on `device`: the fastest backend usable there."""
    # CPU: oneDNN's fused conv (fp32; other dtypes it hands to stock). resnet50 batch 8 fp32,
    # 2 threads: 1.38-1.42x torchvision eager uncontended, 1.3x the torch backend
    # (benchmarks/RESULTS.md).
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("onednn", "torch")
    for name in order:
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def auto_declines(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when the selection is `auto` and backend `name` (what auto resolved to) does not beat
    stock's module sequence for this device and dtype: auto then runs stock's path. A backend
    says where it wins with an optional `accelerates(device, dtype)` (measured; default: all)."""
    if get_backend() != "auto":
        return False  # an explicit choice is honoured
    accelerates = getattr(load(name), "accelerates", None)
    return accelerates is not None and not accelerates(device, dtype)


@torch.compiler.assume_constant_result  # traced graphs bake the choice made at trace time
def resolve(device: torch.device, name: Optional[str] = None) -> str:
    """The concrete backend that runs on `device` for the selection `name` (default: current)."""
    name = get_backend() if name is None else _check_name(name)
    if name == "auto":
        return auto_choice(device)
    _require(name, device)
    return name


def pack_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """Weight in the layout backend `name` reads fastest; same logical shape."""
    packer = getattr(load(name), "pack_weight", None)
    if packer is not None:
        return packer(weight)
    return weight.contiguous(memory_format=torch.channels_last)
