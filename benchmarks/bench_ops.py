"""Per-op: every distinct ResNet-50 conv shape, the fused conv_bn_act (each backend) vs stock
conv -> BN (-> + residual) (-> ReLU) as separate torch ops, channels_last activations on both.

GPU variants: batch 32 and 256, fp16. CPU variants: batch 1, fp32. With --benchmark-disable every
shape runs once at the shapes a 32x32 image gives.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import backends
from resnet_fused.fold import fold
from resnet_fused.ops import conv_bn_act
from resnet_fused.tools.cli import DTYPES
from resnet_fused.walk import layers, meta_model

import components
from harness import device_or_skip, record, run_pedantic


@functools.lru_cache(maxsize=None)
def _distinct(size: int, batch: int = 1):
    """{first layer name: Layer} for each distinct conv problem of ResNet-50."""
    seen, out = set(), {}
    for layer in layers(meta_model("resnet50"), (batch, 3, size, size)):
        if layer.kind != "conv_bn_act":
            continue
        key = (layer.in_shape[1:], layer.weight_shape, layer.stride, layer.padding, layer.relu,
               layer.residual)
        if key not in seen:
            seen.add(key)
            out[layer.name] = layer
    return out


SHAPES = _distinct(224)
CASES = [("cpu", 1, "fp32"), ("cuda", 32, "fp16"), ("cuda", 256, "fp16")]
PROVIDERS = ["stock", *(f"fused:{n}" for n in backends.NAMES if n != "auto")]


def _id(name):
    layer = SHAPES[name]
    c, h, w = layer.in_shape[1:]
    k = layer.weight_shape[2]
    tail = "+res" if layer.residual else ("" if layer.relu else "-norelu")
    return f"{name}:{c}x{h}x{w}-k{k}s{layer.stride[0]}-{layer.weight_shape[0]}{tail}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}")
@pytest.mark.parametrize("name", list(SHAPES), ids=_id)
def test_conv_bn_act(benchmark, name, case, provider, is_smoke):
    device_name, batch, dtype_name = case
    device = device_or_skip(device_name)
    backend = provider[6:] if provider.startswith("fused:") else None
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter on CPU is for correctness, not timing")
    if backend is not None:
        components.backend(backend, device)
    dtype = DTYPES[dtype_name]
    if is_smoke:
        batch = 1
    layer = _distinct(32 if is_smoke else 224, batch)[name]
    conv, bn = layer.modules
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, bias=False)
    bn = torch.nn.BatchNorm2d(conv.out_channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5, generator=g)
        bn.running_var.uniform_(0.1, 2.0, generator=g)
        bn.weight.uniform_(0.25, 1.75, generator=g)
        bn.bias.normal_(0, 0.5, generator=g)
    conv, bn = conv.to(device, dtype), bn.to(device, dtype)
    n_shape, o_shape = layer.in_shape, layer.out_shape
    x = torch.randn(n_shape, generator=g).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    res = torch.randn(o_shape, generator=g).to(device, dtype).contiguous(
        memory_format=torch.channels_last) if layer.residual else None

    def stock():
        y = bn(conv(x))
        if res is not None:
            y = y + res
        return F.relu(y) if layer.relu else y

    if backend is None:
        run = stock
    else:
        with torch.no_grad():
            weight, scale, shift = fold(conv, bn, dtype, backend)

        def run():
            with backends.backend(backend):
                return conv_bn_act(x, weight, scale, shift, residual=res, stride=layer.stride,
                                   padding=layer.padding, relu=layer.relu)
    with torch.inference_mode():
        out, want = run(), stock()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    err = ((out.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1)).item()
    assert err < tol, f"{provider} differs from stock by {err:.2e} (relative)"
    rounds = 1 if is_smoke else (10 if device.type == "cpu" else 50)
    timed = run_pedantic(benchmark, run, device, rounds=rounds,
                         warmup_rounds=0 if is_smoke else 3)
    record(benchmark, device, dtype, timed, images=batch, macs=layer.macs,
           min_bytes=layer.min_bytes(x.element_size()), layer=name, batch=batch,
           provider=provider, in_shape=list(n_shape), weight_shape=list(layer.weight_shape))
