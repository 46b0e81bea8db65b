"""The compiled extension `resnet_fused._C` (csrc/): lazy, safe loading, and the Python halves
of its ops -- fake kernels (torch.compile, torch.export) and autograd formulas.

Ops (schemas in csrc/resnet_fused.cpp):
  resnet_fused::bn_act_train(x, weight?, bias?, residual?, running_mean?, running_var?,
                             momentum, eps, relu) -> (out, save_mean, save_invstd,
                                                      new_running_mean, new_running_var)
      training-mode BatchNorm2d (+ residual) (+ ReLU) in one op; functional: the caller copies
      new_running_* into its buffers (see batch_norm_act).
  resnet_fused::bn_act_train_backward(...)  its backward (grad x, weight, bias, residual)
  resnet_fused::scale_shift_act(x, scale, shift, residual?, relu) -> relu?(x*scale+shift+res)

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
from typing import Optional, Tuple

import torch
from torch import nn

DISABLE_ENV = "RESNET_FUSED_DISABLE_EXT"
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
    _register_python_parts()
    return module, None


def load() -> Optional[ModuleType]:
    """The loaded `resnet_fused._C` module, or None (see unavailable_reason())."""
    global _loaded, _module, _reason
    if not _loaded:
        with _lock:
            if not _loaded:
                _module, _reason = _load()
                _loaded = True
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
    if module.with_cuda:
        kernels = (f"CPU + CUDA kernels for {', '.join(built_archs()) or '?'} "
                   f"(nvcc {module.cuda_version or '?'})")
    else:
        kernels = "CPU kernels only (no CUDA)"
    return f"built: {kernels}; torch {module.torch_version}; {_path}"


def _require(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"resnet_fused extension unavailable for {device.type} tensors: "
                           f"{reason}")


# ---- op wrappers -----------------------------------------------------------------------------
def bn_act_train(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                 running_var: Optional[torch.Tensor], momentum: float, eps: float,
                 relu: bool) -> Tuple[torch.Tensor, ...]:
    """(out, save_mean, save_invstd, new_running_mean, new_running_var); see the module doc."""
    _require(x.device)
    return torch.ops.resnet_fused.bn_act_train(x, weight, bias, residual, running_mean,
                                               running_var, float(momentum), float(eps),
                                               bool(relu))


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """relu?(x * scale[c] + shift[c] + residual) in one pass; scale/shift fp32 (fp64 for fp64)."""
    _require(x.device)
    return torch.ops.resnet_fused.scale_shift_act(x, scale, shift, residual, bool(relu))


_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def bn_act_supported(bn: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """True when relu?(bn(x) + residual) can run as one bn_act_train with torch's exact
    semantics: a plain nn.BatchNorm2d in training mode without hooks (subclasses such as
    SyncBatchNorm, and anything else, keep the stock path), a 4-D float x with more than one
    value per channel, a residual like x, and the extension built for x's device."""
    if type(bn) is not nn.BatchNorm2d or not bn.training:
        return False
    if bn._forward_hooks or bn._forward_pre_hooks:  # bypassing bn() would skip them
        return False
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _ACTIVATION_DTYPES:
        return False
    if x.shape[1] != bn.num_features or x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        return False
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False
    track = bn.track_running_stats
    if track and (bn.running_mean is None) != (bn.running_var is None):
        return False
    reduced = x.dtype in (torch.float16, torch.bfloat16)
    dtypes = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean if track else None,
                                bn.running_var if track else None) if t is not None}
    if len(dtypes) > 1 or (dtypes and not (dtypes == {x.dtype}
                                           or (reduced and dtypes == {torch.float32}))):
        return False
    return unavailable_reason(x.device) is None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels use for x (and write their outputs in): NCHW when x is
    contiguous (also when it is both), else channels_last."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                   relu: bool = True) -> torch.Tensor:
    """relu?(bn(x) + residual) for a training-mode nn.BatchNorm2d, as torch's _BatchNorm.forward
    does it (num_batches_tracked, momentum=None as a cumulative average), in one fused op.
    Call only where bn_act_supported(bn, x, residual)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    running_mean = bn.running_mean if bn.track_running_stats else None
    running_var = bn.running_var if bn.track_running_stats else None
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=_memory_format(x))
    out, _, _, new_mean, new_var = bn_act_train(x, bn.weight, bn.bias, residual, running_mean,
                                                running_var, factor, bn.eps, relu)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out


# ---- fake kernels and autograd (registered once, when the library loads) --------------------
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_bn_act_train(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                       relu):
    fmt, acc, c = _memory_format(x), _acc_dtype(x), x.shape[1]
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    pdtype = params[0].dtype if params else acc
    n_running = c if running_mean is not None else 0
    return (torch.empty_like(x, memory_format=fmt), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc), x.new_empty((n_running,), dtype=pdtype),
            x.new_empty((n_running,), dtype=pdtype))


def _fake_bn_act_train_backward(grad_out, x, weight, out, save_mean, save_invstd, relu,
                                grad_residual):
    fmt, acc, c = _memory_format(x), _acc_dtype(x), x.shape[1]
    grad_res = (torch.empty_like(x, memory_format=fmt) if relu and grad_residual
                else x.new_empty((0,)))
    return (torch.empty_like(x, memory_format=fmt), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc), grad_res)


def _fake_scale_shift_act(x, scale, shift, residual, relu):
    return torch.empty_like(x, memory_format=_memory_format(x))


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, momentum, eps, relu = inputs
    out, save_mean, save_invstd, new_mean, new_var = output
    ctx.relu = relu
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(save_mean, save_invstd, new_mean, new_var)
    # x (BN's input) and the per-channel stats; the ReLU mask comes from `out`, which the next
    # layer saves anyway. Nothing else is kept: x_hat and the mask are recomputed.
    ctx.save_for_backward(x, weight, out if relu else None, save_mean, save_invstd)


def _bn_backward(ctx, grad_out, *unused):
    x, weight, out, save_mean, save_invstd = ctx.saved_tensors
    need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
    nothing = (None,) * 9
    if grad_out is None or not (need_x or need_w or need_b or need_res):
        return nothing
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x, grad_w, grad_b, grad_res = torch.ops.resnet_fused.bn_act_train_backward(
        grad_out, x, weight, out, save_mean, save_invstd, ctx.relu, bool(ctx.relu and need_res))
    w_dtype, b_dtype = ctx.param_dtypes
    return (grad_x if need_x else None,
            grad_w.to(w_dtype) if need_w and w_dtype is not None else None,
            grad_b.to(b_dtype) if need_b and b_dtype is not None else None,
            (grad_res if ctx.relu else grad_out) if need_res else None,
            None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("resnet_fused: double backward through bn_act_train is not supported; "
                       f"set ${DISABLE_ENV}=1 to train with stock BatchNorm where higher-order "
                       "gradients are needed")


def _ssa_setup_context(ctx, inputs, output):
    x, scale, shift, residual, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, scale, output if relu else None)


def _ssa_backward(ctx, grad):
    x, scale, out = ctx.saved_tensors
    need_x, need_scale, need_shift, need_res = ctx.needs_input_grad[:4]
    g = grad.to(scale.dtype)
    if ctx.relu:
        g = torch.where(out <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
    return (
        (g * scale.view(1, -1, 1, 1)).to(x.dtype) if need_x else None,
        (g * x.to(g.dtype)).sum((0, 2, 3)) if need_scale else None,
        g.sum((0, 2, 3)) if need_shift else None,
        g.to(x.dtype) if need_res else None,
        None,
    )


_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    lib = torch.library
    lib.register_fake("resnet_fused::bn_act_train", _fake_bn_act_train)
    lib.register_fake("resnet_fused::bn_act_train_backward", _fake_bn_act_train_backward)
    lib.register_fake("resnet_fused::scale_shift_act", _fake_scale_shift_act)
    lib.register_autograd("resnet_fused::bn_act_train", _bn_backward,
                          setup_context=_bn_setup_context)
    lib.register_autograd("resnet_fused::bn_act_train_backward", _no_double_backward)
    lib.register_autograd("resnet_fused::scale_shift_act", _ssa_backward,
                          setup_context=_ssa_setup_context)
    _registered = True
