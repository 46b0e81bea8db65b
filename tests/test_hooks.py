"""Hooks and swapped modules behave as in torchvision, in eval and train alike.

A chain whose conv, BN or ReLU module has a hook (forward, pre-forward, backward), or while a
global module hook is registered, runs the module sequence, so every hook fires as often as in
torchvision and a hook that changes a value changes the output the same way. An activation that
is not nn.ReLU (a user swapped `block.relu`) runs as the module it is.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from numerics import assert_within_rule, randomize_bn, stock_outputs

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pair(dtype=torch.float32):
    """(ours, torchvision) with the same randomised weights; float64 where a test compares
    semantics (the fused fp64 path is exact, so any difference is a semantic one)."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10))
    ours = resnet_fused.resnet18(num_classes=10)
    ours.load_state_dict(tv.state_dict())
    return ours.to(dtype), tv.to(dtype)


def _same(out, want):
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)


def _hook_everything(model, kind, counts, scale_bn1=False):
    names = {"conv": "layer1.0.conv1", "bn": "layer1.0.bn1", "relu": "layer2.0.relu"}
    for role, name in names.items():
        module = model.get_submodule(name)
        if kind == "forward":
            def hook(mod, inp, out, role=role):
                counts[role] += 1
                if role == "bn" and scale_bn1:
                    return out * 0.5  # changes the value downstream
            module.register_forward_hook(hook)
        else:
            def pre(mod, inp, role=role):
                counts[role] += 1
            module.register_forward_pre_hook(pre)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_module_hooks_fire_and_act(training, kind):
    ours, tv = _pair(torch.float64)
    ours.train(training)
    tv.train(training)
    got, want = Counter(), Counter()
    _hook_everything(ours, kind, got, scale_bn1=True)
    _hook_everything(tv, kind, want, scale_bn1=True)
    with torch.no_grad():
        out, stock = ours(X.double()), tv(X.double())
    assert got == want and got["relu"] == 2  # BasicBlock calls its relu twice
    _same(out, stock)


def test_global_forward_hook_sees_every_module_call():
    ours, tv = _pair()
    ours.eval()
    tv.eval()
    seen = {}
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: seen.setdefault(id(mod), []).append(type(mod).__name__))
    try:
        with torch.no_grad():
            ours(X)
            ours_calls = Counter(n for calls in seen.values() for n in calls)
            seen.clear()
            tv(X)
            tv_calls = Counter(n for calls in seen.values() for n in calls)
    finally:
        handle.remove()
    assert ours_calls == tv_calls and ours_calls["Conv2d"] == 20
    with torch.no_grad():  # and the fused path is back once the hook is gone
        ref = copy.deepcopy(tv).double()(X.double())
        assert_within_rule(ours(X), stock_outputs(tv, X), ref, torch.float32)


def test_swapped_activation_runs_as_itself():
    ours, tv = _pair(torch.float64)
    ours.eval()
    tv.eval()
    for model in (ours, tv):
        model.layer1[0].relu = nn.Hardtanh(-0.5, 0.5)
        model.relu = nn.LeakyReLU(0.1)
    with torch.no_grad():
        _same(ours(X.double()), tv(X.double()))


def test_hooks_removed_fused_again(monkeypatch):
    from resnet_fused import ops
    ours, _ = _pair()
    ours.eval()
    handle = ours.layer1[0].conv1.register_forward_hook(lambda *a: None)
    calls = []
    real = ops.run
    monkeypatch.setattr(ops, "run", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ours(X)
    assert len(calls) == 19  # 20 chains, one runs its modules
    handle.remove()
    calls.clear()
    with torch.no_grad():
        ours(X)
    assert len(calls) == 20
