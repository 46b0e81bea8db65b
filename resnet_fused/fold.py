"""BatchNorm folding and the one weight cache.

fold(conv, bn, dtype, backend) -> the backend's prepared form (backends.Prepared or its own,
exposing .weight/.scale/.shift) of: the conv weight in `dtype`, and BN (eval statistics) with
the conv bias as a per-output-channel scale/shift in the epilogue dtype (fp32; fp64 for fp64).
`cached(...)` is the same from the raw tensors, for graphs that hold tensors, not modules
(layers.conv_bn_eval, conv_bn_eval_nograd: torch.compile, fx, jit.trace, torch.export).

The cache is never stale. An entry is keyed by the conv weight tensor (its id; removed when that
tensor is freed) and remembers, for each tensor the fold reads, its id, data pointer and version
counter, plus the plain numbers (bn.eps): an optimizer step, load_state_dict, .to()/.half(), a
training forward (num_batches_tracked), a swapped parameter or `bn.eps = ...` changes one of
them. It holds detached aliases of those tensors, so their memory cannot be reused by another
tensor while the entry lives. The cache is not in the state_dict, and deepcopy/pickle of a model
never carry it.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from . import backends
from .ops import epilogue_dtype

Sources = Tuple[Optional[torch.Tensor], ...]


def foldable(bn: nn.Module, tensors: Sources) -> bool:
    """A norm layer that is an affine per-channel map in eval: BatchNorm with running stats
    (incl. SyncBatchNorm) or torchvision's FrozenBatchNorm2d. `tensors`: its chain's
    `sources`."""
    return (tensors[4] is not None and tensors[5] is not None
            and isinstance(getattr(bn, "eps", None), float))


def _tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """module.<name> for a parameter or buffer, without nn.Module.__getattr__'s cost."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name, None)


def sources(conv: nn.Conv2d, bn: nn.Module) -> Sources:
    """The tensors a fold reads, in `cached`'s order. num_batches_tracked: stock BatchNorm's
    kernels update running_mean/var in place without bumping their version counters, but every
    training forward increments this counter."""
    return (_tensor(conv, "weight"), _tensor(conv, "bias"), _tensor(bn, "weight"),
            _tensor(bn, "bias"), _tensor(bn, "running_mean"), _tensor(bn, "running_var"),
            _tensor(bn, "num_batches_tracked"))


def bn_affine(conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
              running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
              acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, center) in `acc` with bn(conv(x) + conv_bias) = (conv(x) - center) * scale +
    bn.bias: the one formula of the fold cache (the extension's bn_eval_fold is its C++ twin)."""
    inv_std = torch.rsqrt(running_var.to(acc) + eps)
    scale = inv_std if bn_weight is None else bn_weight.to(acc) * inv_std
    center = running_mean.to(acc)
    if conv_bias is not None:
        center = center - conv_bias.to(acc)
    return scale, center


def scale_shift(conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                running_var: torch.Tensor, eps: float,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN (+ conv bias) as scale/shift, computed in the epilogue dtype of `dtype` (what the
    cache and graphs that need gradients both use)."""
    acc = epilogue_dtype(dtype)
    scale, center = bn_affine(conv_bias, bn_weight, running_mean, running_var, eps, acc)
    shift = -center * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    return scale, shift


def fold_scale_shift(conv: nn.Conv2d, bn: nn.Module,
                     dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN (+ conv bias) of these modules as scale/shift for activations of `dtype`."""
    return scale_shift(conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                       dtype)


def needs_grad(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether autograd records a fold of these tensors now (a chain's `sources`, or a whole
    model's parameters)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _stamp(tensors: Sources) -> Tuple:
    return tuple([None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors])


class _Entry:
    __slots__ = ("pins", "stamp", "eps", "prepared")

    def __init__(self, tensors: Sources, eps: float, prepared: Any):
        self.pins = tuple(None if t is None else t.detach() for t in tensors)  # pin the memory
        self.stamp = _stamp(tensors)
        self.eps = eps
        self.prepared = prepared


# id(conv weight) -> {(device, dtype, backend, inference mode): _Entry}; an entry goes when its
# weight tensor is freed (weakref callback), so an id is never reused while it is here.
_cache: Dict[int, Dict[tuple, _Entry]] = {}


def _entries(weight: torch.Tensor) -> Dict[tuple, _Entry]:
    key = id(weight)
    entries = _cache.get(key)
    if entries is None:
        entries = _cache[key] = {}
        weakref.finalize(weight, _cache.pop, key, None)
    return entries


def build(dtype: torch.dtype, tensors: Sources, eps: float) -> backends.Prepared:
    """(weight in `dtype`, scale, shift), uncached and unprepared: differentiable when the
    tensors require grad (the op prepares per call then)."""
    weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, _ = tensors
    scale, shift = scale_shift(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                               dtype)
    return backends.Prepared(weight.to(dtype), scale, shift)


def cached(backend: str, dtype: torch.dtype, tensors: Sources, eps: float) -> Any:
    """The prepared form for activations of `dtype` on the weight's device: from the cache when
    fresh, else built (without autograd) and remembered."""
    weight = tensors[0]
    # Tensors made under inference_mode cannot be saved for backward later: keep them apart.
    key = (weight.device, dtype, backend, torch.is_inference_mode_enabled())
    entries = _entries(weight)
    entry = entries.get(key)
    if entry is None or entry.eps != eps or entry.stamp != _stamp(tensors):
        with torch.no_grad():
            weight, scale, shift = build(dtype, tensors, eps)
            # detach: .to()/.contiguous() may return the Parameter itself (a 1x1 conv's weight
            # is already channels_last), which the plain-eager fast path does not take
            prepared = backends.prepare(backend, weight.detach(), scale, shift)
        entry = entries[key] = _Entry(tensors, eps, prepared)
        backends.logger.debug("fold cache: built %s weight %s for %s", backend,
                              tuple(weight.shape), dtype)
    return entry.prepared


def fold(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype, backend: str) -> Any:
    """Folded conv+BN for activations of `dtype`, prepared for `backend`: cached, unless
    autograd must record the fold (then built in the graph, unprepared)."""
    return prepared(backend, dtype, sources(conv, bn), bn.eps)


def prepared(backend: str, dtype: torch.dtype, tensors: Sources, eps: float) -> Any:
    """`fold` from the tensors a chain already holds (`sources`)."""
    if needs_grad(tensors):
        return build(dtype, tensors, eps)
    return cached(backend, dtype, tensors, eps)


def entries_for(module: nn.Module) -> Dict[tuple, Any]:
    """The cache's prepared forms for `module`'s weight (what a captured CUDA graph reads)."""
    weight = _tensor(module, "weight")
    if not isinstance(weight, torch.Tensor):
        return {}
    return {k: e.prepared for k, e in _cache.get(id(weight), {}).items()}


def clear_cache() -> None:
    """Drop every prepared weight (they are rebuilt on the next call; never needed for
    correctness: the cache is never stale)."""
    for entries in list(_cache.values()):
        entries.clear()
