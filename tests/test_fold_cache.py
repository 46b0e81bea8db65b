"""The fold cache is never stale, never in the state_dict, and survives copy/pickle/.to()."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import fold as fold_mod
from numerics import assert_within_rule, randomize_bn, stock_outputs


@pytest.fixture
def models():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=2).eval()
    return resnet_fused.fuse(tv), tv


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def check(fused, tv, x=X):
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        dtype = next(tv.parameters()).dtype
        out = fused(x.to(dtype))
        if dtype == torch.float64:
            assert torch.allclose(out, ref, rtol=1e-10, atol=0)
        else:
            assert_within_rule(out, stock_outputs(tv, x.to(dtype)), ref, dtype)
    return out


def test_cache_is_used_and_not_in_state_dict(models):
    fused, tv = models
    check(fused, tv)
    entries = fold_mod.entries_for(fused.conv1)
    assert len(entries) == 1
    first = next(iter(entries.values()))
    check(fused, tv)
    assert next(iter(fold_mod.entries_for(fused.conv1).values())) is first  # reused
    assert list(fused.state_dict()) == list(tv.state_dict())


def test_optimizer_step_between_eval_calls(models):
    fused, tv = models
    before = check(fused, tv)
    opt = torch.optim.SGD(fused.parameters(), lr=1e-2)
    fused(X).square().mean().backward()  # eval-mode gradients flow through the fused op
    opt.step()
    after = check(fused, tv)  # tv shares the parameters and sees the step
    assert not torch.allclose(before, after)


def test_train_step_updates_running_stats(models):
    fused, tv = models
    check(fused, tv)
    fused.train()
    with torch.no_grad():
        fused(X * 3 + 1)  # running stats move
    fused.eval()
    check(fused, tv)


def test_load_state_dict_in_place(models):
    fused, tv = models
    check(fused, tv)
    torch.manual_seed(9)
    other = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=5)
    fused.load_state_dict(other.state_dict())
    check(fused, other.eval())


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64),
                                     lambda m: m.half().float()])
def test_dtype_changes(models, convert):
    fused, tv = models
    check(fused, tv)
    convert(fused)  # tv shares modules, so it converts too
    check(fused, tv)


def test_parameter_data_swap(models):
    """`.data =` assignment replaces the memory: a new pointer, the version alone could match."""
    fused, tv = models
    check(fused, tv)
    w = fused.layer1[0].conv1.weight
    w.data = w.data * 0.5
    check(fused, tv)


def test_deepcopy_pickle_save(models):
    fused, tv = models
    check(fused, tv)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        check(clone, tv)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    check(torch.load(buf, weights_only=False), tv)


def test_input_layouts(models):
    fused, tv = models
    check(fused, tv, X.contiguous(memory_format=torch.channels_last))
    check(fused, tv, X.transpose(2, 3).contiguous().transpose(2, 3))
    check(fused, tv, torch.stack([X, X], 2)[:, :, 0])  # non-contiguous view


def test_inference_mode_then_autograd(models):
    """A fold cached under inference_mode must not leak into an autograd call afterwards."""
    fused, tv = models
    for p in fused.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        fused(X)
    x = X.clone().requires_grad_()
    fused(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _RecordingDict(dict):
    """A module's _parameters/_buffers that records which entries are read."""

    def __init__(self, items, read):
        super().__init__(items)
        self.read = read

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


class _Recorder:
    """Stands in for a module and records which attributes (parameters, buffers) are read."""

    def __init__(self, module):
        read = set()
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "read", read)
        object.__setattr__(self, "_parameters", _RecordingDict(module._parameters, read))
        object.__setattr__(self, "_buffers", _RecordingDict(module._buffers, read))

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._module, name)


def _fold_inputs(conv, bn):
    """Every attribute of conv and bn that building a fold reads (found by running the fold)."""
    rc, rb = _Recorder(conv), _Recorder(bn)
    with torch.no_grad():
        fold_mod.fold(rc, rb, torch.float32, "torch")
    fold_mod.clear_cache()
    return [(conv, name) for name in sorted(rc.read)] + [(bn, name) for name in sorted(rb.read)]


def test_every_input_of_the_fold_is_tracked(models):
    """Change each thing the fold reads, in place, after the cache is warm: the next call must
    see it. The inputs are enumerated by running the fold, so a field a future fold reads cannot
    be forgotten here (it would show up as a read this test changes)."""
    fused, tv = models
    conv, bn = fused.layer1[0].conv1, fused.layer1[0].bn1
    bn.running_var.fill_(0.7)  # some eps changes must move the result visibly
    inputs = _fold_inputs(conv, bn)
    assert {name for _, name in inputs} >= {"weight", "running_mean", "running_var", "eps"}
    for module, name in inputs:
        check(fused, tv)
        value = getattr(module, name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                if value.dtype.is_floating_point:
                    value.mul_(1.5).add_(0.25)
                else:  # num_batches_tracked: what a training forward changes
                    value.add_(1)
        elif isinstance(value, float):
            setattr(module, name, value * 10 + 0.1)
        else:
            pytest.fail(f"the fold reads {type(module).__name__}.{name} = {value!r}: teach the "
                        f"cache (fold.sources / its stamp) and this test about it")
        check(fused, tv)  # tv shares the modules: fails if the cache served the old fold


def test_bn_swapped_for_a_new_module(models):
    fused, tv = models
    check(fused, tv)
    torch.manual_seed(3)
    new = randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(64)), seed=7)[0].eval()
    fused.layer1[0].bn1 = new
    tv.layer1[0].bn1 = new
    check(fused, tv)
