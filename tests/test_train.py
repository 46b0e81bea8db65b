"""Train mode through the extension: BN(+residual)(+ReLU) runs as resnet_fused::bn_act_train and
several optimizer steps match torchvision -- outputs, losses, every gradient, running stats
(momentum and momentum=None) and num_batches_tracked. fp64 within 1e-10; fp32 by the numerics rule
(docs/design.md).
"""
from __future__ import annotations

import copy
import functools
import statistics
import sys
import types

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import extension, extension_ops, training
import components
from numerics import ATOL, assert_within_rule, max_err, randomize_bn

# Missing or stale: skipped locally, a failure under strict mode (CI) unless opted out.
pytestmark = components.needs("extension", extension.unavailable_reason("cpu"))

# The bottleneck builders are slow (`make test-all`; ~20 s each on 2 workers): resnet18 runs
# every kind of BN chain (with ReLU, + residual + ReLU, the downsample's BN without ReLU), and
# tests/test_models.py's train parity runs resnet50's and resnext50's under the default policy.
BUILDERS = ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
            pytest.param("resnext50_32x4d", marks=pytest.mark.slow)]
SIZE = (33, 33)   # small and fast; layer4 still has 2x2 maps (8 values per channel at batch 2)


@pytest.fixture(autouse=True)
def _fused_kernels(monkeypatch):
    """These tests check the kernels' semantics at small sizes, where the policy would pick
    stock BatchNorm: force them (the policy has its own tests, test_policy_*)."""
    monkeypatch.setenv(training.TRAIN_BN_ENV, "fused")


