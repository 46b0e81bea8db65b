"""The op contract with the `torch` backend: numerics, custom-op checks, autocast,
compile/export."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.ops import conv_bn_act
from numerics import assert_within_rule, conv_bn_act_ref, loss_grads, max_err, randomize_bn

CASES = [  # (C_in, C_out, k, stride, padding, dilation, groups, H, W)
    (3, 16, 7, 2, 3, 1, 1, 17, 15),   # stem
    (8, 12, 3, 1, 1, 1, 1, 9, 9),     # 3x3/1
    (8, 12, 3, 2, 1, 1, 1, 9, 8),     # 3x3/2
    (12, 20, 1, 1, 0, 1, 1, 7, 7),    # 1x1
    (12, 20, 1, 2, 0, 1, 1, 7, 7),    # 1x1/2 downsample
    (16, 16, 3, 1, 1, 1, 4, 6, 5),    # grouped
    (8, 8, 3, 1, 2, 2, 1, 9, 9),      # dilated
]


def _make(case, dtype, residual, seed=0):
    cin, cout, k, s, p, d, g, h, w = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, h, w, generator=gen).to(dtype)
    weight = (torch.randn(cout, cin // g, k, k, generator=gen)
              / (cin // g * k * k) ** 0.5).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(cout, generator=gen) * 2 - 0.5).to(acc)
    shift = torch.randn(cout, generator=gen).to(acc)
    oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(2, cout, oh, ow, generator=gen).to(dtype) if residual else None
    return x, weight, scale, shift, res, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False)])
def test_torch_backend_matches_reference(case, dtype, residual, relu):
    x, w, scale, shift, res, conv = _make(case, dtype, residual)
    with resnet_fused.backend("torch"):
        out = conv_bn_act(x, w, scale, shift, residual=res, relu=relu, **conv)
    ref = conv_bn_act_ref(x, w, scale, shift, residual=res, relu=relu, **conv)
    assert out.dtype == dtype
    # "Stock" here: the same-dtype composition torchvision would run (conv, BN affine, add, relu).
    y = F.conv2d(x, w, None, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    stock = y * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    stock = stock + res if res is not None else stock
    stock = torch.relu(stock) if relu else stock
    if dtype == torch.float64:
        assert max_err(out, ref) <= 1e-12 * ref.abs().max().item()
    else:
        assert_within_rule(out, stock, ref, dtype)


def test_layouts_and_batch_zero():
    x, w, scale, shift, res, conv = _make(CASES[2], torch.float64, True)
    ref = conv_bn_act_ref(x, w, scale, shift, residual=res, **conv)
    with resnet_fused.backend("torch"):
        for xi in (x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3),     # odd strides
                   torch.stack([x, x], 2)[:, :, 1]):                   # non-contiguous view
            out = conv_bn_act(xi, w, scale, shift, residual=res, **conv)
            assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
        empty = conv_bn_act(x[:0], w, scale, shift, residual=res[:0], **conv)
        assert empty.shape == (0, *ref.shape[1:])


def test_output_never_aliases_inputs():
    # 1x1 conv with identity weight, scale 1, shift 0, no relu: a lazy backend could return x.
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    w = torch.eye(4, dtype=torch.float64).view(4, 4, 1, 1)
    out = conv_bn_act(x, w, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                      relu=False)
    assert out.data_ptr() != x.data_ptr() and torch.equal(out, x)


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x, w, scale, shift, res, conv = _make(CASES[1], torch.float64, residual)
    args = (x.requires_grad_(), w.requires_grad_(), scale.requires_grad_(),
            shift.requires_grad_(), res.requires_grad_() if residual else None,
            [conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"],
            True)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, args)


def test_gradcheck():
    # Grouped 3x3 with a residual, kept tiny: gradcheck differentiates numerically per element.
    x, w, scale, shift, res, conv = _make((4, 4, 3, 1, 1, 1, 2, 3, 4), torch.float64, True)
    inputs = [t.detach().requires_grad_() for t in (x, w, scale, shift, res)]
    with resnet_fused.backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *t: conv_bn_act(t[0], t[1], t[2], t[3], residual=t[4], **conv), inputs)


def test_autocast_computes_in_autocast_dtype():
    x, w, scale, shift, res, conv = _make(CASES[1], torch.float32, True)
    ref = conv_bn_act_ref(x, w, scale, shift, residual=res, **conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn_act(x, w, scale, shift, residual=res, **conv)
        stock = F.conv2d(x, w, None, conv["stride"], conv["padding"])
    assert out.dtype == stock.dtype == torch.bfloat16
    stock = torch.relu(stock.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + res)
    assert_within_rule(out, stock.bfloat16(), ref, torch.bfloat16)


def test_export_without_grad_saves_loads_and_runs_in_any_grad_mode():
    """A model exported under no_grad records the eval chain op; the program survives
    torch.export.save/load with its outputs, also run outside no_grad (its parameters require
    grad there)."""
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "resnet_fused.conv_bn_eval.default" in targets
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(x).detach(), expected, rtol=0, atol=0)


def test_model_under_autocast_matches_stock_dtype():
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    fused = resnet_fused.fuse(tv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fused(x), tv(x)
    assert a.dtype == b.dtype == torch.bfloat16
    ref = copy.deepcopy(tv).double()(x.double())
    assert_within_rule(a, b, ref, torch.bfloat16)


def test_torch_compile_and_export():
    """Fake kernel + autograd registration are enough for Dynamo/AOTAutograd and torch.export."""
    model = resnet_fused.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (x,))
    assert any("resnet_fused.conv_bn_act" in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_compiled_eval_chain_folds_through_the_cache():
    """A compiled eval forward calls resnet_fused::conv_bn_eval, which reuses the cached prepared
    weights (nothing rebuilt per call) and still sees a later change of a BN statistic."""
    from resnet_fused import fold
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    twin = copy.deepcopy(model)  # a fused model never compiled, same numbers
    x = torch.randn(2, 3, 32, 32)
    builds = []
    real_build = fold.build

    def counted(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fold, "build", counted)
        compiled(x)
        first = len(builds)
        assert first == 20  # one fold per conv, made while the compiled graph ran
        got = compiled(x)
        assert len(builds) == first  # reused
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
        model.layer2[0].bn1.running_var.mul_(3.0)
        twin.layer2[0].bn1.running_var.mul_(3.0)
        got = compiled(x)
        assert len(builds) == first + 1  # exactly the changed chain
    ref = copy.deepcopy(twin).double()(x.double())
    with torch.no_grad(), resnet_fused.backend("torch"):
        assert_within_rule(got, twin(x), ref, torch.float32)


def _compile_recording(model, graphs, **options):
    """torch.compile(model) with a backend that appends each dynamo graph to `graphs` and runs
    it as it is."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(model, backend=backend, fullgraph=True, **options)


