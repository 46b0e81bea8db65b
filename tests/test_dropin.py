"""Works wherever a torchvision ResNet works: TorchScript, torch.fx (and feature extraction),
torch.jit.trace (also where autograd records), torch.func transforms, ONNX export (both
exporters, run by onnxruntime), meta tensors.

The first tests re-create torchvision's own model tests for the ResNet family (its
test/test_models.py: `test_classification_model`'s same-seed output and scriptability check,
`test_resnet_dilation`, and the FX-compatibility check `_check_fx_compatible`) with our builders
in place of torchvision's. Semantics are compared in float64, where the fused path is exact (the
`torch` backend's folding agrees with torchvision to ~1e-15), so any difference is a real one.
"""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import components
import resnet_fused
from numerics import (BUILDER_PARAMS, assert_within_rule, loss_grads, randomize_bn,
                      stock_outputs)

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pair(name, dtype=torch.float64, **kwargs):
    """(ours, torchvision's), built under one seed as torchvision's test does, BN randomised."""
    torch.manual_seed(0)
    ours = getattr(resnet_fused, name)(num_classes=10, **kwargs)
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    randomize_bn(tv, seed=1)
    ours.load_state_dict(tv.state_dict())
    return ours.to(dtype).eval(), tv.to(dtype).eval()


def _same(out, want):
    """float64: the fused path and torchvision agree to rounding (relative 1e-10)."""
    scale = max(want.abs().max().item(), 1.0)
    assert (out - want).abs().max().item() <= 1e-10 * scale


@pytest.mark.parametrize("name", BUILDER_PARAMS)
def test_classification_model_as_torchvision_tests_it(name):
    """Same-seed construction gives torchvision's output; torch.jit.script works and gives the
    same output (the scripted forward is torchvision's module sequence: TorchScript cannot call
    the fused path), also after save/load; symbolic tracing gives the same output."""
    torch.manual_seed(0)
    ours = getattr(resnet_fused, name)(num_classes=10).double().eval()
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=10).double().eval()
    x = X.double()
    with torch.no_grad():
        want = tv(x)
        _same(ours(x), want)
        scripted = torch.jit.script(ours)
        _same(scripted(x), want)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        _same(torch.jit.load(buf)(x), want)
        _same(torch.fx.symbolic_trace(ours)(x), want)


@pytest.mark.parametrize("dilate", [[False, False, False], [False, False, True],
                                    [False, True, True]])
def test_resnet_dilation(dilate):
    ours, tv = _pair("resnet50", replace_stride_with_dilation=dilate)
    with torch.no_grad():
        _same(ours(X.double()), tv(X.double()))


@pytest.mark.parametrize("training", [False, True])
def test_fx_graph_runs_fused_and_follows_weights(training):
    """In eval the traced graph holds one graph_chain call per chain (fold computed from the
    parameters, then the fused op), so a later weight change is seen; in train it records
    torchvision's module calls."""
    from resnet_fused.layers import graph_chain
    ours, tv = _pair("resnet18")
    ours.train(training)
    tv.train(training)
    gm = torch.fx.symbolic_trace(ours)
    chains = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is graph_chain]
    assert len(chains) == (0 if training else 20)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        before = copy.deepcopy(gm)(x)
        _bump(ours, tv)
        if training:  # BN in train mode updates running stats: compare on copies
            got, want = copy.deepcopy(gm)(x), copy.deepcopy(tv)(x)
        else:
            got, want = gm(x), tv(x)
    _same(got, want)
    assert (got - before).abs().max() > 1e-3  # the change was seen


def _bump(*models):
    """The same in-place weight and statistics change in each model."""
    for m in models:
        m.conv1.weight.mul_(1.5)
        m.layer2[0].bn2.running_var.mul_(3.0)
        m.layer4[1].bn1.running_mean.add_(0.5)
        m.layer4[1].bn2.weight.mul_(2.0)  # (train mode normalises the others away)


def test_feature_extractor_matches_torchvision():
    ours, tv = _pair("resnet50")
    nodes = {"layer1": "c2", "layer3": "c4", "avgpool": "pool"}
    fe_ours = create_feature_extractor(ours, nodes)
    fe_tv = create_feature_extractor(tv, nodes)
    with torch.no_grad():
        got, want = fe_ours(X.double()), fe_tv(X.double())
    assert got.keys() == want.keys()
    for key in want:
        _same(got[key], want[key])


def test_jit_trace_fresh_model_records_the_op_and_never_bakes_a_fold():
    ours, tv = _pair("resnet18")
    x = X.double()
    # (under `auto` fp64 runs stock's modules; an explicit backend keeps the fused op)
    with torch.no_grad(), resnet_fused.backend("torch"):
        traced = torch.jit.trace(ours, x)  # never run before
        assert "resnet_fused::conv_bn_eval" in str(traced.inlined_graph)
        before = traced(x)
        _same(before, tv(x))
        _bump(ours, tv)
        after = traced(x)
        _same(after, tv(x))
    assert (after - before).abs().max() > 1e-3  # the change was seen
    with resnet_fused.backend("torch"):  # traced under no_grad, run where parameters need grad
        _same(traced(x).detach(), after)


