"""Shared test helpers: float64 references, randomised BatchNorm, and the accuracy rule (defined in
resnet_fused/numerics.py)."""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused.numerics import ATOL, max_err, rule_violation  # noqa: F401 (re-exported)

BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
# The default run keeps one builder per block design and depth class (resnet101: the deep one);
# these repeat the same blocks at more depth or width (`make test-all` runs them).
SLOW_BUILDERS = {"resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
                 "wide_resnet101_2"}
BUILDER_PARAMS = [pytest.param(b, marks=pytest.mark.slow) if b in SLOW_BUILDERS else b
                  for b in BUILDERS]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats (var over 7 decades, some below eps) and affine params in every BN
    layer: a fresh BN (mean 0, var 1, weight 1, bias 0) would hide folding bugs. The weight is
    drawn relative to sqrt(var + eps) so that the per-channel gain stays in 0.25..1.75 and deep
    models stay finite in fp16/fp32, while any mistake in the folding formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                var = 10 ** (torch.rand(c, generator=g) * 3 - 2)    # 1e-2 .. 10
                var[torch.rand(c, generator=g) < 0.1] = 1e-6          # some far below eps
                m.running_var.copy_(var)
                if m.weight is not None:
                    gain = torch.rand(c, generator=g) * 1.5 + 0.25
                    m.weight.copy_(gain * torch.sqrt(var + m.eps))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model


def conv_bn_act_ref(x, weight, bn_or_scale, shift=None, *, residual=None, stride=1, padding=0,
                    dilation=1, groups=1, relu=True) -> torch.Tensor:
    """float64 reference of relu?(conv(x) * scale + shift + residual)."""
    d = torch.float64
    y = F.conv2d(x.to(d), weight.to(d), None, stride, padding, dilation, groups)
    y = y * bn_or_scale.to(d).view(1, -1, 1, 1) + shift.to(d).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(d)
    return torch.relu(y) if relu else y


def stock_outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Stock PyTorch's outputs in both standard layouts. The fused path runs NHWC, and on CPU
    stock fp32 NHWC convs are measurably less accurate than NCHW ones (resnet34, 64x64: 1.2-4.3x
    the NCHW error against float64), so "stock" means either of PyTorch's standard layouts."""
    return [model(x.contiguous()), model(x.contiguous(memory_format=torch.channels_last))]


def loss_grads(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of model(x).square().sum(): x's where x requires grad, then each parameter's
    that requires one (cleared afterwards)."""
    want_x = x.requires_grad
    x = x.detach().clone().requires_grad_(want_x)
    model(x).square().sum().backward()
    grads = [x.grad] * want_x + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def assert_within_rule(fused: torch.Tensor, stock, ref64: torch.Tensor, dtype: torch.dtype,
                       factor: float = 2.0) -> None:
    """The package's accuracy rule (resnet_fused.numerics), as a test assertion."""
    problem = rule_violation(fused, stock, ref64, dtype, factor)
    assert problem is None, problem
