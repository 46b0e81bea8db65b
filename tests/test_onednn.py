"""The `onednn` CPU backend: parity with the float64 reference, layouts, delegation, never stale."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import backends
from resnet_fused import fold
from resnet_fused.backends import onednn
from resnet_fused.fold import fold_scale_shift
from resnet_fused.ops import channels_last_strides, conv_bn_act

import components
from numerics import (BUILDER_PARAMS, assert_within_rule, conv_bn_act_ref, max_err,
                      randomize_bn, stock_outputs)

CPU = torch.device("cpu")
REASON = backends.unavailable_reason("onednn", CPU)
# torch's private oneDNN ops broken: skipped locally, a failure under strict mode (CI).
needs_onednn = components.needs("onednn", REASON)


@pytest.fixture(autouse=True)
def primitive_for_every_size(monkeypatch):
    """These tests use small shapes: run them on the oneDNN primitive, not the small-problem
    path (which test_small_problems_run_stock_conv_on_the_folded_weight covers)."""
    monkeypatch.setattr(onednn, "_SMALL_WORK", 0)


@pytest.fixture(autouse=True)
def _threads(request):
    """One intra-op thread for the small cases (fast on a shared machine); the model test runs on
    two so that oneDNN's multi-threaded kernels are covered too."""
    n = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.name.startswith("test_model_parity") else 1)
    yield
    torch.set_num_threads(n)


