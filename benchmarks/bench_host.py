"""Host overhead of one fused chain against stock's module sequence, on a tiny tensor.

What a batch-1 forward without CUDA graphs pays per conv -> BN -> ReLU in Python and dispatch:
`layers.conv_bn` (fold-cache check, backend, the op) against torchvision's `relu(bn(conv(x)))`,
same 1x8x4x4 channels_last input, inference mode, one intra-op thread; compare the rows of one run
(`pytest benchmarks/bench_host.py --benchmark-only`, group "host"). On CUDA the calls are not
synchronised: the figure is the host's launch cost, which is what a launch-bound batch-1 forward
waits for.
"""
from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused.layers import conv_bn

import components
from harness import device_or_skip

PROVIDERS = ["stock", "fused:torch", "fused:onednn", "fused:triton", "fused:cuda"]


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_chain_host_overhead(benchmark, device_name, provider):
    device = device_or_skip(device_name)
    backend = provider[6:] if provider.startswith("fused:") else None
    if backend is not None:
        components.backend(backend, device)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(device).eval()
    bn = torch.nn.BatchNorm2d(8).to(device).eval()
    x = torch.randn(1, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    relu = torch.nn.ReLU(inplace=True)

    def fn():
        return relu(bn(conv(x))) if backend is None else conv_bn(conv, bn, x, act=relu)

    benchmark.group = f"host {device_name}"
    benchmark.extra_info.update(provider=provider, device=device_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(), resnet_fused.backend(backend or "torch"):
            fn()  # fold cache, compile, tuning
            benchmark(fn)
    finally:
        torch.set_num_threads(threads)
