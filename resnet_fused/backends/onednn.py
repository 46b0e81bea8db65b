"""The `onednn` backend: CPU fp32 conv_bn_act as ONE oneDNN convolution with fused post-ops.

What is fused: oneDNN runs conv + bias, then (optionally) `+ residual` as a binary post-op, then
(optionally) ReLU as an eltwise post-op, in one primitive over channels_last activations and a
weight prepacked once into oneDNN's blocked layout (no per-call weight reorder).

How the contract maps onto it (numerics):
    relu?(conv(x, W) * scale[c] + shift[c] + residual)
  = relu?(conv(x, W') + b[c] + residual)   with W' = W * scale[c] (per output channel), b = shift.
W' is computed once in fp32 (one rounding per weight element, relative error <= 2^-24), then
prepacked; the accumulation, the bias, the residual add and the ReLU are fp32 inside oneDNN. This
is exact algebra; only the placement of one rounding differs from the reference composition, which
is far below the conv's own accumulation error (tests/test_onednn.py checks it against the float64
reference with randomised BatchNorm under DESIGN.md's rule).

Scope: CPU, float32. Other dtypes (fp64, bf16, fp16) are delegated to the stock `torch` backend, so
that scale is never folded into a low-precision weight and fp64 stays fp64 (DESIGN.md).

The trade-off: the ops used are PyTorch's own oneDNN ops, which live in the private namespace
`torch.ops.mkldnn` (`_convolution_pointwise`, `_reorder_convolution_weight`; present with these
schemas from torch 2.0 through 2.14, used by Inductor's CPU freezing path). Their absence or failure
makes `unavailable_reason` say so, and `auto` then picks the stock backend.

Caching: the fold cache calls `pack_weight` once per (conv, dtype, backend) and keeps the result
until a parameter/buffer changes. Folding `scale` into the weight needs the scale, which the pack
hook does not receive, so the scaled + blocked weight is memoised here, keyed on the identity of the
packed weight the fold cache holds (a weak-identity dictionary: the memo dies with the fold-cache
entry) and checked against the identity and version counters of weight/scale/shift, so it is never
stale. Tensors that the caller passes directly (not from the fold cache) work too; inference-mode
tensors that did not come from `pack_weight` cannot be version-checked and are re-folded per call.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import stock

_MAX_SHAPES = 4  # blocked weights kept per conv (one per input shape): older ones are dropped


def _ops():
    """The two private oneDNN ops, or raise AttributeError/RuntimeError if this torch lacks them."""
    mkldnn = torch.ops.mkldnn
    return (mkldnn._convolution_pointwise.default, mkldnn._convolution_pointwise.binary,
            mkldnn._reorder_convolution_weight.default)


@functools.lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    """Run a tiny fused conv once and compare it with stock; a reason string if anything fails."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn) support"
    try:
        unary, binary, reorder = _ops()
    except (AttributeError, RuntimeError) as e:
        return (f"torch {torch.__version__} lacks the private oneDNN ops "
                f"torch.ops.mkldnn._convolution_pointwise / _reorder_convolution_weight ({e})")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 4, 3, 3, generator=g)
        b = torch.randn(8, generator=g)
        r = torch.randn(1, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        args = ([1, 1], [1, 1], [1, 1], 1)
        with torch.no_grad():
            packed = reorder(w, *args, list(x.shape))
            got = binary(x, r, packed, b, *args, "add", None, "relu", [], None)
            want = torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 1) + r)
            got1 = unary(x, packed, b, *args, "none", [], None)
            want1 = torch.nn.functional.conv2d(x, w, b, 1, 1)
        if not (torch.allclose(got, want, rtol=1e-4, atol=1e-4)
                and torch.allclose(got1, want1, rtol=1e-4, atol=1e-4)):
            return "the oneDNN fused convolution gave wrong results in a self-check"
    except Exception as e:  # any failure of a private op means: do not use it
        return f"the oneDNN fused convolution failed a self-check: {type(e).__name__}: {e}"
    return None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    if device is not None and torch.device(device).type != "cpu":
        return "oneDNN fused convolutions run on CPU tensors only"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return _probe()


# Weights made by pack_weight: owned by the fold cache, never written in place, so they are safe
# memo keys even as inference tensors (which have no version counter).
_owned: WeakIdKeyDictionary = WeakIdKeyDictionary()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The fold cache's copy of the weight (channels_last, dense). The blocked oneDNN layout needs
    BN's scale folded in first, so it is made on the first conv_bn_act call (see _Prepared)."""
    packed = weight.detach().clone(memory_format=torch.channels_last)
    _owned[packed] = True
    return packed


def _version(t: torch.Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


class _Prepared:
    """W * scale in oneDNN's blocked layout (per input shape and conv geometry) and the bias,
    for one weight."""
    __slots__ = ("scale", "shift", "versions", "bias", "blocked")

    def __init__(self, weight, scale, shift):
        self.scale, self.shift = scale, shift  # strong refs: identity must not be recycled
        self.versions = (_version(weight), _version(scale), _version(shift))
        self.bias = shift.detach().contiguous()
        self.blocked: Dict[Tuple[int, ...], torch.Tensor] = {}

    def fresh(self, weight, scale, shift) -> bool:
        return (scale is self.scale and shift is self.shift
                and self.versions == (_version(weight), _version(scale), _version(shift)))


_memo: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _blocked_weight(weight, scale, shift, x_shape, padding, stride, dilation, groups):
    """(blocked W*scale, bias) for this call, memoised when the tensors can be version-checked."""
    trusted = weight in _owned or not any(t.is_inference() for t in (weight, scale, shift))
    entry = _memo.get(weight) if trusted else None
    if entry is None or not entry.fresh(weight, scale, shift):
        entry = _Prepared(weight, scale, shift)
        if trusted:
            _memo[weight] = entry
    # The blocked layout depends on the conv's geometry (groups change the weight's meaning).
    key = (tuple(x_shape), tuple(padding), tuple(stride), tuple(dilation), groups)
    blocked = entry.blocked.get(key)
    if blocked is None:
        with torch.no_grad():
            scaled = weight.detach() * scale.detach().view(-1, 1, 1, 1)  # fp32, one rounding
            blocked = _ops()[2](scaled, padding, stride, dilation, groups, list(x_shape))
        if len(entry.blocked) >= _MAX_SHAPES:
            entry.blocked.pop(next(iter(entry.blocked)))
        entry.blocked[key] = blocked
    return blocked, entry.bias


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, relu)
    # oneDNN's output takes the input's layout; the op contract's output is channels_last.
    x = x.contiguous(memory_format=torch.channels_last)
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    blocked, bias = _blocked_weight(weight, scale, shift, x.shape, padding, stride, dilation,
                                    groups)
    unary, binary, _ = _ops()
    with torch.no_grad():
        if residual is None:
            return unary(x, blocked, bias, padding, stride, dilation, groups,
                         "relu" if relu else "none", [], None)
        residual = residual.contiguous(memory_format=torch.channels_last)  # the output's
        return binary(x, residual, blocked, bias, padding, stride, dilation, groups, "add", None,
                      "relu" if relu else None, [], None)


def cached_weights() -> int:
    """How many weights have a memoised blocked copy (for tests and diagnostics)."""
    return len(_memo)


__all__: List[str] = ["unavailable_reason", "pack_weight", "conv_bn_act"]