def _case(cin, cout, k, stride, padding, dilation, groups, hw, n=2, seed=0):
    """A conv + randomised BN, folded to scale/shift in fp32."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(cout), seed=seed).eval()
    with torch.no_grad():
        scale, shift = fold_scale_shift(conv, bn, torch.float32)
    x = torch.randn(n, cin, *hw)
    return conv, bn, x, scale, shift


SHAPES = [  # cin, cout, k, stride, padding, dilation, groups, (h, w)
    (3, 64, 7, 2, 3, 1, 1, (29, 31)),      # stem-like, odd sizes
    (64, 64, 1, 1, 0, 1, 1, (14, 14)),     # bottleneck 1x1
    (64, 64, 3, 1, 1, 1, 1, (13, 9)),      # 3x3
    (32, 48, 3, 2, 1, 1, 1, (15, 16)),     # strided 3x3
    (64, 128, 1, 2, 0, 1, 1, (9, 9)),      # downsample 1x1 stride 2
    (32, 32, 3, 1, 2, 2, 4, (11, 12)),     # grouped + dilated
    (17, 5, 3, 1, 0, 1, 1, (6, 7)),        # odd channel counts, no padding
]


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_reference(shape, residual, relu):
    cin, cout, k, s, p, d, g, hw = shape
    conv, bn, x, scale, shift = _case(cin, cout, k, s, p, d, g, hw)
    x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(stride=s, padding=p, dilation=d, groups=g, relu=relu)
    res = None
    if residual:
        oh = (hw[0] + 2 * p - d * (k - 1) - 1) // s + 1
        ow = (hw[1] + 2 * p - d * (k - 1) - 1) // s + 1
        res = torch.randn(x.shape[0], cout, oh, ow).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        w = conv.weight.contiguous(memory_format=torch.channels_last)
        with resnet_fused.backend("onednn"):
            got = conv_bn_act(x, w, scale, shift, residual=res, **kw)
        with resnet_fused.backend("torch"):
            stock = conv_bn_act(x, conv.weight, scale, shift, residual=res, **kw)
    ref = conv_bn_act_ref(x, conv.weight, scale, shift, residual=res, **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_within_rule(got, stock, ref, torch.float32)


@needs_onednn
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("res_layout", ["nchw", "channels_last"])
def test_layouts(x_layout, res_layout):
    conv, bn, x, scale, shift = _case(16, 24, 3, 1, 1, 1, 1, (10, 11))
    if x_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif x_layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]  # non-contiguous view
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 24, 10, 11)
    if res_layout == "channels_last":
        res = res.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), resnet_fused.backend("onednn"):
        got = conv_bn_act(x, conv.weight, scale, shift, residual=res, padding=1)
    ref = conv_bn_act_ref(x, conv.weight, scale, shift, residual=res, padding=1)
    with torch.no_grad(), resnet_fused.backend("torch"):
        stock = conv_bn_act(x, conv.weight, scale, shift, residual=res, padding=1)
    assert_within_rule(got, stock, ref, torch.float32)
    assert got.data_ptr() not in (x.data_ptr(), res.data_ptr())
    # the backend itself returns the contract's layout (no copy needed in ops.py)
    with torch.no_grad():
        raw = onednn.run(onednn.prepare(conv.weight, scale, shift), x, res, [1, 1], [1, 1],
                         [1, 1], 1, True)
    assert raw.stride() == channels_last_strides(raw.shape)


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_NATIVE = _native_bf16() and REASON is None and onednn.bf16_unavailable_reason() is None
# bf16 runs fused on CPUs with native bf16: one without skips (strict mode too: hardware, not a
# defect); a failing bf16 self-check on one with it fails in strict mode.
needs_bf16 = (components.needs("onednn", REASON or onednn.bf16_unavailable_reason())
              if _native_bf16() else pytest.mark.skip(reason="this CPU has no native bf16"))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16] + (
    [] if BF16_NATIVE else [torch.bfloat16]))
def test_other_dtypes_delegate_to_stock(dtype):
    conv, bn, x, _, _ = _case(8, 16, 3, 1, 1, 1, 1, (7, 7))
    with torch.no_grad():
        scale, shift = fold_scale_shift(conv, bn, dtype)
    x, w = x.to(dtype), conv.weight.detach().to(dtype)
    with torch.no_grad():
        with resnet_fused.backend("onednn"):
            got = conv_bn_act(x, w, scale, shift, padding=1)
        with resnet_fused.backend("torch"):
            want = conv_bn_act(x, w, scale, shift, padding=1)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not onednn.accelerates(CPU, dtype)


def _stock_chain(x, w, bn, res, relu, **conv):
    """torchvision's module sequence in x's dtype: conv, BN, + residual, ReLU."""
    y = bn.to(x.dtype)(torch.nn.functional.conv2d(x, w, None, **conv))
    y = y if res is None else y + res
    return torch.relu(y) if relu else y


@needs_bf16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_bf16_matches_float64_reference(shape, residual, relu):
    """bf16 on oneDNN (scale folded in fp32, one rounding; fp32 accumulation, bias and residual
    add; one rounding of the output) against float64, judged by the rule against stock's bf16
    module sequence."""
    cin, cout, k, s, p, d, g, hw = shape
    conv, bn, x, scale, shift = _case(cin, cout, k, s, p, d, g, hw)
    bf = torch.bfloat16
    x = x.to(bf).contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach().to(bf)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    res = None
    if residual:
        oh = (hw[0] + 2 * p - d * (k - 1) - 1) // s + 1
        ow = (hw[1] + 2 * p - d * (k - 1) - 1) // s + 1
        res = torch.randn(x.shape[0], cout, oh, ow).to(bf)
    with torch.no_grad():
        with resnet_fused.backend("onednn"):
            got = conv_bn_act(x, w, scale, shift, residual=res, relu=relu, **kw)
        stock = _stock_chain(x, w, copy.deepcopy(bn), res, relu, **kw)
    ref = conv_bn_act_ref(x, w, scale, shift, residual=res, relu=relu, **kw)
    assert got.dtype == bf and got.stride() == channels_last_strides(got.shape)
    assert onednn.accelerates(CPU, bf)
    assert_within_rule(got, stock, ref, bf)


@needs_bf16
def test_bf16_relu_keeps_every_nan_as_stock():
    """relu_ on bf16 works on the bit patterns: all 65536 of them give stock's value (NaNs stay
    NaN with their bits; only -0.0 differs in the sign of its zero)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    got = onednn.relu_(values.clone())
    want = torch.relu(values)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[nan], bits[nan])  # every NaN unchanged
    assert torch.equal(got[~nan], want[~nan])  # numbers, +-Inf, +-0 (equal as values)
    assert (got.view(torch.int16)[~nan & (values <= 0)] == 0).all()  # +0.0, not -0.0
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(onednn.relu_(x.clone()), torch.relu(x))  # fp32: torch.relu_