def test_compiled_graph_calls_the_op_without_autograd_wrappers():
    """torch.compile's graph (guarded on grad mode) calls conv_bn_eval_nograd, the eval chain
    op without custom_op's Python wrappers, where dynamo tells torch.compile from torch.export
    (torch 2.11's answers is_exporting() True under torch.compile too: the custom_op there);
    with the same output as the eager model."""
    told_apart = not torch.compile(torch.compiler.is_exporting, backend="eager", fullgraph=True)()
    want, other = "resnet_fused.conv_bn_eval_nograd.default", "resnet_fused.conv_bn_eval.default"
    if not told_apart:
        want, other = other, want
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graphs = []
    with torch.no_grad():
        got = _compile_recording(model, graphs)(x)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    assert targets.count(want) == 20
    assert other not in targets


def test_dynamic_compile_runs_new_batch_and_image_sizes_in_one_graph():
    """torch.compile(dynamic=True): one graph serves other batch and image sizes (the ops' fake
    kernels take symbolic shapes), with the eager model's outputs."""
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    graphs = []
    compiled = _compile_recording(model, graphs, dynamic=True)
    with torch.no_grad():
        # (no dimension of size 1 anywhere: torch specialises on it)
        for batch, size in ((2, 64), (3, 80), (5, 96)):
            x = torch.randn(batch, 3, size, size)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert len(graphs) == 1


@pytest.mark.parametrize("frozen", [True, False])
def test_compiled_eval_gradients(frozen):
    """A compiled eval forward where autograd records: parameters requiring grad (the default,
    outside no_grad; torch 2.11's dynamo failed on it), or only the input (saliency maps through
    a frozen model; the graph used to call the eval op, which has no autograd, and fail). The
    graph records the fold and the differentiable op: the gradients are torchvision's."""
    import torchvision
    torch.manual_seed(0)
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval().requires_grad_(not frozen)
    stock = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(not frozen)
    stock.load_state_dict(model.state_dict())
    ref = copy.deepcopy(stock).double()
    x = torch.randn(2, 3, 32, 32).requires_grad_(frozen)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for got, want, exact in zip(loss_grads(compiled, x), loss_grads(stock, x),
                                loss_grads(ref, x.double()), strict=True):
        assert_within_rule(got, want, exact, torch.float32)


def _conv_bn_eval_args(requires_grad=False):
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=True).requires_grad_(requires_grad)
    bn = randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(8)))[0].eval()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    args = (x, conv.weight, conv.bias, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
            bn.running_var, bn.num_batches_tracked, bn.eps, res, [1, 1], [1, 1], [1, 1], 1, True,
            "torch")
    with torch.no_grad():
        expected = torch.relu(bn(conv(x)) + res)
    return args, expected


@pytest.mark.parametrize("name", ["conv_bn_eval", "conv_bn_eval_nograd"])
def test_conv_bn_eval_op_registration(name):
    """The eval chain ops' fake kernels agree with the real one (opcheck)."""
    args, _ = _conv_bn_eval_args()
    torch.library.opcheck(getattr(torch.ops.resnet_fused, name).default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_conv_bn_eval_ops_where_inputs_require_grad():
    """The eval chain ops have no autograd formula. conv_bn_eval (traced and exported graphs,
    which may run in any grad mode) gives its output where an input requires grad and raises
    at backward; conv_bn_eval_nograd (torch.compile's graphs, guarded on grad mode) refuses the
    call, instead of the dispatcher's fallback warning at backward and giving no grads."""
    args, expected = _conv_bn_eval_args(requires_grad=True)
    out = torch.ops.resnet_fused.conv_bn_eval.default(*args)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="an input requires grad"):
        torch.ops.resnet_fused.conv_bn_eval_nograd.default(*args)
    with torch.no_grad():
        out = torch.ops.resnet_fused.conv_bn_eval_nograd.default(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
