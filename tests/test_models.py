"""Parity of every builder with torchvision: init, state_dict, eval and train numerics, fuse()."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import components
import resnet_fused
from resnet_fused import layers, training
from numerics import (ATOL, BUILDER_PARAMS, assert_within_rule, max_err,
                      randomize_bn, stock_outputs)

SIZES = [(64, 64), (45, 37)]  # square, and non-square odd


def build_pair(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ours = getattr(resnet_fused, name)(**kwargs)
    torch.manual_seed(seed)
    theirs = getattr(torchvision.models, name)(**kwargs)
    return ours, theirs


@pytest.fixture(scope="module", params=BUILDER_PARAMS)
def pair(request):
    """(ours, torchvision) built under one seed, BN randomised identically, small fc."""
    ours, theirs = build_pair(request.param, num_classes=10)
    for m in (ours, theirs):
        randomize_bn(m, seed=1)
    return request.param, ours, theirs


def test_identical_init_and_names(pair):
    _, ours, theirs = pair
    # Compare fresh builds: `pair` has randomised BN.
    a, b = build_pair(pair[0], num_classes=10)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]


def test_state_dict_round_trip_both_ways(pair):
    _, ours, theirs = pair
    fresh_ours, fresh_theirs = build_pair(pair[0], seed=5, num_classes=10)
    fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[k], v)
        assert torch.equal(fresh_theirs.state_dict()[k], v)


def _input(size, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=g, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("size", SIZES)
def test_eval_parity(pair, size):
    """fp64 within 1e-10 relative of torchvision; fp32 within the numerics rule (docs/design.md)
    (vs fp64 ref)."""
    _, ours, theirs = pair
    ours64, theirs64 = copy.deepcopy(ours).double().eval(), copy.deepcopy(theirs).double().eval()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for channels_last in (False, True):
            x64 = _input(size, torch.float64, channels_last)
            ref = theirs64(x64)
            # fp64 is the slow part on CPU: one layout per size, the other layout at the other size.
            if channels_last == (size == SIZES[1]):
                rel = max_err(ours64(x64), ref) / ref.abs().max().item()
                assert rel <= 1e-10, f"fp64 relative error {rel:.2e}"
            x32 = x64.float()
            assert_within_rule(ours(x32), stock_outputs(theirs, x32), ref, torch.float32)


def _train_steps(model, x, target, steps, teacher=None, keep_grads=True, on_grads=None):
    """SGD steps; return per-step (output, loss, gradients) and, without a teacher, the
    parameters each step started from. With `teacher` (such a list from the reference run) every
    step starts from the teacher's parameters, while running stats, num_batches_tracked and
    momentum buffers accumulate: free-running trajectories are ill-conditioned (a
    rounding-level difference in step 1 grows past 1e-10 relative by step 2 for any two fp64
    implementations). `on_grads(step, model)` sees each step's gradients in place.
    (Taught runs keep no starts and callers check gradients as they come where they can: a
    parameter copy per step is GBs for the wide models, and two of those tests at once on the
    24 GiB CI machine ran out of memory.)"""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    history, starts = [], []
    for i in range(steps):
        with torch.no_grad():
            if teacher is not None:
                for p, t in zip(model.parameters(), teacher[i]):
                    p.copy_(t)
            else:
                starts.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, target)
        loss.backward()
        if on_grads is not None:
            on_grads(i, model)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()} if keep_grads else {}
        history.append((out.detach(), loss.detach(), grads))  # grads: GBs for the wide models
        opt.step()
    return history, starts


def _check_train(ours, theirs, ref, dtype, x, target, steps=2):
    """Outputs, losses, every gradient and all buffers after `steps` steps."""
    stock_cl = copy.deepcopy(theirs) if dtype != torch.float64 else None
    fp64 = dtype == torch.float64  # only fp64 gradients are compared here (check_grads)
    h_ref, teacher = _train_steps(ref.train(), x.double(), target, steps, keep_grads=fp64)

    def check(a, stock, r):
        if dtype == torch.float64:
            scale = max(r.abs().max().item(), 1e-30)
            assert max_err(a, r) / scale <= 1e-10
        else:
            assert_within_rule(a, stock, r, dtype)

    def check_grads(step, model):
        # Every gradient, in fp64 (1e-10). fp32 gradients are compared per ReLU branch in
        # tests/test_train.py: a ReLU input within rounding of 0 may flip in any fp32 run and
        # move a gradient by a whole term, so a per-tensor max error is no yardstick there.
        for n, p in model.named_parameters():
            check(p.grad, [], h_ref[step][2][n])
    h_ours, _ = _train_steps(ours.train(), x, target, steps, teacher, keep_grads=False,
                             on_grads=check_grads if fp64 else None)
    if ref is theirs:  # fp64: torchvision itself is the reference
        h_stock = [[] for _ in h_ref]
    else:  # fp32: stock in both standard layouts is the yardstick (numerics.stock_outputs)
        h_theirs, _ = _train_steps(theirs.train(), x, target, steps, teacher, keep_grads=False)
        h_cl, _ = _train_steps(stock_cl.train(), x.contiguous(memory_format=torch.channels_last),
                               target, steps, teacher, keep_grads=False)
        h_stock = [[a, b] for a, b in zip(h_theirs, h_cl)]

    for mine, stock, r in zip(h_ours, h_stock, h_ref):
        check(mine[0], [s[0] for s in stock], r[0])   # output
        if dtype == torch.float64:
            check(mine[1], [], r[1])   # loss
        else:
            # The loss is one number, a batch mean of cross-entropies: |dL/dout|_1 <= 2 per
            # sample, so its error is at most twice the outputs' allowed error (the rule's bound
            # on them) plus its own rounding. Stock's error on one number is luck, no yardstick
            # (resnet34 fp32, step 2: stock's loss 2.2e-7 off with its outputs 8.2e-6 off).
            out_bound = (2 * max(max_err(s[0], r[0]) for s in stock)
                         + ATOL[dtype] * max(1.0, r[0].abs().max().item()))
            loss_err, ref_loss = max_err(mine[1], r[1]), abs(r[1].item())
            assert loss_err <= 2 * out_bound + ATOL[dtype] * max(1.0, ref_loss), (
                f"loss error {loss_err:.3e} > 2 x the outputs' bound {out_bound:.3e} + atol")
    bufs_ours, bufs_theirs = dict(ours.named_buffers()), dict(theirs.named_buffers())
    bufs_cl = dict(stock_cl.named_buffers()) if stock_cl is not None else {}
    for n, r in ref.named_buffers():
        if r.dtype == torch.long:  # num_batches_tracked
            assert torch.equal(bufs_ours[n], r) and torch.equal(bufs_theirs[n], r)
        else:
            check(bufs_ours[n], [bufs_theirs[n]] + ([bufs_cl[n]] if bufs_cl else []), r)


# Train parity runs 2-4 models through forward, backward and SGD steps: the CI budget (2 cores)
# allows 64x64 for the builders up to depth 50 and 33x33 for the 101/152-layer ones, whose blocks
# are the same code as their depth-50 twins. 33x33 keeps layer4 at 2x2 (8 values per channel for
# the batch statistics at batch 2); at 32x32 layer4 is 1x1 and BN over 2 values is so
# ill-conditioned that rounding-level input changes move fp64 gradients past 1e-10.
TRAIN_SIZE = {"resnet101": (33, 33), "resnet152": (33, 33), "resnext101_32x8d": (33, 33),
              "resnext101_64x4d": (33, 33), "wide_resnet101_2": (33, 33)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_train_parity(pair, dtype):
    name, ours, theirs = pair
    ours, theirs = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
    ref = theirs if dtype == torch.float64 else copy.deepcopy(theirs).double()
    x = _input(TRAIN_SIZE.get(name, (64, 64)), dtype, channels_last=False, seed=2)
    target = torch.tensor([3, 7])
    _check_train(ours, theirs, ref, dtype, x, target)


def test_train_parity_momentum_none_channels_last():
    """Cumulative-average running stats (momentum=None) and channels_last input, fp64."""
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731
    ours, theirs = build_pair("resnet18", num_classes=10, norm_layer=norm)
    for m in (ours, theirs):
        randomize_bn(m, seed=3)
    ours, theirs = ours.double(), theirs.double()
    x = _input((45, 37), torch.float64, channels_last=True, seed=4)
    _check_train(ours, theirs, theirs, torch.float64, x, torch.tensor([1, 2]), steps=3)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_eval_gradients_match(name, backend, monkeypatch):
    """Eval mode with autograd on (frozen-BN fine-tuning) vs torchvision, fp64. `auto` runs
    stock's modules for fp64; an explicit backend runs layers.grad_chain (stock's conv, then
    bn_eval_act and its backward kernel)."""
    ours, theirs = build_pair(name, num_classes=10)
    for m in (ours, theirs):
        randomize_bn(m, seed=7)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = _input((64, 64), torch.float64, channels_last=True, seed=6).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    calls = []
    original = layers.grad_chain
    monkeypatch.setattr(layers, "grad_chain", lambda *a: calls.append(1) or original(*a))
    with resnet_fused.backend(backend):
        ours(x).square().sum().backward()
    theirs(x2).square().sum().backward()
    n_chains = sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert len(calls) == (0 if backend == "auto" else n_chains)
    pairs = [(x.grad, x2.grad)] + [(p.grad, q.grad) for p, q in
                                   zip(ours.parameters(), theirs.parameters())]
    for a, b in pairs:
        assert max_err(a, b) <= 1e-10 * max(b.abs().max().item(), 1e-30)


CPU_FP32, RESNET18 = ("cpu", torch.float32), ("BasicBlock", 1, 64)


def test_layout_where_autograd_records(monkeypatch):
    """Eval mode: activations go channels_last for the fused kernels (cached, prepared weights),
    except where autograd records on an NCHW model: its chains run stock's conv on the module's
    own weights, so the activations stay as given (no weight reorder per conv and call for
    NCHW input) unless they are large enough to repay it, as in training; a channels_last
    model gets channels_last activations either way."""
    model = resnet_fused.resnet18(num_classes=10).eval()
    x = _input((32, 32), torch.float32, channels_last=False)
    seen = []
    original = layers.F.conv2d
    monkeypatch.setattr(layers.F, "conv2d", lambda inp, *a, **k: seen.append(
        inp.is_contiguous(memory_format=torch.channels_last)) or original(inp, *a, **k))
    with resnet_fused.backend("torch"):
        model(x)  # grad enabled, parameters require grad: stock convs, NCHW throughout
        assert seen and not all(seen)  # (1x1 maps are both layouts)
        seen.clear()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            assert model._wants_channels_last(x)
        assert model._wants_channels_last(x)  # (nothing records: the cached path)
        for p in model.parameters():
            p.requires_grad_(True)
        assert not model._wants_channels_last(x)
        model(x.contiguous(memory_format=torch.channels_last))  # as given, as stock runs it
        assert seen and all(seen)
        seen.clear()
        # large activations (here: from 2 images of 32x32) go channels_last: the convs' gain
        # repays their weights' reorders
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        monkeypatch.setitem(training.GRAD_CHANNELS_LAST_FROM, CPU_FP32, {("Bottleneck", 1, 64): 1})
        assert not model._wants_channels_last(x)  # (measured per design)
        assert resnet_fused.fuse(torchvision.models.resnet50())._design() == ("Bottleneck", 1, 64)
        monkeypatch.setitem(training.GRAD_CHANNELS_LAST_FROM, CPU_FP32, {RESNET18: pixels})
        assert model._wants_channels_last(x)
        assert not model._wants_channels_last(x[:1])
        assert not model._wants_channels_last(x.double())  # (measured for fp32 only)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not model._wants_channels_last(x)
        model(x)
        assert seen and all(seen)
        seen.clear()
        model.train()  # training runs stock's convs on the module's weights too: the same rule
        assert model._wants_channels_last(x) and not model._wants_channels_last(x[:1])
        with torch.no_grad():
            assert not model._wants_channels_last(x[:1])
        model(x)
        assert seen and all(seen)
        seen.clear()
        model(x[:, :, :16, :16].contiguous())  # 2x16x16: below the size, as given
        assert seen and not all(seen)
        seen.clear()
        model.eval()
        monkeypatch.setitem(training.GRAD_CHANNELS_LAST_FROM, CPU_FP32, {RESNET18: pixels + 1})
        model = model.to(memory_format=torch.channels_last)
        assert model._wants_channels_last(x)
        model(x)
        assert seen and all(seen)


def test_fuse_shares_tensors_and_matches(pair):
    name, _, theirs = pair
    tv = copy.deepcopy(theirs).eval()
    fused = resnet_fused.fuse(tv)
    assert isinstance(fused, resnet_fused.ResNet)
    assert type(tv) is torchvision.models.ResNet  # the original is left as it was
    for (n, p), (m, q) in zip(fused.state_dict(keep_vars=True).items(),
                              tv.state_dict(keep_vars=True).items()):
        assert n == m and p is q
    x = _input((64, 64), torch.float32, channels_last=False)
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        assert_within_rule(fused(x), stock_outputs(tv, x), ref, torch.float32)
        # A change to the torchvision model is seen by the fused one (shared, not copied).
        tv.fc.bias.add_(1.0)
        tv.layer1[0].bn1.running_var.mul_(3.0)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_within_rule(fused(x), stock_outputs(tv, x), ref, torch.float32)


def test_fuse_rejects_other_models():
    with pytest.raises(TypeError, match="expected a torchvision.models.ResNet, got"):
        resnet_fused.fuse(torchvision.models.alexnet())


@pytest.mark.parametrize("name,blocks,convs_per_block,downsamples", [
    ("resnet18", 8, 2, 3), ("resnet50", 16, 3, 4), ("resnext50_32x4d", 16, 3, 4)])
def test_eval_runs_one_fused_op_per_chain(name, blocks, convs_per_block, downsamples,
                                          monkeypatch):
    """Eval: every conv->BN(->add)->ReLU chain is one conv_bn_act; no stock conv/BN module runs."""
    from resnet_fused import ops
    calls = []
    real = ops.run  # every conv_bn_act, through the custom op or directly, ends here
    monkeypatch.setattr(ops, "run", lambda *a: calls.append(a[1:]) or real(*a))

    def refuse(self, *args):
        raise AssertionError(f"stock {type(self).__name__} ran in the fused eval path")

    model = getattr(resnet_fused, name)(num_classes=10).eval()
    monkeypatch.setattr(nn.BatchNorm2d, "forward", refuse)
    monkeypatch.setattr(nn.Conv2d, "forward", refuse)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 1 + blocks * convs_per_block + downsamples  # 20 / 53 / 53
    assert sum(a[2] is not None for a in calls) == blocks  # last conv of a block adds the residual
    assert sum(not a[-1] for a in calls) == downsamples    # downsample: relu=False


def test_auto_runs_stock_ops_where_the_backend_does_not_win(monkeypatch):
    """CPU fp16: the onednn backend would hand the chain to the stock composition (slower than
    stock's own modules), so `auto` runs stock's conv -> BN -> ReLU on the cached channels_last
    weight: torchvision's exact numbers in fp16. fp32 stays fused; an explicit backend is
    honoured."""
    from resnet_fused import backends, ops
    if backends.device_choice(torch.device("cpu")) != "onednn":
        components.require("onednn", backends.unavailable_reason("onednn", torch.device("cpu"))
                           or "auto does not pick onednn here")
    calls = []
    real = ops.run
    monkeypatch.setattr(ops, "run", lambda *a: calls.append(a[0]) or real(*a))
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    ours = resnet_fused.resnet18(num_classes=10).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    half = torch.float16
    with torch.no_grad():
        out = ours.to(half)(x.to(half))
        assert calls == []
        want = tv.to(half).to(memory_format=torch.channels_last)(
            x.to(half).contiguous(memory_format=torch.channels_last))
        assert torch.equal(out, want)
        with resnet_fused.backend("onednn"):
            ours(x.to(half))
        assert calls == ["onednn"] * 20
        calls.clear()
        ours.float()(x)
        assert calls == ["onednn"] * 20
