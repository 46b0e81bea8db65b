"""The `cudnn` backend: one cuDNN fused graph per chain (csrc/cuda/cudnn_fused.cpp).

Here (no GPU): the build finds the frontend headers or says why not, the op is registered, the
backend reports why it cannot run on CPU tensors and per-layer auto includes it only where it
runs. On a GPU: parity with the float64 reference under the numerics rule for every distinct conv
of resnet18, resnet50 and resnext50_32x4d (fp16, bf16; the grouped convs run the `cuda` path),
NaN/Inf as stock, and CUDA graph capture/replay.
"""
from __future__ import annotations

import os
import runpy

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import backends, extension
from resnet_fused.backends import autoselect, cudnn
from resnet_fused.fold import fold_scale_shift
from resnet_fused.ops import conv_bn_act
from resnet_fused.walk import layers

import components
from numerics import assert_within_rule, conv_bn_act_ref, randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = os.path.join(ROOT, "build", "cudnn_frontend", "include")


def _setup_helpers():
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_helpers")


def test_setup_finds_the_frontend_headers_or_says_why(monkeypatch, tmp_path):
    setup = _setup_helpers()
    monkeypatch.setenv("RESNET_FUSED_CUDNN_FRONTEND", str(tmp_path))  # no headers there
    dirs, why = setup["cudnn_frontend"]("/usr/local/cuda")
    assert dirs == [] and "no cuDNN frontend headers" in why and "nvidia-cudnn-frontend" in why
    if not os.path.isfile(os.path.join(HEADERS, "cudnn_frontend.h")):
        components.require("cuda-kernels", "build/cudnn_frontend is missing (make cudnn-frontend)")
    monkeypatch.setenv("RESNET_FUSED_CUDNN_FRONTEND", HEADERS)
    dirs, version = setup["cudnn_frontend"]("/usr/local/cuda")
    assert dirs and dirs[0] == HEADERS and version.count(".") == 2, (dirs, version)


def test_ops_are_registered_and_the_build_says_whether_it_has_them():
    module = extension.load()
    if module is None:
        components.require("extension", extension.unavailable_reason())
    ops = torch.ops.resnet_fused
    assert "conv_bn_act_cudnn(Tensor x, Tensor weight" in str(ops.conv_bn_act_cudnn.default._schema)
    assert "-> str" in str(ops.cudnn_fused_support.default._schema)
    if not module.with_cuda:
        components.require("cuda-kernels", "the extension was built without CUDA kernels")
        return
    # what setup.py finds now (its rule, this environment) is what the build must hold
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    dirs, version = _setup_helpers()["cudnn_frontend"](cuda_home)
    if dirs:
        assert module.cudnn_frontend == version and cudnn.frontend_reason() is None
    else:  # built without the headers (e.g. $RESNET_FUSED_CUDNN_FRONTEND elsewhere): it says so
        assert module.cudnn_frontend == "" and "cuDNN frontend headers" in cudnn.frontend_reason()


def test_without_the_frontend_the_backend_says_why(monkeypatch):
    class NoFrontend:  # a CUDA build made without the headers
        with_cuda, cuda_archs, cudnn_frontend = 1, "sm_80,sm_90", ""

    monkeypatch.setattr(extension, "load", lambda: NoFrontend())
    assert "without the cuDNN frontend" in cudnn.frontend_reason()
    reason = cudnn.unavailable_reason(torch.device("cpu"))
    assert reason  # a CPU device, or no frontend: either way a sentence, never a crash


def test_backend_is_registered_and_refuses_cpu_tensors():
    assert "cudnn" in backends.NAMES
    reason = backends.unavailable_reason("cudnn", torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    with pytest.raises(backends.BackendUnavailableError, match="cudnn"):
        with resnet_fused.backend("cudnn"):
            pass
    if not torch.cuda.is_available():  # per-layer auto times only what runs on the device
        assert autoselect.candidates(torch.device("cpu")) == autoselect.REQUIRED


# ---- on a GPU --------------------------------------------------------------------------------
def _distinct_convs():
    seen, out = set(), []
    for arch in ("resnet18", "resnet50", "resnext50_32x4d"):
        model = getattr(torchvision.models, arch)()
        for layer in layers(model, (2, 3, 64, 64)):
            if layer.kind != "conv_bn_act" or layer.problem in seen:
                continue
            seen.add(layer.problem)
            out.append(pytest.param(layer, id=f"{arch}-{layer.name}"))
    return out


def _gpu_reason():
    return backends.unavailable_reason("cudnn", torch.device("cuda"))


@components.needs_gpu("cuda-kernels", _gpu_reason)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layer", _distinct_convs())
def test_gpu_every_resnet_conv_matches_float64(layer, dtype):
    conv, bn = layer.modules
    randomize_bn(bn, seed=3)
    bn.eval()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(layer.in_shape, generator=gen).to(dev, dtype).contiguous(memory_format=cl)
    res = (torch.randn(layer.out_shape, generator=gen).to(dev, dtype).contiguous(memory_format=cl)
           if layer.residual else None)
    w = conv.weight.detach().to(dev, dtype)
    scale, shift = fold_scale_shift(conv.to(dev), bn.to(dev), dtype)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
              groups=conv.groups, relu=layer.relu)
    with torch.no_grad():
        with resnet_fused.backend("cudnn"):
            got = conv_bn_act(x, w, scale, shift, residual=res, **kw)
        with resnet_fused.backend("torch"):
            stock = conv_bn_act(x, w, scale, shift, residual=res, **kw)
    ref = conv_bn_act_ref(x.cpu(), w.cpu(), scale.cpu(), shift.cpu(),
                          residual=None if res is None else res.cpu(), **kw)
    assert got.dtype == dtype and got.is_contiguous(memory_format=cl)
    assert_within_rule(got.cpu(), stock.cpu(), ref, dtype)
    if conv.groups == 1:  # grouped convs run the cuda path by design; the others must fuse
        why = cudnn.fallback_reason(x, w, res, conv.stride, conv.padding, conv.dilation, 1,
                                    layer.relu)
        assert why == "", why


@components.needs_gpu("cuda-kernels", _gpu_reason)
@pytest.mark.parametrize("relu", [True, False])
def test_gpu_nan_and_inf_as_stock(relu):
    dev = torch.device("cuda")
    cl = torch.channels_last
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    x[0, 3, 4, 4], x[1, 0, 2, 2], x[1, 5, 6, 6] = float("nan"), float("inf"), -float("inf")
    x = x.to(dev, torch.float16).contiguous(memory_format=cl)
    w = (torch.randn(32, 16, 3, 3, generator=gen) / 12).to(dev, torch.float16)
    scale = (torch.rand(32, generator=gen) * 2 - 0.5).to(dev)
    shift = torch.randn(32, generator=gen).to(dev)
    res = torch.randn(2, 32, 9, 9, generator=gen).to(dev, torch.float16).contiguous(
        memory_format=cl)
    with torch.no_grad():
        with resnet_fused.backend("cudnn"):
            got = conv_bn_act(x, w, scale, shift, residual=res, padding=1, relu=relu)
        with resnet_fused.backend("torch"):
            want = conv_bn_act(x, w, scale, shift, residual=res, padding=1, relu=relu)
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(got), test(want)), test.__name__


@components.needs_gpu("cuda-kernels", _gpu_reason)
def test_gpu_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval().cuda().half()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), resnet_fused.backend("cudnn"):
        eager = model(x)
        graphed = resnet_fused.cuda_graphs(model)
        graphed(x)
        torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)
