"""Training stages as one recomputing node (resnet_fused/stage_recompute.py): bitwise the
per-chain path's outputs, gradients and buffers (which test_train.py holds to torchvision), keeping
about two thirds of the bytes for the backward pass; and the per-chain path wherever the node
cannot be told apart from it (hooks, autocast, no grad, other modules, the switch).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import extension, extension_ops, stage_recompute, training
import components
from numerics import randomize_bn

pytestmark = components.needs("extension", extension.unavailable_reason("cpu"))

SIZE = (33, 33)


class Count:
    """Counts the calls of module.name."""
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


def build(name, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = getattr(resnet_fused, name)(num_classes=10, **kwargs)
    randomize_bn(model, seed=seed + 1)
    return model.to(dtype).train()


def step(model, x, memory, monkeypatch):
    """One forward + backward with $RESNET_FUSED_TRAIN_MEMORY=memory: output, grads (params and
    input), buffers."""
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, memory)
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if x.requires_grad:
        grads["input"] = x.grad
    return out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


def assert_bitwise(a, b):
    (oa, ga, ba), (ob, gb, bb) = a, b
    assert torch.equal(oa, ob), "output"
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        assert ga[n] is None or torch.equal(ga[n], gb[n]), f"grad {n}: max diff " \
            f"{(ga[n] - gb[n]).abs().max().item():.3e}"
    for n in ba:
        assert torch.equal(ba[n], bb[n]), n


def compare(model, x, monkeypatch, stages):
    """The recomputing model against a copy run per chain: bitwise, `stages` nodes ran, and the
    fused BatchNorm kernel ran as often (the recompute applies the forward's factors: no second
    statistics pass)."""
    saved = copy.deepcopy(model)
    nodes = Count(monkeypatch, stage_recompute, "run")
    kernels = Count(monkeypatch, extension_ops, "bn_act_train")
    ours = step(model, x, "recompute", monkeypatch)
    assert nodes.calls == stages
    recompute_kernels, kernels.calls = kernels.calls, 0
    assert_bitwise(ours, step(saved, x, "save", monkeypatch))
    assert nodes.calls == stages and kernels.calls == recompute_kernels


@pytest.mark.parametrize("bn", ["fused", "stock"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_bitwise_per_chain(name, dtype, layout, bn, monkeypatch):
    """Both BatchNorm kernels (the policy's two choices), both layouts: outputs, every grad,
    running statistics and num_batches_tracked are the per-chain path's, bit for bit."""
    monkeypatch.setenv(training.TRAIN_BN_ENV, bn)
    model = build(name, dtype)
    x = torch.randn(2, 3, *SIZE, dtype=dtype)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare(model, x, monkeypatch, stages=4)


def test_bitwise_mixed_kernels(monkeypatch):
    """A policy threshold between a bottleneck's widths: in each stage some chains run the fused
    kernel (recomputed) and some stock BatchNorm (their outputs kept), inner chains and block
    outputs alike; still bitwise the per-chain path."""
    monkeypatch.setenv(training.TRAIN_BN_ENV, "auto")
    dtypes, _ = training.MEASURED_FASTER["cpu"]
    monkeypatch.setitem(training.MEASURED_FASTER, "cpu", (dtypes, (30000, 30000)))
    model = build("resnext50_32x4d", torch.float64)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    kernels = Count(monkeypatch, extension_ops, "bn_act_train")
    model(x)
    assert 0 < kernels.calls < 53  # (both kinds ran)
    compare(model, x, monkeypatch, stages=4)


def _strip(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.affine, m.track_running_stats = False, False
            m.weight, m.bias = None, None
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
    return model


@pytest.mark.parametrize("bn", ["fused", "stock"])
def test_bitwise_variants(bn, monkeypatch):
    """momentum=None (cumulative), BN without affine or running stats, frozen parameters, an
    input that requires grad, dilation (replace_stride_with_dilation), zero_init_residual: each
    bitwise the per-chain path, over two steps where state carries."""
    monkeypatch.setenv(training.TRAIN_BN_ENV, bn)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731
    model = build("resnet18", torch.float64, norm_layer=norm)
    for _ in range(2):
        compare(model, x, monkeypatch, stages=4)
    compare(_strip(build("resnet18", torch.float64, seed=1)), x, monkeypatch, stages=4)
    frozen = build("resnet50", torch.float64, seed=2, zero_init_residual=True,
                   replace_stride_with_dilation=[False, True, True])
    frozen.layer1[0].conv1.weight.requires_grad_(False)
    frozen.layer2[0].bn3.bias.requires_grad_(False)
    frozen.layer3[0].downsample[1].weight.requires_grad_(False)
    compare(frozen, x.requires_grad_(), monkeypatch, stages=4)
    for p in frozen.parameters():  # nothing needs a grad but the input: still one node each
        p.requires_grad_(False)
    compare(frozen, x, monkeypatch, stages=4)


def saved_bytes(model, x):
    """Bytes of the distinct activation storages autograd keeps (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_keeps_two_thirds(monkeypatch):
    """resnet50: what the training step keeps for backward, against torchvision's (exact byte
    counts; benchmarks/train_memory.py measures 224x224): with fused BatchNorm the stages keep
    their inputs, outputs and conv outputs only; chains with stock BatchNorm keep what the
    per-chain path keeps."""
    torch.manual_seed(0)
    ours, theirs = resnet_fused.resnet50().train(), torchvision.models.resnet50().train()
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "save")
    theirs_bytes = saved_bytes(theirs, x)
    assert abs(saved_bytes(ours, x) / theirs_bytes - 1) < 0.01  # (BN stats differ)
    monkeypatch.setenv(training.TRAIN_BN_ENV, "fused")  # (64x64 maps: below the policy's sizes)
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "recompute")
    ratio = saved_bytes(ours, x) / theirs_bytes
    assert ratio <= 0.70, ratio
    monkeypatch.setenv(training.TRAIN_BN_ENV, "stock")  # outputs kept: the per-chain bytes
    recompute = saved_bytes(ours, x)
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "save")
    assert recompute <= saved_bytes(ours, x)


def test_per_chain_where_the_node_would_show(monkeypatch):
    """Hooks in a stage, autocast, no grad, eval, a block subclass, an unknown setting."""
    model = build("resnet18", torch.float32)
    x = torch.randn(2, 3, *SIZE)
    counter = Count(monkeypatch, stage_recompute, "run")
    monkeypatch.delenv(stage_recompute.MEMORY_ENV, raising=False)
    model(x).sum().backward()  # the default keeps torchvision's saved tensors: per chain
    assert counter.calls == 0
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "recompute")
    seen = []
    handle = model.layer2[1].bn1.register_forward_hook(lambda m, i, o: seen.append(1))
    model(x).sum().backward()
    assert counter.calls == 3 and seen == [1]  # layer2 per chain: its hook fired
    handle.remove()
    handle = model.layer3.register_forward_pre_hook(lambda m, i: seen.append(2))
    model(x).sum().backward()
    assert counter.calls == 6 and seen == [1, 2]
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    with torch.no_grad():
        model(x)
    model.eval()(x).sum().backward()
    assert counter.calls == 6
    model.train()

    class MyBlock(resnet_fused.models.resnet.BasicBlock):
        pass
    model.layer4[1].__class__ = MyBlock
    model(x).sum().backward()
    assert counter.calls == 9
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "sometimes")
    with pytest.raises(ValueError, match="RESNET_FUSED_TRAIN_MEMORY='sometimes': expected one of "
                                         "save, recompute"):
        model(x)


def test_backward_errors_as_autograd(monkeypatch):
    """An in-place parameter update between forward and backward is caught (version counter),
    double backward is refused; the model keeps working."""
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, "recompute")
    model = build("resnet18", torch.float64)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    out = model(x).sum()
    with torch.no_grad():
        model.layer1[0].conv1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    g = torch.autograd.grad(model(x).sum(), model.layer1[0].conv1.weight, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        g.sum().backward()
    model(x).sum().backward()


def test_memory_setting_and_report(monkeypatch):
    """save (the default) and recompute, whitespace and case forgiven; `info` says which."""
    monkeypatch.delenv(stage_recompute.MEMORY_ENV, raising=False)
    assert stage_recompute.memory_setting() == "save"
    assert stage_recompute.memory_report().startswith("saved as torchvision saves")
    monkeypatch.setenv(stage_recompute.MEMORY_ENV, " Recompute ")
    assert stage_recompute.memory_setting() == "recompute"
    assert "RESNET_FUSED_TRAIN_MEMORY=recompute: stages keep their conv outputs" in \
        stage_recompute.memory_report()
