"""Host overhead of one fused chain against stock's module sequence, on a tiny tensor.

What a batch-1 forward without CUDA graphs pays per conv -> BN -> ReLU in Python and dispatch:
`layers.conv_bn` (fold-cache check, backend, the op) against torchvision's `relu(bn(conv(x)))`,
same 1x8x4x4 channels_last input, inference mode, one intra-op thread; compare the rows of one run
(`pytest benchmarks/bench_host.py --benchmark-only`, group "host"). On CUDA the calls are not
synchronised: the figure is the host's launch cost, which is what a launch-bound batch-1 forward
waits for. `test_train_chain_host_overhead`: the same for a training chain, forward + backward
(group "host train"); `test_eval_grad_chain_host_overhead`: an eval chain that autograd records
(group "host eval-grad").
"""
from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused import extension, training
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


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("provider", ["stock", "fused"])
def test_train_chain_host_overhead(benchmark, monkeypatch, device_name, provider):
    """The same chain in training mode, forward + backward: stock's modules against
    `layers.conv_bn` with BN + ReLU as the extension's bn_act_train (forced on: the policy runs
    stock BatchNorm on tensors this small), 2x8x4x4 channels_last input requiring grad."""
    device = device_or_skip(device_name)
    if provider == "fused":
        components.require("extension", extension.unavailable_reason(device))
    monkeypatch.setenv(training.TRAIN_BN_ENV, provider)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(8).to(device)
    conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(2, 8, 4, 4, device=device)
    relu = torch.nn.ReLU(inplace=True)

    def fn():
        out = relu(bn(conv(x))) if provider == "stock" else conv_bn(conv, bn, x, act=relu)
        out.backward(grad)

    benchmark.group = f"host train {device_name}"
    benchmark.extra_info.update(provider=provider, device=device_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        assert training.bn_act_supported(bn, conv(x), None) == (provider == "fused")
        benchmark(fn)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("provider", ["stock", "fused"])
def test_eval_grad_chain_host_overhead(benchmark, device_name, pass_, provider):
    """Eval mode with autograd recording (frozen-BN fine-tuning, or any eval forward outside
    no_grad): stock's modules against `layers.conv_bn` (stock's conv, then the extension's
    bn_eval_act: one autograd node), forward alone or forward + backward, 1x8x4x4 channels_last
    input, parameters requiring grad (group "host eval-grad")."""
    device = device_or_skip(device_name)
    if provider == "fused":
        components.require("extension", extension.unavailable_reason(device))
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(device).eval()
    bn = torch.nn.BatchNorm2d(8).to(device).eval()
    x = torch.randn(1, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 8, 4, 4, device=device)
    relu = torch.nn.ReLU(inplace=True)

    def fn():
        out = relu(bn(conv(x))) if provider == "stock" else conv_bn(conv, bn, x, act=relu)
        if pass_ == "backward":
            out.backward(grad)

    benchmark.group = f"host eval-grad {pass_} {device_name}"
    benchmark.extra_info.update(provider=provider, device=device_name, pass_=pass_)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with resnet_fused.backend("torch" if provider == "stock" else "auto"):
            fn()
            if provider == "fused":  # the chain ran as bn_eval_act, not stock's modules
                assert "BnEvalAct" in conv_bn(conv, bn, x, act=relu).grad_fn.name()
            benchmark(fn)
    finally:
        torch.set_num_threads(threads)


class _ReplayStandIn:
    """A captured graph reduced to nothing: what is timed is the wrapper's own per-call work
    (on a GPU the input copy and the replay add two launches, ~5-10 us of host time)."""

    def __init__(self, model, example, warmup):
        self.static_out = torch.empty(example.shape[0], 1000)

    def __call__(self, x):
        return self.static_out


@pytest.mark.parametrize("check_weights", [True, "fast", False], ids=["full", "fast", "off"])
def test_graph_replay_host_overhead(benchmark, check_weights):
    """Per-call host cost of resnet_fused.cuda_graphs around resnet50 with a stand-in replay
    (CPU): the weight check (full: every parameter and buffer; fast: the generation counter;
    off), the input signature; clone_output=False, so no output copy is timed."""
    model = resnet_fused.resnet50().eval()
    fast = resnet_fused.cuda_graphs(model, clone_output=False, check_weights=check_weights)
    fast._device_types = ("cpu",)
    fast._factory = _ReplayStandIn
    x = torch.randn(1, 3, 224, 224)
    benchmark.group = "graph replay host"
    benchmark.extra_info.update(check_weights=str(check_weights))
    with torch.inference_mode():
        fast(x)
        benchmark(fast, x)
    assert fast.captures == 1