@needs_bf16
@pytest.mark.parametrize("builder", BUILDER_PARAMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_autocast_every_builder(builder, layout):
    """Every builder under autocast(bf16), both input layouts: within the rule against
    torchvision under the same autocast, NaN where torchvision has NaN."""
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, builder)(num_classes=10)).eval()
    ours = getattr(resnet_fused, builder)(num_classes=10).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")  # poisons sample 1 only
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(tv).double()(x.double())
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, stock = ours(x), stock_outputs(tv, x)
    assert got.dtype == stock[0].dtype == torch.bfloat16 and got.shape == stock[0].shape
    assert_within_rule(got, stock, ref, torch.bfloat16)


@needs_bf16
@pytest.mark.parametrize("how", ["autocast", "bf16 model"])
def test_bf16_model_parity(how):
    """resnet50 under autocast(bf16) and as a bf16 model runs every chain on oneDNN in bf16 and
    stays within the rule against torchvision in the same mode (both layouts as "stock")."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    ours = resnet_fused.resnet50(num_classes=10).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ref = copy.deepcopy(tv).double()(x.double())
    calls = []
    real = onednn.run

    def counted(prepared, x, *a):
        calls.append(isinstance(prepared, onednn.Scaled) and x.dtype == torch.bfloat16)
        return real(prepared, x, *a)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(onednn, "run", counted)
        if how == "autocast":
            with torch.autocast("cpu", torch.bfloat16):
                got = ours(x)
                stock = stock_outputs(tv, x)
        else:
            got = ours.bfloat16()(x.bfloat16())
            stock = stock_outputs(tv.bfloat16(), x.bfloat16())
    assert got.dtype == torch.bfloat16 and calls == [True] * 53
    assert_within_rule(got, stock, ref, torch.bfloat16)


@needs_onednn
def test_never_stale_when_tensors_change_in_place():
    conv, bn, x, scale, shift = _case(8, 16, 3, 1, 1, 1, 1, (7, 7))
    w = conv.weight.detach().clone()
    scale, shift = scale.clone(), shift.clone()

    def run():
        with torch.no_grad(), resnet_fused.backend("onednn"):
            return conv_bn_act(x, w, scale, shift, padding=1)

    def check(out):
        assert max_err(out, conv_bn_act_ref(x, w, scale, shift, padding=1)) < 1e-4

    check(run())
    for t in (w, scale, shift):  # each in-place write bumps a version counter
        with torch.no_grad():
            t.mul_(1.5).add_(0.25)
        check(run())


@needs_onednn
def test_same_weight_with_other_geometry():
    """One weight tensor used with different groups / strides must not reuse a blocked copy."""
    torch.manual_seed(0)
    w, scale, shift = torch.randn(8, 4, 3, 3), torch.rand(8) + 0.5, torch.randn(8)
    for groups, stride, cin in ((1, 1, 4), (2, 1, 8), (1, 2, 4), (2, 2, 8)):
        x = torch.randn(1, cin, 9, 9)
        with torch.no_grad(), resnet_fused.backend("onednn"):
            got = conv_bn_act(x, w, scale, shift, stride=stride, padding=1, groups=groups)
        ref = conv_bn_act_ref(x, w, scale, shift, stride=stride, padding=1, groups=groups)
        assert max_err(got, ref) < 1e-4, (groups, stride)


@needs_onednn
def test_inference_tensors_passed_directly_are_not_memoised():
    conv, bn, x, scale, shift = _case(8, 16, 1, 1, 0, 1, 1, (5, 5))
    with torch.inference_mode():
        w, scale, shift = conv.weight.clone(), scale.clone(), shift.clone()
        with resnet_fused.backend("onednn"):
            first = conv_bn_act(x, w, scale, shift)
            scale.mul_(2.0)  # no version counter on inference tensors: must not be cached
            second = conv_bn_act(x, w, scale, shift)
    assert max_err(second, conv_bn_act_ref(x, w, scale, shift)) < 1e-4
    assert not torch.allclose(first, second)


@needs_onednn
def test_model_parity_and_fold_cache_refresh():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused = resnet_fused.fuse(tv)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad(), resnet_fused.backend("onednn"):
        ref = copy.deepcopy(tv).double()(x.double())
        stock = tv(x)
        got = fused(x)
        assert_within_rule(got, stock, ref, torch.float32)
        # an optimizer-like in-place update must be seen on the next call
        tv.layer1[0].conv1.weight.mul_(0.5)
        tv.layer2[0].bn1.running_var.mul_(3.0)
        ref2 = copy.deepcopy(tv).double()(x.double())
        got2 = fused(x)
        assert_within_rule(got2, tv(x), ref2, torch.float32)
        # a new input shape gets its own blocked weight, same numbers
        x3 = torch.randn(1, 3, 33, 35)
        assert_within_rule(fused(x3), tv(x3), copy.deepcopy(tv).double()(x3.double()),
                           torch.float32)


@needs_onednn
def test_inference_mode_model_prepares_once():
    """Each conv's scale-folded weight and blocked copy are made once, in the fold cache."""
    torch.manual_seed(0)
    fused = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    resnet_fused.clear_fold_cache()

    def prepared():
        return [p for m in fused.modules() for p in fold.entries_for(m).values()]
    with torch.inference_mode(), resnet_fused.backend("onednn"):
        a = fused(x)
        first = prepared()
        b = fused(x)
    assert len(first) == 20 and all(isinstance(p, onednn.Scaled) for p in first)
    assert [id(p) for p in prepared()] == [id(p) for p in first]
    # a conv whose problem shape this torch's oneDNN refuses runs on stock and has no blocked
    # weight (torch 2.11: layer4's 1x1-output residual convs, two convs of one shape)
    refused = {key[1] for key in onednn.fallback_shapes()}  # their weight shapes
    assert all(p.blocked or tuple(p.weight.shape) in refused for p in first)
    assert sum(bool(p.blocked) for p in first) >= 20 - 2 * len(refused)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_small_problems_run_stock_conv_on_the_folded_weight(monkeypatch, residual, relu):
    """Below _SMALL_WORK the backend runs stock's conv on W*scale with the bias: the same
    numbers as the primitive, within the rule, no blocked copy made."""
    monkeypatch.setattr(onednn, "_SMALL_WORK", 1 << 17)
    conv, bn, x, scale, shift = _case(8, 8, 3, 1, 1, 1, 1, (4, 4))
    x = x[:1].contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 8, 4, 4) if residual else None
    kw = dict(residual=res, padding=1, relu=relu)
    prepared = onednn.prepare(conv.weight, scale, shift)
    with torch.no_grad():
        got = onednn.run(prepared, x, res, [1, 1], [1, 1], [1, 1], 1, relu)
        with resnet_fused.backend("torch"):
            stock = conv_bn_act(x, conv.weight, scale, shift, **kw)
    assert not prepared.blocked
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_within_rule(got, stock, conv_bn_act_ref(x, conv.weight, scale, shift, **kw),
                       torch.float32)


