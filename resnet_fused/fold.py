"""BatchNorm folding and the one fold cache.

fold(conv, bn, dtype, backend) -> (weight, scale, shift): the conv weight in `dtype`, packed for
`backend`, and BN (eval statistics) as a per-output-channel fp32 scale/shift (fp64 for fp64).

The cache is never stale: an entry remembers the exact tensors it was built from (it holds a
detached alias, so their memory cannot be reused by another tensor) and their version counters,
and the plain numbers the fold reads (bn.eps); an optimizer step, load_state_dict, .to()/.half(),
a training forward (num_batches_tracked), a module swap or `bn.eps = ...` changes one of them.
The cache lives here, in a weak dict keyed by the conv module, so it is not in the state_dict,
and deepcopy/pickle of a model never carry it.
"""
from __future__ import annotations

import weakref
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import backends
from .ops import epilogue_dtype


class Folded(NamedTuple):
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def foldable(bn: nn.Module) -> bool:
    """A norm layer that is an affine per-channel map in eval: BatchNorm with running stats
    (incl. SyncBatchNorm) or torchvision's FrozenBatchNorm2d."""
    return (getattr(bn, "running_mean", None) is not None
            and getattr(bn, "running_var", None) is not None
            and isinstance(getattr(bn, "eps", None), float))


def _sources(conv: nn.Conv2d, bn: nn.Module) -> Tuple[Optional[torch.Tensor], ...]:
    # num_batches_tracked: stock BatchNorm's kernels update running_mean/var in place without
    # bumping their version counters, but every training forward increments this counter.
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            getattr(bn, "num_batches_tracked", None))


def scale_shift(conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                running_var: torch.Tensor, eps: float,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN (+ conv bias) as scale/shift, computed in the epilogue dtype of `dtype` (the one
    formula: the fold cache and traced graphs both use it)."""
    acc = epilogue_dtype(dtype)
    inv_std = torch.rsqrt(running_var.to(acc) + eps)
    scale = inv_std if bn_weight is None else bn_weight.to(acc) * inv_std
    bias = -running_mean.to(acc)
    if conv_bias is not None:
        bias = bias + conv_bias.to(acc)
    shift = bias * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    return scale, shift


def fold_scale_shift(conv: nn.Conv2d, bn: nn.Module,
                     dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN (+ conv bias) of these modules as scale/shift for activations of `dtype`."""
    return scale_shift(conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                       dtype)


def _numbers(bn: nn.Module) -> Tuple[float, ...]:
    """The non-tensor inputs of the fold (compared by value)."""
    return (bn.eps,)


class _Entry(NamedTuple):
    sources: Tuple[Optional[torch.Tensor], ...]  # detached aliases: pin the memory
    versions: Tuple[int, ...]
    numbers: Tuple[float, ...]
    folded: Folded

    def fresh(self, current: Tuple[Optional[torch.Tensor], ...],
              numbers: Tuple[float, ...]) -> bool:
        if numbers != self.numbers:
            return False
        for old, new, version in zip(self.sources, current, self.versions):
            if old is None or new is None:
                if old is not new:
                    return False
            elif new.data_ptr() != old.data_ptr() or new._version != version or \
                    new.dtype != old.dtype or new.shape != old.shape:
                return False
        return True


_cache: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()


def _build(conv, bn, dtype, backend, pack: bool) -> Folded:
    scale, shift = fold_scale_shift(conv, bn, dtype)
    weight = conv.weight.to(dtype)
    if pack:  # packing may detach (a backend's private layout); backends read any strides
        weight = backends.pack_weight(backend, weight)
    return Folded(weight, scale, shift)


def fold(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype, backend: str) -> Folded:
    """Folded conv+BN for activations of `dtype` on the conv's device, cached when possible."""
    sources = _sources(conv, bn)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in sources)
    if needs_grad or torch.compiler.is_compiling():
        return _build(conv, bn, dtype, backend, pack=False)  # part of the autograd/traced graph
    # Tensors made under inference_mode cannot be saved for backward later: keep them apart.
    key = (conv.weight.device, dtype, backend, torch.is_inference_mode_enabled())
    entries = _cache.setdefault(conv, {})
    entry = entries.get(key)
    numbers = _numbers(bn)
    if entry is None or not entry.fresh(sources, numbers):
        with torch.no_grad():
            folded = _build(conv, bn, dtype, backend, pack=True)
        entry = _Entry(tuple(None if t is None else t.detach() for t in sources),
                       tuple(0 if t is None else t._version for t in sources), numbers, folded)
        entries[key] = entry
    return entry.folded


def clear_cache() -> None:
    _cache.clear()