def build_pair(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    ours = getattr(resnet_fused, name)(num_classes=10, **kwargs)
    torch.manual_seed(seed)
    theirs = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    for m in (ours, theirs):
        randomize_bn(m, seed=seed + 1)
    return ours, theirs


def batch(dtype, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *SIZE, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (2,), generator=g)


class CountFused:
    """Counts the fused training steps of BatchNorm (batch_norm_act_factors: bn_act_train with
    the running-stat update) made by the model's train path, per chain or per stage."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = training.batch_norm_act_factors

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(training, "batch_norm_act_factors", counted)


def n_batchnorms(model):
    return sum(type(m) is nn.BatchNorm2d for m in model.modules())


def forward_backward(model, x, target):
    for p in model.parameters():
        p.grad = None
    out = model(x)
    loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def step(model, opt, x, target):
    result = forward_backward(model, x, target)
    opt.step()
    return result


def assert_fp64_equal(a, b, what):
    scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
    err = max_err(a, b) / scale
    assert err <= 1e-10, f"{what}: fp64 relative error {err:.2e} > 1e-10"


def check_buffers(ours, theirs, check):
    b_ours = dict(ours.named_buffers())
    for n, ref in theirs.named_buffers():
        if ref.dtype == torch.long:  # num_batches_tracked: exact
            assert torch.equal(b_ours[n], ref), n
        else:
            check(b_ours[n], ref, n)


class ReluMasks:
    """Where each ReLU of one forward pass was positive, in call order: torchvision's nn.ReLU
    modules (hooks) or our fused chains with relu=True (bn_act_train through
    batch_norm_act_factors, per chain or per stage)."""

    def __init__(self, monkeypatch):
        self.masks, self.recording = [], False
        original = training.batch_norm_act_factors

        def recording(bn, x, residual, relu):
            out, factors = original(bn, x, residual, relu)
            if relu and self.recording:
                self.masks.append(out.detach() > 0)
            return out, factors
        monkeypatch.setattr(training, "batch_norm_act_factors", recording)

    def record(self, model, fn, hooks=True):
        """hooks=False for our model: a hook on its ReLU would make the chain run the module
        sequence (as torchvision, see test_hooks.py), not the fused path under test."""
        self.masks, self.recording = [], True
        hooks = [m.register_forward_hook(lambda mod, i, o: self.masks.append(o.detach() > 0)
                                         if self.recording else None)
                 for m in model.modules() if hooks and isinstance(m, nn.ReLU)]
        try:
            return fn(), self.masks
        finally:
            self.recording = False
            for h in hooks:
                h.remove()


def same_masks(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def on_branch(ref, masks, x, target):
    """Gradients of torchvision fp64 (a copy: running stats untouched) on the piecewise-linear
    branch that `masks` select: each ReLU passes exactly where its mask is set. Rounding in a
    low-precision run can flip a ReLU whose input is within noise of 0; that moves the gradient
    by a whole term (the forward barely moves), for stock and fused alike. Comparing each run
    with its own branch measures rounding error, not which side of 0 a near-zero value fell."""
    model = copy.deepcopy(ref)
    todo = iter(masks)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
            m.register_forward_hook(lambda mod, i, o: i[0] * next(todo).to(i[0].dtype))
    return forward_backward(model, x, target)[2]


def _batch_norm_of_stock_ops(self, x):
    """Training-mode BatchNorm2d as a composition of stock ops (no running-stat update)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
    return y


def with_stock_op_batch_norm(model):
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.forward = types.MethodType(_batch_norm_of_stock_ops, m)
    return model


def train_and_compare(name, monkeypatch, steps=3, channels_last=False, **kwargs):
    """SGD (momentum, weight decay) steps for ours and torchvision in fp64 and fp32, each step
    compared with torchvision fp64: outputs, losses, every gradient, the stepped parameters and
    all buffers. fp64 within 1e-10 relative. fp32 by the numerics rule (docs/design.md),
    err <= 2 * err(stock) + atol, with the stock error the worst of four stock fp32 runs --
    torchvision, and torchvision with BN composed of stock ops, each in NCHW and in channels_last --
    and gradients measured on each run's own ReLU branch (see on_branch). Gradients must meet the
    bound for the median tensor and twice the bound for every tensor: end-to-end fp32 gradient error
    depends on how BN's forward rounds, not only on how much (on resnext50, an fp32 BN forward
    rounded once from fp64 gives 1.6x the gradient error of torch's kernel, median over tensors, up
    to 4x; torch's two layouts agree within 1.4x), so one stock run is no yardstick per tensor.

    Every step starts from torchvision fp64's parameters (teacher forcing); the running stats,
    num_batches_tracked and optimizer state are never reset, so they accumulate over all steps.
    Free-running trajectories are ill-conditioned: a one-ulp change of the input moves resnet50's
    fp64 gradients by ~5e-13 relative, and that difference grows to >1e-10 by the second step
    for any two implementations, torch's own included.
    channels_last applies to the fp32 models (fp64 conv is very slow in NHWC on CPU)."""
    ours, theirs = build_pair(name, **kwargs)
    ref, ours64 = theirs.double().train(), ours.double().train()
    ours32 = copy.deepcopy(ours64).float()
    layouts = (torch.contiguous_format, torch.channels_last) * 2
    stock32 = [copy.deepcopy(ref).float() for _ in range(2)] + \
        [with_stock_op_batch_norm(copy.deepcopy(ref).float()) for _ in range(2)]
    models = (ref, ours64, ours32, *stock32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for m in models]
    fused = CountFused(monkeypatch)
    relus = ReluMasks(monkeypatch)
    for i in range(steps):
        with torch.no_grad():
            for m in models[1:]:
                for p, r in zip(m.parameters(), ref.parameters()):
                    p.copy_(r)
        x, target = batch(torch.float64, seed=i)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        (r_out, r_loss, r_grads), r_masks = relus.record(
            ref, lambda: forward_backward(ref, x, target))
        o_out, o_loss, o_grads = forward_backward(ours64, x, target)
        (f_out, f_loss, f_grads), f_masks = relus.record(
            ours32,
            lambda: forward_backward(ours32, x.float().contiguous(memory_format=fmt), target),
            hooks=False)
        stock = [relus.record(m, lambda m=m, f=f: forward_backward(
                     m, x.float().contiguous(memory_format=f), target))
                 for m, f in zip(stock32, layouts)]
        branches = [(r_masks, r_grads)]

        def grads_on(masks):
            for known, grads in branches:
                if same_masks(masks, known):
                    return grads
            branches.append((masks, on_branch(ref, masks, x, target)))
            return branches[-1][1]
        f_ref = grads_on(f_masks)
        s_refs = [grads_on(masks) for _, masks in stock]
        for m, opt in zip(models, opts):
            if m is ref:
                for n, p in m.named_parameters():
                    p.grad = r_grads[n].clone()
            opt.step()

        def check32(fused_t, stock_ts, ref_t, what, stock_refs=None, slack=1.0):
            """the numerics rule's bound 2 * err(stock) + atol (times `slack`); returns
            err / bound."""
            stock_refs = stock_refs or [ref_t] * len(stock_ts)
            worst = max(max_err(t, r) for t, r in zip(stock_ts, stock_refs))
            bound = 2 * worst + ATOL[torch.float32] * max(1.0, ref_t.abs().max().item())
            err = max_err(fused_t, ref_t)
            assert err <= slack * bound, (f"step {i} {what}: fp32 err {err:.3e} > {slack} x "
                                          f"(2 * stock err {worst:.3e} + atol)")
            return err / bound
        assert_fp64_equal(o_out, r_out, f"step {i} output")
        assert_fp64_equal(o_loss, r_loss, f"step {i} loss")
        check32(f_out, [s[0][0] for s in stock], r_out, "output")
        # The loss is a scalar: one sample of rounding noise, no yardstick on its own. Mean
        # cross-entropy moves by at most 2 * max|d logits|, so it gets the output's bound x 2.
        out_bound = 2 * max(max_err(s[0][0], r_out) for s in stock) + \
            ATOL[torch.float32] * max(1.0, r_out.abs().max().item())
        assert max_err(f_loss, r_loss) <= 2 * out_bound, f"step {i} loss"
        # Gradients: the bound for the median tensor, twice the bound for every tensor.
        ratios = []
        for n in r_grads:
            assert_fp64_equal(o_grads[n], r_grads[n], f"step {i} grad {n}")
            ratios.append(check32(f_grads[n], [s[0][2][n] for s in stock], f_ref[n], f"grad {n}",
                                  [sr[n] for sr in s_refs], slack=2.0))
        assert statistics.median(ratios) <= 1.0, f"step {i}: median gradient err/bound " \
            f"{statistics.median(ratios):.2f} > 1"
        for (n, r), o in zip(ref.named_parameters(), ours64.parameters()):
            assert_fp64_equal(o.detach(), r.detach(), f"step {i} stepped param {n}")
        check_buffers(ours64, ref, lambda a, r, n: assert_fp64_equal(a, r, f"step {i} {n}"))
        stock_bufs = [dict(m.named_buffers()) for m in stock32[:2]]  # the third has none updated
        check_buffers(ours32, ref, lambda a, r, n: check32(a, [b[n] for b in stock_bufs], r, n))
    assert fused.calls == 2 * steps * n_batchnorms(ours)  # every BN ran fused, fp64 and fp32
    return ours64


@pytest.mark.parametrize("name", BUILDERS)
def test_train_steps_match_torchvision(name, monkeypatch):
    train_and_compare(name, monkeypatch)


def test_momentum_none_channels_last(monkeypatch):
    """momentum=None: the cumulative average over num_batches_tracked, as torch; NHWC input."""
    norm = functools.partial(nn.BatchNorm2d, momentum=None)
    ours = train_and_compare("resnet18", monkeypatch, channels_last=True, norm_layer=norm)
    assert all(b.item() == 3 for n, b in ours.named_buffers() if n.endswith("num_batches_tracked"))


def _strip(model):
    """affine=False, track_running_stats=False BN layers (torchvision's init cannot build them)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
            m.affine, m.track_running_stats = False, False
            m.weight, m.bias = None, None
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
    return model


def test_no_affine_no_running_stats(monkeypatch):
    original = build_pair

    def stripped(name, seed=0, **kwargs):
        return tuple(_strip(m) for m in original(name, seed, **kwargs))
    monkeypatch.setattr(sys.modules[__name__], "build_pair", stripped)
    train_and_compare("resnet18", monkeypatch, steps=2)


def train_fp64(ours, theirs, steps):
    """Free-running fp64 steps (short: see train_and_compare on conditioning)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for i in range(steps):
        x, target = batch(torch.float64, seed=i)
        o1, l1, g1 = step(ours, opts[0], x, target)
        o2, l2, g2 = step(theirs, opts[1], x, target)
        assert_fp64_equal(o1, o2, "output")
        for n in g2:
            assert_fp64_equal(g1[n], g2[n], f"grad {n}")


def test_bf16_autocast_train_step(monkeypatch):
    """CPU autocast: bf16 convs, BN on bf16 activations with fp32 parameters, one step."""
    ours, theirs = build_pair("resnet18", seed=6)
    ref = copy.deepcopy(theirs).double().train()
    ours.train(), theirs.train()
    x, target = batch(torch.float32, seed=7)
    fused = CountFused(monkeypatch)
    results = []
    for m in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            loss = nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        results.append((out.float(), loss, {n: p.grad for n, p in m.named_parameters()}))
    out = ref(x.double())
    loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    assert fused.calls == n_batchnorms(ours)
    assert_within_rule(results[0][0], results[1][0], out.detach(), torch.bfloat16)
    assert_within_rule(results[0][1].detach(), results[1][1].detach(), loss.detach(),
                       torch.bfloat16)
    for n, p in ref.named_parameters():
        assert_within_rule(results[0][2][n], results[1][2][n], p.grad, torch.bfloat16, factor=4)
    b_theirs = dict(theirs.named_buffers())
    check_buffers(ours, ref, lambda a, r, n: assert_within_rule(a, b_theirs[n], r, torch.bfloat16))


def test_stock_path_for_other_norm_layers_and_hooks(monkeypatch):
    """SyncBatchNorm, BN subclasses, BN with forward hooks, eval mode: no fused call."""
    ours, theirs = build_pair("resnet18", seed=8)
    ours, theirs = ours.double().train(), theirs.double().train()
    seen = []
    ours.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    theirs.layer1[0].bn1.register_forward_hook(lambda m, i, o: None)
    fused = CountFused(monkeypatch)
    train_fp64(ours, theirs, steps=1)
    assert seen and fused.calls == n_batchnorms(ours) - 1

    class MyBN(nn.BatchNorm2d):
        pass
    ours, theirs = build_pair("resnet18", seed=9, norm_layer=MyBN)
    fused.calls = 0
    train_fp64(ours.double().train(), theirs.double().train(), steps=1)
    assert fused.calls == 0
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(build_pair("resnet18", seed=9)[0])
    sync.train()(torch.randn(2, 3, *SIZE))  # no process group: SyncBatchNorm runs plain BN
    sync.eval()(torch.randn(2, 3, *SIZE))
    assert fused.calls == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_penalty_matches_torchvision(channels_last, monkeypatch):
    """A gradient penalty on the input (create_graph=True, then backward through the grads, as
    WGAN-GP or R1 do) through the fused training path: fp64, every parameter's grad as
    torchvision's (the fused BatchNorm's backward records torch's differentiable formula)."""
    ours, theirs = build_pair("resnet18")
    ours, theirs = ours.double(), theirs.double()
    x, target = batch(torch.float64, channels_last=channels_last)
    count = CountFused(monkeypatch)
    grads = []
    for model in (ours, theirs):
        xg = x.clone().requires_grad_()
        loss = nn.functional.cross_entropy(model(xg), target)
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
        (loss + g.square().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert count.calls == n_batchnorms(ours)
    for n in grads[1]:
        assert_fp64_equal(grads[0][n], grads[1][n], f"grad {n}")


def test_tiny_batch_raises_like_torch():
    ours, theirs = build_pair("resnet18", seed=10)
    x = torch.randn(1, 3, 32, 32)  # layer4 has 1x1 maps: 1 value per channel
    with pytest.raises(ValueError) as ours_err:
        ours.train()(x)
    with pytest.raises(ValueError) as theirs_err:
        theirs.train()(x)
    assert str(ours_err.value) == str(theirs_err.value)


# ---- the policy: fused kernels only where measured faster -----------------------------------
def _train_bn(shape, channels_last=False):
    bn = nn.BatchNorm2d(shape[1]).train()
    x = torch.randn(shape)
    return bn, (x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def test_policy_auto_on_cpu_fuses_large_tensors_only(monkeypatch):
    monkeypatch.delenv(training.TRAIN_BN_ENV)
    dtypes, (nchw, nhwc) = training.MEASURED_FASTER["cpu"]
    assert torch.float32 in dtypes and torch.bfloat16 not in dtypes and torch.float16 not in dtypes
    assert training.train_bn_choice(torch.device("cpu")) == "fused"
    bn, small = _train_bn((1, 4, 4, 4))
    assert small.numel() < nchw and not training.bn_act_supported(bn, small, None)
    bn, large = _train_bn((1, 64, 32, 32))
    assert large.numel() >= nchw and training.bn_act_supported(bn, large, None)
    bn, small_cl = _train_bn((1, 8, 8, 8), channels_last=True)
    assert small_cl.numel() < nhwc and not training.bn_act_supported(bn, small_cl, None)
    bn, large_cl = _train_bn((1, 64, 32, 32), channels_last=True)
    assert large_cl.numel() >= nhwc and training.bn_act_supported(bn, large_cl, None)
    # bf16/fp16 on CPU: measured slower than stock, so stock BatchNorm (fp32 parameters)
    for dtype in (torch.bfloat16, torch.float16):
        assert not training.bn_act_supported(bn, large.to(dtype), None)
    assert "fused bn_act_train" in training.train_bn_report(torch.device("cpu"))


def test_policy_unmeasured_devices_run_stock_batchnorm(monkeypatch):
    monkeypatch.delenv(training.TRAIN_BN_ENV)
    for device in ("cuda", "mps", "xpu"):
        assert device not in training.MEASURED_FASTER
        assert training.train_bn_choice(torch.device(device)) == "stock"
        assert "not measured faster" in training.train_bn_report(torch.device(device))


def test_policy_switch(monkeypatch):
    bn, small = _train_bn((1, 4, 4, 4))
    monkeypatch.setenv(training.TRAIN_BN_ENV, "fused")  # forced: any size
    assert training.bn_act_supported(bn, small, None)
    monkeypatch.setenv(training.TRAIN_BN_ENV, "stock")
    bn, large = _train_bn((1, 64, 32, 32))
    assert not training.bn_act_supported(bn, large, None)
    assert training.train_bn_choice(torch.device("cpu")) == "stock"
    ours = resnet_fused.resnet18(num_classes=10).train()
    fused = CountFused(monkeypatch)
    ours(torch.randn(2, 3, 64, 64))
    assert fused.calls == 0
    monkeypatch.setenv(training.TRAIN_BN_ENV, "sometimes")
    with pytest.raises(ValueError, match="RESNET_FUSED_TRAIN_BN='sometimes': expected one of "
                                         "auto, fused, stock"):
        training.train_bn_choice(torch.device("cpu"))


def test_eval_grad_policy(monkeypatch):
    """Eval mode with autograd: bn_eval_act where measured no slower (CPU fp32/fp64), stock's
    ops for other dtypes and unmeasured devices; the same switch forces either way."""
    monkeypatch.delenv(training.TRAIN_BN_ENV)
    y = torch.randn(1, 4, 2, 2)
    assert training.eval_grad_fuses(y) and training.eval_grad_fuses(y.double())
    assert not training.eval_grad_fuses(y.bfloat16()) and not training.eval_grad_fuses(y.half())
    assert not training.eval_grad_fuses(torch.empty(1, 4, 2, 2, device="meta"))
    assert "fused bn_eval_act for float32/float64" in training.eval_grad_report(
        torch.device("cpu"))
    assert "not measured no slower" in training.eval_grad_report(torch.device("cuda"))
    monkeypatch.setenv(training.TRAIN_BN_ENV, "fused")
    assert training.eval_grad_fuses(y.bfloat16())
    monkeypatch.setenv(training.TRAIN_BN_ENV, "stock")
    assert not training.eval_grad_fuses(y)
    assert "=stock" in training.eval_grad_report(torch.device("cpu"))
    # the model follows it: stock's BatchNorm runs, with the same gradients
    model = resnet_fused.resnet18(num_classes=10).eval()
    calls = []
    original = extension_ops.bn_eval_act
    monkeypatch.setattr(extension_ops, "bn_eval_act",
                        lambda *a: calls.append(1) or original(*a))
    x = torch.randn(1, 3, 32, 32)
    with resnet_fused.backend("torch"):
        model(x).sum().backward()
        assert not calls
        monkeypatch.setenv(training.TRAIN_BN_ENV, "auto")
        model(x).sum().backward()
        assert len(calls) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.slow
def test_train_step_under_torch_compile(monkeypatch):
    """torch.compile of the fused model in train mode: one graph (bn_act_train is a custom op
    with a fake kernel), and the step matches the same model run eagerly (fp64: exact algebra)."""
    torch.manual_seed(0)
    model = resnet_fused.resnet18(num_classes=10).double().train()
    eager = copy.deepcopy(model)
    x, target = batch(torch.float64)
    explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    fused = CountFused(monkeypatch)
    _, loss, grads = forward_backward(torch.compile(model), x, target)
    assert fused.calls == n_batchnorms(model)  # traced once each into the graph
    _, loss_eager, grads_eager = forward_backward(eager, x, target)
    assert_fp64_equal(loss, loss_eager, "loss")
    for n, g in grads_eager.items():
        assert_fp64_equal(grads[n.replace("_orig_mod.", "")] if n in grads else
                          grads["_orig_mod." + n], g, n)
