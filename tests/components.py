"""The one rule for tests that need an optional-looking component: skip locally, fail in CI.

A test that cannot run because a component is missing calls `require(component, reason)` (or
carries the `needs(...)` / `needs_gpu(...)` mark, or imports through `importorskip`). Normally
that skips, as pytest.skip does. Under strict mode -- $CI=true (CI sets it) or
$RESNET_FUSED_STRICT_TESTS=1 -- a component that should be there is a FAILURE naming the
reason, so a broken build, a stale extension or a missing pinned dependency cannot turn a green
run into a run of skips.

Under strict mode these still skip, and only these:
  * an explicit opt-out, the environment variables in OPT_OUTS (the extension turned off with
    $RESNET_FUSED_DISABLE_EXT=1 or not built with $RESNET_FUSED_NO_EXT=1; CPU-only extension
    kernels with $RESNET_FUSED_NO_CUDA=1; no ONNX stack with $RESNET_FUSED_NO_ONNX=1, as the
    compat venv has none);
  * no CUDA GPU (`no_gpu`, `needs_gpu`): GPU-only tests stay skips on a CPU machine.

Importable from tests/ and benchmarks/ as `components` (pyproject's pytest `pythonpath`).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import pytest
import torch

STRICT_ENV = "RESNET_FUSED_STRICT_TESTS"
_TRUE = ("1", "true", "yes", "on")

# component -> the environment variables that deliberately switch it off (each an opt-out that
# still skips under strict mode). A component not listed here has no opt-out.
OPT_OUTS = {
    "extension": ("RESNET_FUSED_DISABLE_EXT", "RESNET_FUSED_NO_EXT"),  # resnet_fused._C
    # the extension's CUDA kernels (a CUDA build of torch and a matching nvcc at build time)
    "cuda-kernels": ("RESNET_FUSED_NO_CUDA", "RESNET_FUSED_DISABLE_EXT", "RESNET_FUSED_NO_EXT"),
    "onnx": ("RESNET_FUSED_NO_ONNX",),  # onnx, onnxruntime, onnxscript
    "openvino": (),  # the bench's opt-in CPU reference provider (requirements.txt)
    "triton": (),
    "onednn": (),  # torch's private oneDNN fused-conv ops (the `onednn` backend)
    "gloo": (),  # torch.distributed with the gloo backend
}
# which component a backend needs (backends with no component: always available)
BACKEND_COMPONENT = {"onednn": "onednn", "triton": "triton", "cuda": "cuda-kernels",
                     "cudnn": "cuda-kernels"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def strict() -> bool:
    """True under CI ($CI=true) or $RESNET_FUSED_STRICT_TESTS=1: missing components fail."""
    return _flag("CI") or _flag(STRICT_ENV)


def opted_out(component: str) -> Optional[str]:
    """The environment variable that deliberately switched `component` off, or None."""
    if component not in OPT_OUTS:
        raise ValueError(f"unknown test component {component!r}; known: {', '.join(OPT_OUTS)}")
    return next((env for env in OPT_OUTS[component] if _flag(env)), None)


def require(component: str, reason: Optional[str]) -> None:
    """`component` is needed here; `reason` is None when it is present, else why it is not.
    Present: returns. Missing: pytest.skip -- or, under strict mode, pytest.fail unless an
    opt-out (OPT_OUTS) switched the component off."""
    env = opted_out(component)
    if reason is None:
        return
    if env is not None:
        pytest.skip(f"{component} switched off by ${env}: {reason}")
    if strict():
        outs = " or ".join(f"${e}=1" for e in OPT_OUTS[component])
        pytest.fail(f"{component} is missing: {reason} -- a failure, not a skip, in strict mode "
                    f"($CI=true or ${STRICT_ENV}=1)"
                    + (f"; to switch it off deliberately set {outs}" if outs else ""),
                    pytrace=False)
    pytest.skip(f"{component} unavailable: {reason}")


def importorskip(modname: str, component: str) -> ModuleType:
    """pytest.importorskip under the strict rule: the module, or require(component, ...)."""
    try:
        return importlib.import_module(modname)
    except ImportError as e:
        reason = f"importing {modname} failed: {type(e).__name__}: {e}"
    env = opted_out(component)
    if env is not None:
        pytest.skip(f"{component} switched off by ${env}: {reason}", allow_module_level=True)
    if strict():
        require(component, reason)  # fails (at module level: a collection error)
    pytest.skip(f"{component} unavailable: {reason}", allow_module_level=True)


def no_gpu(reason: str = "needs a CUDA GPU") -> None:
    """Skip when no CUDA GPU is visible -- a skip in strict mode too."""
    if not torch.cuda.is_available():
        pytest.skip(reason)


def backend(name: str, device) -> None:
    """The `resnet_fused` backend `name` must run on `device`. Skips (in strict mode too) where it
    cannot by design: a device without a GPU, CUDA-only backends on CPU tensors, Triton on CPU
    tensors outside the interpreter. Anything else missing goes through require()."""
    from resnet_fused import backends
    device = torch.device(device)
    if device.type == "cuda":
        no_gpu()
    reason = backends.unavailable_reason(name, device)
    if reason is None:
        return
    if ((name in ("cuda", "cudnn") and device.type != "cuda")
            or (name == "onednn" and device.type != "cpu")):
        pytest.skip(f"backend {name} does not run on {device.type} tensors: {reason}")
    if name == "triton" and device.type == "cpu" and not _flag("TRITON_INTERPRET"):
        pytest.skip(f"backend triton on CPU tensors needs TRITON_INTERPRET=1: {reason}")
    require(BACKEND_COMPONENT.get(name, name), f"backend {name} unavailable: {reason}")


# ---- marks: evaluated at set-up by tests/conftest.py's pytest_runtest_setup (run_marks) -----
def needs(component: str, reason: Optional[str]) -> pytest.MarkDecorator:
    """Mark: require(component, reason) before the test runs (reason None: present)."""
    return pytest.mark.requires(component, reason)


def needs_gpu(component: Optional[str] = None, reason=None) -> pytest.MarkDecorator:
    """Mark: skip without a CUDA GPU (strict mode too); with one, require(component, reason()).
    `reason` may be a callable, called only when a GPU is present."""
    return pytest.mark.requires(component, reason, gpu=True)


def run_marks(item) -> None:
    """Apply the `requires` marks of a test item (closest first)."""
    for mark in item.iter_markers("requires"):
        if mark.kwargs.get("gpu"):
            no_gpu()
        component, reason = mark.args
        if component is None:
            continue
        require(component, reason() if callable(reason) else reason)
