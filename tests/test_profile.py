"""The per-layer profiler: MAC totals against torchvision's published figures, layer shapes, CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from resnet_fused.__main__ import main
from resnet_fused.walk import count_macs, layers, meta_model

# torchvision's published multiply-adds per 224x224 image (the "GFLOPS" column of its model
# table counts convs + fc multiply-adds; BN, ReLU, adds and pooling are not counted).
PUBLISHED_G = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801,
               "resnet152": 11.514}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("arch", sorted(PUBLISHED_G))
def test_total_macs_match_torchvision_published(arch):
    got = count_macs(arch, 224) / 1e9
    assert abs(got - PUBLISHED_G[arch]) / PUBLISHED_G[arch] <= 0.005, (arch, got)
    # and torchvision's own weight metadata says the same
    weights = torchvision.models.get_weight(
        f"{arch.replace('resnet', 'ResNet')}_Weights.IMAGENET1K_V1")
    assert abs(got - weights.meta["_ops"]) / weights.meta["_ops"] <= 0.005


def test_layer_list_of_resnet50():
    model = meta_model("resnet50")
    ls = layers(model, (2, 3, 224, 224))
    convs = [layer for layer in ls if layer.kind == "conv_bn_act"]
    assert len(convs) == 53 and [layer.kind for layer in ls].count("linear") == 1
    assert sum(layer.residual for layer in convs) == 16            # one per bottleneck block
    assert sum(not layer.relu for layer in convs) == 4              # the downsample convs
    assert all(layer.relu for layer in convs if layer.residual)
    assert sum(layer.macs for layer in ls) == 2 * count_macs("resnet50")
    assert ls[-1].out_shape == (2, 1000)


@pytest.mark.parametrize("arch,size", [("resnet18", (45, 37)), ("resnext50_32x4d", (33, 64)),
                                       ("wide_resnet50_2", (32, 32))])
def test_shapes_and_macs_match_a_real_forward(arch, size):
    """Analytic shapes and MACs equal what hooks see on a real torchvision forward."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=7).eval()
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            macs = out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * \
                mod.kernel_size[1] if isinstance(mod, torch.nn.Conv2d) else \
                mod.in_features * mod.out_features * out.shape[0]
            seen[name] = (tuple(inp[0].shape), tuple(out.shape), macs)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.randn(2, 3, *size))
    ls = layers(model, (2, 3, *size))
    for layer in ls:
        if layer.kind == "conv_bn_act":
            key = layer.name + ".0" if layer.name.endswith("downsample") else layer.name
            assert seen[key] == (layer.in_shape, layer.out_shape, layer.macs), layer.name
    assert seen["fc"][2] == ls[-1].macs
    assert sum(layer.macs for layer in ls) == sum(v[2] for v in seen.values())


def test_profile_cli_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    rc = main(["profile", "--arch", "resnet18", "--batch", "2", "--size", "32", "--device", "cpu",
               "--dtype", "fp32", "--min-time", "0", "--no-peak", "--quiet", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["total_macs"] == count_macs("resnet18", 32)        # per image, stated
    assert "per image" in report["total_macs_is"]
    assert report["total_macs_batch"] == 2 * report["total_macs"]
    assert isinstance(report["layers"], list) and len(report["layers"]) == 23
    for row in report["layers"]:
        for key in ("name", "in_shape", "out_shape", "macs", "stock_ms", "fused_ms", "speedup",
                    "fused_tflops", "pct_of_peak"):
            assert key in row, key
        assert row["stock_ms"] > 0 and row["fused_ms"] > 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "total" in out


@pytest.mark.parametrize("selection", ["torch", "onednn", "auto"])
def test_profile_fused_layers_are_correct(selection, monkeypatch):
    """The fused callables the profiler times compute what the stock ones do, on exactly the
    backend selected (the `torch` selection runs the torch backend, not oneDNN)."""
    from resnet_fused import backends
    from resnet_fused.tools.profile import _layer_fns
    if backends.unavailable_reason(selection, torch.device("cpu")) is not None:
        pytest.skip(backends.unavailable_reason(selection, torch.device("cpu")))
    ran = []
    for name in ("torch", "onednn"):
        module = backends.load(name)
        monkeypatch.setattr(module, "run", lambda *a, _run=module.run, _n=name, **k:
                            ran.append(_n) or _run(*a, **k))
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with backends.backend(selection):
        for layer in layers(model, (1, 3, 32, 32)):
            if layer.kind != "conv_bn_act":
                continue
            x = torch.randn(layer.in_shape).contiguous(memory_format=torch.channels_last)
            res = torch.randn(layer.out_shape) if layer.residual else None
            stock, fused = _layer_fns(layer, x, res)
            with torch.no_grad():
                torch.testing.assert_close(fused(), stock(), rtol=1e-4, atol=1e-4)
    want = backends.resolve(torch.device("cpu"), selection, torch.float32)
    assert set(ran) == ({want} if want != backends.MODULES else set()), (selection, set(ran))


def test_cpu_peak_is_the_best_of_matmul_and_onednn_convs(monkeypatch):
    """The CPU "peak" includes the primitive the convs run on (a oneDNN convolution), not only
    a BLAS matmul, which can be slower than the convs and push "% of peak" past 100."""
    from resnet_fused.tools import timing
    monkeypatch.setattr(timing, "_CPU_CONV_PROBES", ((1, 32, 8, 3),))  # small: a quick test
    tflops, how = timing.measured_peak_tflops(torch.device("cpu"), torch.float32)
    assert tflops > 0
    assert "matmul" in how and "3x3 conv" in how and "GFLOP/s" in how, how


def test_compare_times_other_backends_per_conv_and_names_the_missing(capsys):
    """--compare: each named backend's fused chain timed per conv layer next to the selection's;
    one that cannot run here is left out with its reason (cudnn on a CPU)."""
    from resnet_fused.__main__ import main
    from resnet_fused.tools.profile import format_table, run_profile
    report = run_profile("resnet18", 1, "fp32", "cpu", 32, "auto", min_time_s=0.0, peak=False,
                         compare=["torch", "cudnn"])
    assert report["compare"] == ["torch", "cudnn"] and "cudnn" in report["compare_unavailable"]
    for row in report["layers"]:
        times = row["compare_ms"]
        assert times["cudnn"] is None
        assert (times["torch"] > 0) if row["kind"] == "conv_bn_act" else times["torch"] is None
    table = format_table(report)
    assert "torch ms" in table and "cudnn: not timed (" in table
    with pytest.raises(SystemExit) as exit_:  # argparse: usage and the error, status 2
        main(["profile", "--compare", "torch,nope", "--device", "cpu"])
    assert exit_.value.code == 2 and "unknown backend 'nope'" in capsys.readouterr().err
