"""Training-mode BatchNorm (+ residual) + ReLU: the extension's fused bn_act_train vs stock
nn.BatchNorm2d (+ add) + ReLU, forward and forward+backward, in both layouts, at the BatchNorm
shapes of ResNet-50 (batch 8 fp32 and bf16 on CPU; batch 64 bf16 on CUDA). The fused kernels
are timed whatever the training policy picks (training.MEASURED_FASTER is decided from these
numbers and `bench --train`). `copy` times x.clone() on the same tensor: the bandwidth torch
reaches there, which the fused op's `gbps_min_traffic` is held against (goal: >= 80% of it).
With --benchmark-disable every case runs once at a tiny size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import extension, training
from resnet_fused.tools.cli import DTYPES

import components
from harness import device_or_skip, record, run_pedantic

# (channels, height/width, residual): bn1/bn2 of layer1..4 (ReLU) and bn3 (+ residual, ReLU).
SHAPES = [(64, 56, False), (256, 56, True), (128, 28, False), (512, 28, True), (1024, 14, True),
          (2048, 7, True)]
CASES = [("cpu", 8, "fp32"), ("cpu", 8, "bf16"), ("cuda", 64, "bf16")]


# (provider, backward): the copy reference once per shape
RUNS = [("stock", False), ("fused", False), ("copy", False), ("stock", True), ("fused", True)]


@pytest.mark.parametrize("provider,backward", RUNS,
                         ids=[f"{p}-{'fwd+bwd' if b else 'fwd'}" for p, b in RUNS])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'+res' if s[2] else ''}")
def test_bn_act_train(benchmark, shape, case, fmt, backward, provider, is_smoke):
    device_name, batch, dtype_name = case
    device = device_or_skip(device_name)
    if provider == "fused":
        components.require("extension", extension.unavailable_reason(device))
    channels, size, residual = shape
    if is_smoke:
        batch, size = 1, 4
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(channels).to(device).train()
    x = (torch.randn(batch, channels, size, size, generator=g) * 2 + 0.5).to(device, dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(backward)
    res = (torch.randn(x.shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
           if residual else None)
    grad = torch.randn(x.shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)

    def forward():
        if provider == "fused":
            return training.batch_norm_act(bn, x, res, True)
        y = bn(x)
        return F.relu(y + res if res is not None else y)

    def run():
        if provider == "copy":
            return x.detach().clone()
        out = forward()
        if backward:
            out.backward(grad)
        return out
    with torch.enable_grad():
        x.grad = None
        got = run().detach().float()
        fused_grad = x.grad.float() if backward and provider != "copy" else None
    rounds = 1 if is_smoke else (10 if device.type == "cpu" else 50)
    timed = run_pedantic(benchmark, run, device, rounds=rounds,
                         warmup_rounds=0 if is_smoke else 2, grad=True)
    assert got.isfinite().all() and (fused_grad is None or fused_grad.isfinite().all())
    # Bytes a fused kernel must move at least: forward x (+ residual) in, out out; backward
    # grad, x and out in, grad_x (+ grad residual) out.
    tensors = 2 if provider == "copy" else (2 + residual) + ((4 + residual) if backward else 0)
    record(benchmark, device, dtype, timed, min_bytes=tensors * x.numel() * x.element_size(),
           provider=provider, shape=list(x.shape), layout="nhwc" if fmt is torch.channels_last
           else "nchw", backward=backward, policy=training.train_bn_choice(device))