@needs_onednn
def test_gradients_through_the_op():
    conv, bn, x, scale, shift = _case(4, 6, 3, 1, 1, 1, 1, (5, 5))
    grads = {}
    for name in ("onednn", "torch"):
        xx = x.clone().requires_grad_()
        w = conv.weight.detach().clone().requires_grad_()
        with resnet_fused.backend(name):
            conv_bn_act(xx, w, scale, shift, padding=1).square().sum().backward()
        grads[name] = (xx.grad, w.grad)
    for a, b in zip(grads["onednn"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("case", [  # cin, cout, k, stride, padding, groups, hw: output is 1x1
    (32, 32, 3, 1, 1, 1, 1),   # resnet layer4 3x3 on a 1x1 map (the torch 2.11 failure)
    (16, 64, 1, 1, 0, 1, 1),   # bottleneck expansion 1x1 on a 1x1 map
    (16, 32, 3, 2, 1, 1, 2),   # stride 2 down to 1x1
    (32, 32, 3, 1, 1, 4, 1),   # grouped
], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("residual", [True, False])
def test_1x1_output_matches_float64_reference(case, residual):
    """1x1 spatial outputs (resnet18/50 layer4 on 32x32 images): right on every torch, whether
    oneDNN runs them or the backend falls back to stock for them."""
    cin, cout, k, s, p, g, hw = case
    conv, bn, x, scale, shift = _case(cin, cout, k, s, p, 1, g, (hw, hw))
    res = torch.randn(x.shape[0], cout, 1, 1) if residual else None
    kw = dict(stride=s, padding=p, groups=g, relu=True)
    with torch.no_grad():
        w = conv.weight.contiguous(memory_format=torch.channels_last)
        with resnet_fused.backend("onednn"):
            got = conv_bn_act(x, w, scale, shift, residual=res, **kw)
            again = conv_bn_act(x, w, scale, shift, residual=res, **kw)  # fallback path
        with resnet_fused.backend("torch"):
            stock = conv_bn_act(x, conv.weight, scale, shift, residual=res, **kw)
        raw = onednn.run(onednn.prepare(w, scale, shift), x, res, [s, s], [p, p], [1, 1], g,
                         True)
    ref = conv_bn_act_ref(x, conv.weight, scale, shift, residual=res, **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (2, cout, 1, 1)
    assert_within_rule(got, stock, ref, torch.float32)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert raw.dtype == torch.float32 and raw.stride() == channels_last_strides(raw.shape)
    torch.testing.assert_close(raw, got, rtol=0, atol=0)


@needs_onednn
def test_resnet18_on_32x32_image():
    """The user-facing bug: layer4 runs on 1x1 maps; the forward must work and be right."""
    torch.manual_seed(0)
    fused = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with resnet_fused.backend("onednn"):
            got = fused(x)
        with resnet_fused.backend("torch"):
            stock = fused(x)
        ref = copy.deepcopy(fused).double()(x.double())
    assert_within_rule(got, stock, ref, torch.float32)


class _FailingOps:
    """Stands in for onednn._ops: the fused conv ops raise like torch 2.11's does; counts calls."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def _fail(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("could not create a memory")

    def __call__(self):
        return self._fail, self._fail, self.real()[2]


@needs_onednn
@pytest.mark.parametrize("residual", [True, False])
def test_runtime_failure_falls_back_to_stock_once_per_shape(monkeypatch, caplog, residual):
    monkeypatch.setattr(onednn, "_failed", {})
    ops = _FailingOps(onednn._ops)
    monkeypatch.setattr(onednn, "_ops", ops)
    conv, bn, x, scale, shift = _case(16, 24, 3, 1, 1, 1, 1, (6, 7))
    res = torch.randn(2, 24, 6, 7) if residual else None
    kw = dict(residual=res, padding=1, relu=True)
    w = conv.weight.contiguous(memory_format=torch.channels_last)
    prepared = onednn.prepare(w, scale, shift)
    caplog.set_level(logging.WARNING, logger="resnet_fused")
    with torch.no_grad():
        with resnet_fused.backend("onednn"):
            first = onednn.run(prepared, x, res, [1, 1], [1, 1], [1, 1], 1, True)
            assert ops.calls == 1 and len(onednn.fallback_shapes()) == 1
            # the failed geometry's blocked weight is not kept (it would evict useful ones)
            assert not prepared.blocked
            second = conv_bn_act(x, w, scale, shift, **kw)
            raw = onednn.run(prepared, x, res, [1, 1], [1, 1], [1, 1], 1, True)
        with resnet_fused.backend("torch"):
            stock = conv_bn_act(x, conv.weight, scale, shift, **kw)
    assert ops.calls == 1  # remembered: the op is not called again for that shape
    ref = conv_bn_act_ref(x, conv.weight, scale, shift, **kw)
    assert_within_rule(first, stock, ref, torch.float32)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(raw, first, rtol=0, atol=0)
    assert raw.dtype == x.dtype and raw.stride() == channels_last_strides(raw.shape)
    assert raw.data_ptr() != x.data_ptr() and (res is None or raw.data_ptr() != res.data_ptr())
    records = [r for r in caplog.records if r.name == "resnet_fused"]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "[2, 16, 6, 7]" in msg and "[24, 16, 3, 3]" in msg and "could not create a memory" in msg
    # another shape is tried (and logged) on its own
    x2 = torch.randn(1, 16, 5, 5)
    res2 = torch.randn(1, 24, 5, 5) if residual else None
    with torch.no_grad(), resnet_fused.backend("onednn"):
        got2 = conv_bn_act(x2, w, scale, shift, residual=res2, padding=1)
    assert ops.calls == 2 and len(onednn.fallback_shapes()) == 2
    assert len([r for r in caplog.records if r.name == "resnet_fused"]) == 2
    assert max_err(got2, conv_bn_act_ref(x2, w, scale, shift, residual=res2, padding=1)) < 1e-4


@needs_onednn
def test_fallback_keeps_other_shapes_fused(monkeypatch):
    """A failing shape does not disturb the blocked-weight cache of shapes that work."""
    monkeypatch.setattr(onednn, "_failed", {})
    real = onednn._ops
    conv, bn, x, scale, shift = _case(8, 16, 3, 1, 1, 1, 1, (7, 7))
    w = conv.weight.contiguous(memory_format=torch.channels_last)
    prepared = onednn.prepare(w, scale, shift)
    args = (None, [1, 1], [1, 1], [1, 1], 1, True)
    with torch.no_grad():
        good = onednn.run(prepared, x, *args)
        blocked = dict(prepared.blocked)
        monkeypatch.setattr(onednn, "_ops", _FailingOps(real))
        x_bad = torch.randn(1, 8, 1, 1)
        bad = onednn.run(prepared, x_bad, *args)
        monkeypatch.setattr(onednn, "_ops", real)
        again = onednn.run(prepared, x, *args)
    assert prepared.blocked.keys() == blocked.keys()
    assert all(prepared.blocked[k] is v for k, v in blocked.items())
    torch.testing.assert_close(again, good, rtol=0, atol=0)
    assert max_err(bad, conv_bn_act_ref(x_bad, w, scale, shift, padding=1)) < 1e-4


def test_self_check_covers_edge_cases():
    """The self-check runs the edge cases; any it saw raise are reported, not hidden."""
    names = " ".join(case[0] for case in onednn._EDGE_CASES)
    for what in ("1x1 output", "stride 2", "groups 2"):
        assert what in names
    for text in onednn.limitations():  # e.g. torch 2.11: "3x3 conv, 1x1 output, with residual"
        assert isinstance(text, str) and "RuntimeError" in text
        assert any(text.startswith(case[0] + ",") for case in onednn._EDGE_CASES)


def test_availability_reasons():
    """The backend is usable on CPU here -- never a pass when it is not: a skip locally, a
    failure under strict mode (CI) -- and auto picks it (auto without it: the test below)."""
    assert isinstance(onednn.unavailable_reason(torch.device("cuda")), str)
    assert "onednn" in backends.NAMES
    assert REASON is None or (isinstance(REASON, str) and REASON), REASON
    components.require("onednn", REASON)
    assert backends.device_choice(CPU) == "onednn"


@needs_onednn
def test_disabled_onednn_is_reported(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert "disabled" in onednn.unavailable_reason(CPU)
    assert backends.device_choice(CPU) == "torch"


@needs_onednn
def test_first_use_under_autocast_keeps_it_available():
    """The self-check runs in plain fp32 even when the first chain runs under autocast (a bf16
    stock reference would fail it and switch the backend off for the whole process)."""
    onednn._probe.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn.unavailable_reason(CPU) is None
    finally:
        onednn._probe.cache_clear()
    assert onednn.unavailable_reason(CPU) is None
