"""The `onednn` backend: CPU fp32 conv_bn_act as ONE oneDNN convolution with fused post-ops.

What is fused: oneDNN runs conv + bias, then (optionally) `+ residual` as a binary post-op, in one
primitive over channels_last activations and a weight prepacked once into oneDNN's blocked layout
(no per-call weight reorder). ReLU is an in-place pass over the output (`relu_`), not oneDNN's
eltwise post-op: every eltwise post-op tried (relu, leaky_relu(0), hardtanh(0, inf); fp32 and
bf16, torch 2.14) turns NaN into 0, where stock ReLU keeps it.

How the contract maps onto it (numerics):
    relu?(conv(x, W) * scale[c] + shift[c] + residual)
  = relu?(conv(x, W') + b[c] + residual)   with W' = W * scale[c] (per output channel), b = shift.
W' is computed once in fp32 (one rounding per weight element, relative error <= 2^-24), then
prepacked; the accumulation, the bias and the residual add are fp32 inside oneDNN. This
is exact algebra; only the placement of one rounding differs from the reference composition, which
is far below the conv's own accumulation error (tests/test_onednn.py checks it against the float64
reference with randomised BatchNorm under the numerics rule, docs/design.md).

Scope: CPU, float32, and bfloat16 where the CPU has native bf16 instructions (AVX512-BF16 or AMX;
`bf16_unavailable_reason`). bf16 is fp32's exponent range with 8 bits of mantissa, so the scale
folds into the weight as in fp32 (computed in fp32, ONE rounding to bf16 per element: the
rounding stock autocast makes of the unscaled weight anyway); the bias (shift) stays fp32 (on
residual chains oneDNN's add op wants it in x's dtype: one rounding of the shift), the
accumulation, bias and residual add are fp32 inside oneDNN and the output is rounded once. fp16
(whose range a folded scale could overflow) and fp64 are delegated to the stock `torch` backend
(docs/design.md).

The trade-off: the ops used are PyTorch's own oneDNN ops, which live in the private namespace
`torch.ops.mkldnn` (`_convolution_pointwise`, `_reorder_convolution_weight`; present with these
schemas from torch 2.0 through 2.14, used by Inductor's CPU freezing path). Their absence, a failure
of the basic self-check, or a wrong result in any self-check case (edge cases included: 1x1 outputs,
stride 2, groups > 1, each with and without residual) makes `unavailable_reason` say so, and `auto`
then picks the stock backend.

Per-shape fallback: some builds refuse particular problem shapes (torch 2.11: the residual-add
post-op raises "could not create a memory" when the output is 1x1 spatially; 2x2 works, 2.14 is
fine). Any RuntimeError from the private ops makes conv_bn_act compute that call with the stock
backend instead, remember the problem shape (`fallback_shapes()`) so it is not retried, and log one
warning per shape on the `resnet_fused` logger. Edge cases the self-check saw raise are listed by
`limitations()`.

Preparing: `prepare` folds scale into the weight once (fp32) and keeps the bias; the blocked
copy oneDNN wants depends on the input shape too, so it is made on the first call per geometry
and kept on the prepared object (at most _MAX_SHAPES of them), which lives in the fold cache.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops import channels_last_strides
from . import Prepared, prepare_default, stock

F32, BF16 = torch.float32, torch.bfloat16
_MAX_SHAPES = 4  # blocked weights kept per conv (one per input shape): older ones are dropped
_MAX_FAILED = 256  # problem shapes remembered as failing (oldest forgotten: retried, logged again)

logger = logging.getLogger("resnet_fused")


def _ops():
    """The two private oneDNN ops, or raise AttributeError/RuntimeError if this torch lacks them."""
    mkldnn = torch.ops.mkldnn
    return (mkldnn._convolution_pointwise.default, mkldnn._convolution_pointwise.binary,
            mkldnn._reorder_convolution_weight.default)


# The self-check's edge cases: (name, cin, cout, k, stride, padding, groups, input hw), each run
# with and without a residual. Chosen from shapes real models hit that some torch builds get wrong
# or refuse: torch 2.11's oneDNN raises "could not create a memory" for the residual (binary
# post-op) when the output is 1x1 spatially (resnet18/50 layer4 on 32x32 images), while 2x2 works.
_EDGE_CASES = (
    ("3x3 conv, 1x1 output", 8, 8, 3, 1, 1, 1, 1),
    ("1x1 conv, 1x1 output", 8, 16, 1, 1, 0, 1, 1),
    ("3x3 conv, stride 2", 8, 8, 3, 2, 1, 1, 5),
    ("3x3 conv, stride 2, 1x1 output", 8, 8, 3, 2, 1, 1, 2),
    ("1x1 conv, stride 2", 8, 16, 1, 2, 0, 1, 5),
    ("3x3 conv, groups 2", 8, 8, 3, 1, 1, 2, 5),
    ("3x3 conv, groups 2, 1x1 output", 8, 8, 3, 1, 1, 2, 1),
)

_limitations: List[str] = []  # edge cases the self-check saw raise (handled by the fallback)


def _probe_case(ops, g, cin, cout, k, stride, padding, groups, hw, residual, relu=True,
                dtype=torch.float32):
    """Run one fused conv in `dtype` (fp32 bias) and the fp32 composition of the same rounded
    operands; (got in fp32, want)."""
    act = torch.relu if relu else (lambda t: t)
    unary, binary, reorder = ops

    def rand(*shape):  # values representable in `dtype`, channels_last where 4-D
        t = torch.randn(*shape, generator=g).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    x, w, b = rand(1, cin, hw, hw), rand(cout, cin // groups, k, k), rand(cout).float()
    args = ([padding] * 2, [stride] * 2, [1, 1], groups)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x.float(), w.float(), b, stride, padding, 1, groups)
        packed = reorder(w, *args, list(x.shape))
        if not residual:
            return act(unary(x, packed, b, *args, "none", [], None)).float(), act(want)
        r = rand(*want.shape)
        got = binary(x, r, packed, b.to(dtype), *args, "add", None, None, [], None)
        return act(got).float(), act(want + r.float())


@functools.lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    """The self-check below, in plain fp32 whatever the caller's context (the first use may
    come under autocast, which would make the stock reference bf16 and the check fail)."""
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        return _self_check()


def _self_check() -> Optional[str]:
    """Run tiny fused convs once and compare them with stock; a reason string if unusable.

    The basic case (5x5, 3x3 conv, with and without residual and ReLU) must run and be right,
    else the backend is unavailable. The edge cases (_EDGE_CASES) must be right wherever they
    run: a wrong result makes the backend unavailable. An edge case whose private op raises
    RuntimeError does not: conv_bn_act falls back to the stock backend for exactly the problem
    shapes that raise, so the rest of the model keeps the fused path; such cases are listed by
    `limitations()` and logged once here.
    """
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn) support"
    try:
        ops = _ops()
    except (AttributeError, RuntimeError) as e:
        return (f"torch {torch.__version__} lacks the private oneDNN ops "
                f"torch.ops.mkldnn._convolution_pointwise / _reorder_convolution_weight ({e})")
    g = torch.Generator().manual_seed(0)

    def close(got, want):
        return (got.shape == want.shape and got.dtype == want.dtype
                and torch.allclose(got, want, rtol=1e-4, atol=1e-4))

    try:
        for residual, relu in ((True, True), (True, False), (False, True), (False, False)):
            if not close(*_probe_case(ops, g, 4, 8, 3, 1, 1, 1, 5, residual, relu, F32)):
                return "the oneDNN fused convolution gave wrong results in a self-check"
    except Exception as e:  # any failure of a private op means: do not use it
        return f"the oneDNN fused convolution failed a self-check: {type(e).__name__}: {e}"
    limitations = []
    for name, *case in _EDGE_CASES:
        for residual in (False, True):
            what = f"{name}, {'with' if residual else 'without'} residual"
            try:
                ok = close(*_probe_case(ops, g, *case, residual))
            except RuntimeError as e:  # a shape it refuses: the run-time fallback covers it
                limitations.append(f"{what}: {type(e).__name__}: {e}")
                continue
            except Exception as e:
                return (f"the oneDNN fused convolution failed a self-check ({what}): "
                        f"{type(e).__name__}: {e}")
            if not ok:
                return f"the oneDNN fused convolution gave wrong results in a self-check ({what})"
    _limitations[:] = limitations
    for text in limitations:
        logger.info("oneDNN backend (torch %s): self-check case %s; such problem shapes run on "
                    "the stock torch backend", torch.__version__, text)
    return None


@functools.lru_cache(maxsize=None)
def bf16_unavailable_reason() -> Optional[str]:
    """None when bf16 convs run fused here (native bf16 in the CPU and a right self-check),
    else why not (then bf16 chains run stock's path). Asked when a bf16 chain first resolves."""
    reason = _probe()
    if reason is not None:
        return reason
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # private: any failure means no
    except (AttributeError, RuntimeError) as e:
        return f"torch {torch.__version__} cannot say whether this CPU has native bf16 ({e})"
    if not native:
        return "this CPU has no native bf16 instructions (AVX512-BF16 or AMX)"
    g = torch.Generator().manual_seed(0)
    try:
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            for residual, relu in ((True, True), (False, False)):
                got, want = _probe_case(_ops(), g, 4, 8, 3, 1, 1, 1, 5, residual, relu, BF16)
                # fp32 accumulation, one rounding of the output (half a bf16 step, 2^-9
                # relative) plus the bias's: within one step
                if got.dtype != want.dtype or not torch.allclose(got, want, rtol=2 ** -7,
                                                                 atol=2 ** -7):
                    return "the oneDNN bf16 fused convolution gave wrong results in a self-check"
    except Exception as e:  # any failure of a private op means: do not use it
        return (f"the oneDNN bf16 fused convolution failed a self-check: "
                f"{type(e).__name__}: {e}")
    return None


def limitations() -> List[str]:
    """Self-check edge cases that this torch's oneDNN refuses (they run on the stock backend)."""
    _probe()
    return list(_limitations)


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    if device is not None and torch.device(device).type != "cpu":
        return "oneDNN fused convolutions run on CPU tensors only"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return _probe()


class Scaled(Prepared):
    """W * scale (computed in fp32, one rounding to the weight's dtype per element) and the fp32
    bias, plus its blocked copies per geometry (input shape, padding, stride, dilation, groups).
    `.weight/.scale/.shift` are the contract's tensors, for the stock fallback and graph paths."""
    __slots__ = ("scaled", "bias", "binary_bias", "blocked")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__(weight.contiguous(memory_format=torch.channels_last), scale, shift)
        with torch.no_grad():
            scaled = weight.detach().float() * scale.detach().float().view(-1, 1, 1, 1)
            self.scaled = scaled.to(weight.dtype).contiguous(memory_format=torch.channels_last)
        self.bias = shift.detach().contiguous()
        # the residual-add op wants the bias in x's dtype (bf16: one rounding of the shift)
        self.binary_bias = self.bias.to(weight.dtype)
        self.blocked: Dict[Tuple, torch.Tensor] = {}

    @staticmethod
    def geometry(x_shape, padding, stride, dilation, groups) -> Tuple:
        """What a blocked copy depends on besides the weight."""
        return (tuple(x_shape), tuple(padding), tuple(stride), tuple(dilation), groups)

    def blocked_weight(self, x_shape, padding, stride, dilation, groups) -> torch.Tensor:
        key = self.geometry(x_shape, padding, stride, dilation, groups)
        blocked = self.blocked.get(key)
        if blocked is None:
            with torch.no_grad():
                blocked = _ops()[2](self.scaled, padding, stride, dilation, groups, list(x_shape))
            if len(self.blocked) >= _MAX_SHAPES:
                self.blocked.pop(next(iter(self.blocked)))
            self.blocked[key] = blocked
        return blocked


def _runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs CPU convs of `dtype` here (else the stock backend does)."""
    return dtype == F32 or (dtype == BF16 and bf16_unavailable_reason() is None)


def prepare(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """A Scaled for what oneDNN runs (CPU fp32, bf16 where native); the default form for what
    goes to stock."""
    if weight.device.type != "cpu" or not _runs(weight.dtype):
        return prepare_default(weight, scale, shift)
    return Scaled(weight, scale, shift)


# Problem shapes whose oneDNN call raised: key -> the error, in insertion order. They go straight
# to the stock backend (no retry, no repeated log). Small: one entry per failing layer shape.
_failed: Dict[Tuple, str] = {}


def _problem_key(x, weight, residual, stride, padding, dilation, groups, relu) -> Tuple:
    return (tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
            groups, residual is not None, relu)


def _describe(key) -> str:
    x_shape, w_shape, stride, padding, dilation, groups, residual, relu = key
    return (f"x {list(x_shape)}, weight {list(w_shape)}, stride {list(stride)}, padding "
            f"{list(padding)}, dilation {list(dilation)}, groups {groups}, "
            f"residual {'yes' if residual else 'no'}, relu {'yes' if relu else 'no'}")


def _stock(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """The stock backend's result in this backend's output contract (fresh, channels_last)."""
    with torch.no_grad():
        out = stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                groups, relu)
    if out.stride() != channels_last_strides(out.shape) or out is x or out is residual:
        out = torch.empty(out.shape, dtype=out.dtype, device=out.device,
                          memory_format=torch.channels_last).copy_(out)
    return out


def _remember_failure(key, error: RuntimeError) -> None:
    text = f"{type(error).__name__}: {error}".strip()
    if key in _failed:
        return
    while len(_failed) >= _MAX_FAILED:
        _failed.pop(next(iter(_failed)))
    _failed[key] = text
    logger.warning("onednn backend: the oneDNN fused convolution (torch %s) failed "
                   "for the problem shape (%s) with %s; this shape now runs on the stock torch "
                   "backend (same results, unfused).", torch.__version__, _describe(key), text)


def accelerates(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU fp32, and bf16 where the CPU has it natively (benchmarks/RESULTS.md, "CPU bf16").
    Other dtypes would go to the stock composition, which is slower than stock's own module
    sequence (bf16 through it: 0.49x eager channels_last), so under `auto` those run stock's
    path."""
    return device.type == "cpu" and _runs(dtype)


def relu_(out: torch.Tensor) -> torch.Tensor:
    """In-place ReLU that keeps NaN, as torch.relu_ does. bf16 works on the bit patterns viewed
    as int16: torch's bf16 relu_ widens every element to fp32 and back (8x256x56x56 channels_last,
    2 threads: 1.2 ms, a quarter of a bf16 resnet50's time), the integer select takes 0.3 ms. The
    negative numbers, -0.0 and -inf are exactly the int16 values below -127 (sign bit set, not a
    NaN: negative NaNs are -127..-1), so threshold(bits, -128, 0) zeroes them and nothing else:
    every NaN keeps its bits, -0.0 becomes +0.0 (stock keeps -0.0: equal, tests/test_onednn.py
    checks all 65536 patterns)."""
    if out.dtype == BF16:
        torch.threshold_(out.view(torch.int16), -128, 0)
        return out
    return torch.relu_(out)


# Below this much work (N*H*W*C_in*C_out*KH*KW/groups: the multiply-adds at stride 1) the
# primitive's per-call set-up costs more than the conv (1x8x4x4, 8->8 3x3, one thread: 84 us
# against 9 us for stock's conv on the same folded weight), so such problems run as stock's conv
# with the folded weight and bias: the same fp32 algebra, no blocked weight.
_SMALL_WORK = 1 << 17


def _small(prepared, x, residual, stride, padding, dilation, groups, relu) -> torch.Tensor:
    out = torch.nn.functional.conv2d(x, prepared.scaled, prepared.bias, stride, padding,
                                     dilation, groups)
    if residual is not None:
        out.add_(residual)
    return relu_(out) if relu else out  # (ops.run makes the layout the contract's)


def run(prepared, x: torch.Tensor, residual: Optional[torch.Tensor], stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    weight, scale, shift = prepared.weight, prepared.scale, prepared.shift
    if (not isinstance(prepared, Scaled) or x.device.type != "cpu"
            or x.dtype != prepared.scaled.dtype):
        return stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, relu)
    # oneDNN's output takes the input's layout; the op contract's output is channels_last.
    x = x.contiguous(memory_format=torch.channels_last)
    c_out, _, kh, kw = weight.shape
    if x.numel() * c_out * kh * kw // groups < _SMALL_WORK:  # multiply-adds x stride^2
        if x.dtype != F32:  # (the fp32 bias cannot go to a bf16 F.conv2d)
            return stock.conv_bn_act(x, weight, scale, shift, residual, stride, padding,
                                     dilation, groups, relu)
        return _small(prepared, x, residual, stride, padding, dilation, groups, relu)
    if _failed:  # known to fail in this torch's oneDNN: don't retry
        key = _problem_key(x, weight, residual, stride, padding, dilation, groups, relu)
        if key in _failed:
            return _stock(x, weight, scale, shift, residual, stride, padding, dilation, groups,
                          relu)
    try:
        if torch.is_grad_enabled():  # (the private ops have no autograd formula)
            with torch.no_grad():
                out = _fused(prepared, x, residual, stride, padding, dilation, groups)
        else:
            out = _fused(prepared, x, residual, stride, padding, dilation, groups)
    except RuntimeError as e:  # e.g. torch 2.11: "could not create a memory" for 1x1 outputs
        # a failed geometry's copy would only evict good ones
        prepared.blocked.pop(Scaled.geometry(x.shape, padding, stride, dilation, groups), None)
        _remember_failure(_problem_key(x, weight, residual, stride, padding, dilation, groups,
                                       relu), e)
        return _stock(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    # Not oneDNN's relu post-op: it turns NaN into 0 (every eltwise post-op we tried does);
    # relu_ keeps NaN, as stock, for one more pass over the output.
    return relu_(out) if relu else out


def _fused(prepared, x, residual, stride, padding, dilation, groups) -> torch.Tensor:
    """conv + bias (+ residual) as one oneDNN primitive on the blocked weight."""
    blocked = prepared.blocked_weight(x.shape, padding, stride, dilation, groups)
    unary, binary, _ = _ops()
    if residual is None:
        return unary(x, blocked, prepared.bias, padding, stride, dilation, groups, "none", [],
                     None)
    residual = residual.contiguous(memory_format=torch.channels_last)  # the output's
    return binary(x, residual, blocked, prepared.binary_bias, padding, stride, dilation, groups,
                  "add", None, None, [], None)


def fallback_shapes() -> Dict[Tuple, str]:
    """Problem shapes that run on the stock backend after a oneDNN failure, with the error."""
    return dict(_failed)


__all__: List[str] = ["unavailable_reason", "bf16_unavailable_reason", "prepare", "run",
                       "accelerates", "limitations", "fallback_shapes"]