@pytest.mark.parametrize("frozen", [False, True])
def test_jit_trace_with_autograd_recording(frozen):
    """torch.jit.trace of an eval model outside no_grad (parameters requiring grad, the common
    call), and of a frozen one with an input requiring grad (saliency), fp32 under `auto`: the
    trace records ops that backprop (jit.trace cannot record a Python autograd function; it used
    to fail), and the traced module's output and gradients are torchvision's (fp32, within the
    numerics rule of the float64 reference)."""
    ours, tv = _pair("resnet18", torch.float32)
    ref = copy.deepcopy(tv).double()
    for m in (ours, tv, ref):
        m.requires_grad_(not frozen)
    x = X.clone().requires_grad_(frozen)
    traced = torch.jit.trace(ours, x, check_trace=False)
    if resnet_fused.extension.unavailable_reason("cpu") is None:  # (strict runs require it)
        assert "resnet_fused::bn_eval_act" in str(traced.inlined_graph)  # fused BN recorded
    assert_within_rule(traced(x), tv(x), ref(x.double()), torch.float32)
    for got, want, exact in zip(loss_grads(traced, x), loss_grads(tv, x),
                                loss_grads(ref, x.double()), strict=True):
        assert_within_rule(got, want, exact, torch.float32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torch_func_transforms_run_as_torchvision(name):
    """torch.func: vmap, and per-sample gradients (vmap of grad of functional_call), as in
    torch.func's tutorial. Our ops have no batching rules and C++ autograd functions cannot be
    transformed, so inside a transform the model runs torchvision's module sequence: the same
    results, bit for bit."""
    from torch.func import functional_call, grad, vmap
    ours, tv = _pair(name)
    xs = torch.randn(3, 3, 32, 32, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(2))

    def per_sample_grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, x):
            return functional_call(model, {**p, **buffers}, (x.unsqueeze(0),)).square().sum()
        return vmap(grad(loss), in_dims=(None, 0))(params, xs)

    with torch.no_grad():
        torch.testing.assert_close(vmap(ours)(xs.unsqueeze(1)), vmap(tv)(xs.unsqueeze(1)),
                                   rtol=0, atol=0)
    got, want = per_sample_grads(ours), per_sample_grads(tv)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with torch.no_grad():  # and outside the transform, the fused path again
        _same(ours(xs), tv(xs))


_FRESH_COMPILE = textwrap.dedent("""
    import copy, torch, torchvision, resnet_fused
    from resnet_fused import extension
    from resnet_fused.numerics import rule_violation
    assert not extension._loaded  # the first question comes while dynamo traces
    torch.manual_seed(0)
    ours = resnet_fused.resnet18(num_classes=10)
    stock = torchvision.models.resnet18(num_classes=10)
    stock.load_state_dict(ours.state_dict())
    ref = copy.deepcopy(stock).double()
    x = torch.randn(4, 3, 32, 32)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for train in (True, False):
        for m in (ours, stock, ref):
            m.train(train)
        with torch.set_grad_enabled(train):
            got, want, exact = compiled(x), stock(x), ref(x.double())
        problem = rule_violation(got, want, exact, torch.float32)
        assert problem is None, problem
    assert extension.unavailable_reason() is None
    print("ok")
""")


def test_fullgraph_compile_of_a_fresh_process():
    """torch.compile(fullgraph=True) in a process that has not used the extension yet: the
    training chain asks whether the extension can run while dynamo traces, and its first load
    (under a lock dynamo cannot enter) runs eagerly. Train then eval, fused BatchNorm forced;
    outputs as torchvision's."""
    components.require("extension", resnet_fused.extension.unavailable_reason())
    env = dict(os.environ, RESNET_FUSED_TRAIN_BN="fused")
    proc = subprocess.run([sys.executable, "-c", _FRESH_COMPILE], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_meta_tensors_as_stock():
    ours, tv = _pair("resnext50_32x4d", dtype=torch.float32)
    ours, tv = ours.to("meta"), tv.to("meta")
    x = torch.empty(2, 3, 64, 64, device="meta")
    got, want = ours(x), tv(x)
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    w = torch.empty(8, 4, 3, 3, device="meta")
    s = torch.empty(8, device="meta")
    out = resnet_fused.ops.conv_bn_act(torch.empty(2, 4, 9, 9, device="meta"), w, s, s,
                                       stride=2, padding=1)
    assert out.device.type == "meta" and out.shape == (2, 8, 5, 5)
    ours.to_empty(device="cpu")  # the to_empty workflow: materialise, then load weights
    ours.load_state_dict(_pair("resnext50_32x4d", dtype=torch.float32)[1].state_dict())
    with torch.no_grad():
        assert torch.isfinite(ours.eval()(torch.randn(1, 3, 32, 32))).all()


# The dynamo exporter's resnet50 (~12 s) is `slow`: its graph is resnet18's ops at more depth,
# and the TorchScript exporter runs resnet50 by default.
@pytest.mark.parametrize("name,dynamo", [
    ("resnet18", False), ("resnet50", False), ("resnet18", True),
    pytest.param("resnet50", True, marks=pytest.mark.slow)],
    ids=lambda v: {False: "torchscript-exporter", True: "dynamo-exporter"}.get(v, v))
def test_onnx_export_runs_in_onnxruntime(name, dynamo):
    onnx = components.importorskip("onnx", "onnx")  # pinned: strict mode fails unless opted out
    ort = components.importorskip("onnxruntime", "onnx")
    if dynamo:
        components.importorskip("onnxscript", "onnx")  # the dynamo exporter needs it
    import warnings
    ours, tv = _pair(name, dtype=torch.float32)
    x = X.repeat(2, 1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer chatter
        if dynamo:
            proto = torch.onnx.export(ours, (x,), dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(ours, (x,), buf, dynamo=False)
            proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in proto.graph.node}
    assert all(domain == "ai.onnx" for domain, _ in ops), ops  # standard ops only
    assert {"Conv", "Relu", "Add"} <= {op for _, op in ops}
    assert "BatchNormalization" not in {op for _, op in ops}  # folded into Conv, as for torchvision
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        assert_within_rule(out, stock_outputs(tv, x), ref, torch.float32)
