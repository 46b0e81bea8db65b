"""NaN and Inf propagate exactly as in stock PyTorch, in every backend that runs here.

Stock is the op sequence torchvision runs (conv, BN affine, + residual, ReLU) in the same dtype.
NaN/Inf placement is order-independent (a sum with a NaN term, or with both +Inf and -Inf terms,
is NaN; with +Inf terms only, +Inf), so every backend must give exactly stock's non-finite
pattern; finite elements follow the usual accuracy rule. Planted: NaN, +Inf, -Inf, +Inf and -Inf
together in the input, and NaN in the residual. CUDA backends run in the GPU suite's CUDA tests.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from resnet_fused import backends
from resnet_fused.ops import conv_bn_act
import components
from numerics import assert_within_rule, conv_bn_act_ref, randomize_bn

CASES = {  # (C_in, C_out, k, stride, padding, groups, H, W)
    "3x3": (8, 12, 3, 1, 1, 1, 7, 7),
    "1x1/2": (12, 20, 1, 2, 0, 1, 7, 7),
    "stem": (3, 16, 7, 2, 3, 1, 13, 13),
    # C_out/groups = 4: Triton's N tiles span several groups (32 of them under the interpreter)
    "grouped": (16, 16, 3, 1, 1, 4, 6, 6),
}
PLANTS = ["nan", "+inf", "-inf", "+inf-inf", "nan residual"]


def _backends():
    # ("onednn", "bf16"): CPU bf16 (oneDNN where the CPU has it natively, else stock's ops)
    names = [("torch", None), ("onednn", None), ("onednn", "bf16"), ("triton", "interpreter")]
    if torch.cuda.is_available():
        names += [("triton", "cuda"), ("cuda", "cuda")]
    return names


def _problem(case, plant, device, dtype):
    cin, cout, k, s, p, g, h, w = CASES[case]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin // g, k, k, generator=gen) / (cin // g * k * k) ** 0.5
    scale = torch.rand(cout, generator=gen) * 2 - 0.5  # some negative: flips Inf signs
    shift = torch.randn(cout, generator=gen)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(2, cout, oh, ow, generator=gen)
    # even positions: the 1x1/2 case reads only those
    if plant == "nan":
        x[0, cin - 1, 2, 4] = float("nan")  # the last group's channel
    elif plant == "+inf":
        x[1, 0, 4, 2] = float("inf")
    elif plant == "-inf":
        x[0, cin // 2, 4, 0] = -float("inf")
    elif plant == "+inf-inf":
        x[0, 0, 2, 2], x[0, cin - 1, 2, 4] = float("inf"), -float("inf")
    else:
        res[1, cout - 1, 0, 0] = float("nan")
    cl = torch.channels_last
    return (x.to(device, dtype).contiguous(memory_format=cl),
            weight.to(device, dtype).contiguous(memory_format=cl), scale.to(device),
            shift.to(device), res.to(device, dtype).contiguous(memory_format=cl),
            dict(stride=s, padding=p, groups=g))


def _stock(x, weight, scale, shift, res, relu, conv):
    y = F.conv2d(x, weight, None, conv["stride"], conv["padding"], 1, conv["groups"])
    y = y * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1) + res
    return torch.relu(y) if relu else y


def _cases():
    """(backend, where, case, plant). Under the interpreter the exact non-finite fix-up pass of
    the stem and grouped loops takes 3-9 s a case: there "+inf-inf" (each sign alone where only
    one reaches an output, NaN where both do) stands for "+inf" and "-inf", run under `slow`."""
    def marks(where, case, plant):
        slow = where == "interpreter" and case in ("stem", "grouped") and plant in ("+inf", "-inf")
        return pytest.mark.slow if slow else ()
    return [pytest.param(name, where, case, plant, marks=marks(where, case, plant),
                         id=f"{plant}-{case}-{name}-{where}")
            for name, where in _backends() for case in CASES for plant in PLANTS]


@pytest.mark.parametrize("name,where,case,plant", _cases())
@pytest.mark.parametrize("relu", [True, False])
def test_nonfinite_as_stock(monkeypatch, one_thread, name, where, case, plant, relu):
    device = torch.device("cuda" if where == "cuda" else "cpu")
    if where == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        components.require(components.BACKEND_COMPONENT[name], f"{name} unavailable here: {reason}")
    dtype = torch.bfloat16 if where == "bf16" else torch.float32
    x, weight, scale, shift, res, conv = _problem(case, plant, device, dtype)
    with resnet_fused.backend(name):
        out = conv_bn_act(x, weight, scale, shift, residual=res, relu=relu, **conv)
    stock = _stock(x, weight, scale, shift, res, relu, conv)
    ref = conv_bn_act_ref(x.cpu(), weight.cpu(), scale.cpu(), shift.cpu(), residual=res.cpu(),
                          relu=relu, **conv)
    assert not torch.isfinite(stock).all()  # the plant reached the output
    for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(out.cpu()), test(stock.cpu())), f"{kind} pattern differs"
    assert_within_rule(out.cpu(), stock.cpu(), ref, dtype)


def test_one_nan_pixel_poisons_the_logits_as_stock():
    """The model under `auto` (oneDNN on CPU): one NaN pixel gives torchvision's NaN pattern."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    ours = resnet_fused.resnet18(num_classes=10).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    x[0, 1, 30, 30] = float("nan")
    with torch.no_grad():
        want, got = tv(x), ours(x)
    assert torch.isnan(want[0]).all() and torch.isfinite(want[1]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
