"""Public API: backend selection, the info command, weights=, and clear errors on bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import backends
from resnet_fused.ops import conv_bn_act


# ---- backend selection ----------------------------------------------------------------------

def test_default_is_auto_and_context_manager_restores():
    assert resnet_fused.get_backend() == "auto"
    with resnet_fused.backend("torch"):
        assert resnet_fused.get_backend() == "torch"
    assert resnet_fused.get_backend() == "auto"


def test_backend_blocks_are_per_thread_and_set_backend_is_the_default():
    """Two threads whose `with backend()` blocks interleave each see their own choice, and
    neither leaves it behind; set_backend() sets the default every thread starts from."""
    import threading
    inside, done = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def worker(name):
        with resnet_fused.backend(name):
            inside.wait()   # both blocks entered
            seen[name] = resnet_fused.get_backend()
            done.wait()     # both read before either leaves
        seen[name + " after"] = resnet_fused.get_backend()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("torch", "auto")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"torch": "torch", "auto": "auto", "torch after": "auto",
                    "auto after": "auto"}
    assert resnet_fused.get_backend() == "auto"
    try:
        resnet_fused.set_backend("torch")
        other = []
        t = threading.Thread(target=lambda: other.append(resnet_fused.get_backend()))
        t.start()
        t.join()
        assert other == ["torch"]
        with resnet_fused.backend("auto"):
            assert resnet_fused.get_backend() == "auto"  # the block wins inside it
        assert resnet_fused.get_backend() == "torch"
    finally:
        resnet_fused.set_backend("auto")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown resnet_fused backend 'cudnn8'; expected one "
                                         r"of auto, triton, cuda, cudnn, .*torch"):
        resnet_fused.set_backend("cudnn8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(resnet_fused.BackendUnavailableError,
                       match=r"backend 'triton' is unavailable for cuda tensors: .*CUDA"):
        backends.resolve(torch.device("cuda"), "triton")


def _run(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_env_var_selects_backend_and_bad_value_is_reported():
    ok = _run("import resnet_fused; print(resnet_fused.get_backend())",
              RESNET_FUSED_BACKEND="torch")
    assert ok.returncode == 0 and ok.stdout.strip() == "torch"
    bad = _run("import resnet_fused; resnet_fused.get_backend()", RESNET_FUSED_BACKEND="fastest")
    assert bad.returncode != 0 and "$RESNET_FUSED_BACKEND: unknown resnet_fused backend 'fastest'" \
        in bad.stderr


def test_import_is_lazy():
    """Importing the package loads no backend (triton kernels, compiled extension) and never
    initialises CUDA. (torch itself may import the triton package; that is not ours to avoid.)"""
    r = _run("import sys, torch, resnet_fused; print(*[m in sys.modules for m in "
             "('resnet_fused.backends.triton', 'resnet_fused.backends.cuda', "
             "'resnet_fused._C')], torch.cuda.is_initialized())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"] * 4


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "resnet_fused", "info"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "triton", "device", "backends on cpu", "auto ->"):
        assert word in r.stdout
    for name in ("triton", "cuda", "torch"):
        assert any(line.strip().startswith(name) for line in r.stdout.splitlines())


# ---- weights= --------------------------------------------------------------------------------

def test_weights_state_dict_and_file(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "r18.pt"
    torch.save(tv.state_dict(), path)
    for weights in (tv.state_dict(), str(path), path, {"state_dict": tv.state_dict()}):
        model = resnet_fused.resnet18(weights=weights)
        assert model.fc.out_features == 7  # num_classes taken from the weights
        for k, v in tv.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)


def test_weights_enum_and_name_delegate_to_torchvision(monkeypatch):
    """No network here: torchvision's download is replaced by a state_dict of the right shape."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self.url)
        return sd

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    from torchvision.models import ResNet18_Weights
    for weights in (ResNet18_Weights.IMAGENET1K_V1, "IMAGENET1K_V1",
                    "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = resnet_fused.resnet18(weights=weights)
        assert torch.equal(model.fc.weight, sd["fc.weight"])
    assert calls and all(url == ResNet18_Weights.IMAGENET1K_V1.url for url in calls)


@pytest.mark.parametrize("weights,match", [
    (42, r"expected weights=None, a torchvision weights enum or its name, a state_dict or the "
         r"path of a saved one; got 42"),
    ("IMAGENET9K_V7", r"got 'IMAGENET9K_V7'"),
    ({"fc.weight": "not a tensor"}, r"does not hold a state_dict"),
])
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        resnet_fused.resnet18(weights=weights)


def test_weights_of_another_architecture():
    from torchvision.models import ResNet50_Weights
    with pytest.raises(ValueError, match="expected weights of ResNet18_Weights, got "
                                         "ResNet50_Weights.IMAGENET1K_V2"):
        resnet_fused.resnet18(weights=ResNet50_Weights.IMAGENET1K_V2)


def test_builder_fixed_arguments_conflict():
    with pytest.raises(ValueError, match="'groups' expected value 32 but got 8"):
        resnet_fused.resnext50_32x4d(groups=8)


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return resnet_fused.resnet18(num_classes=4).eval()


@pytest.mark.parametrize("make_x,exc,match", [
    (lambda: torch.randn(3, 32, 32), ValueError,
     r"expected input of shape \(N, 3, H, W\), got \(3, 32, 32\)"),
    (lambda: torch.randn(1, 4, 32, 32), ValueError,
     r"expected input of shape \(N, 3, H, W\), got \(1, 4, 32, 32\)"),
    (lambda: torch.randint(0, 255, (1, 3, 32, 32)), TypeError,
     r"expected a floating-point input of dtype torch.float32, got torch.int64"),
    (lambda: torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError,
     r"expected input dtype torch.float32 \(the model's parameters\), got torch.float64"),
    (lambda: torch.randn(1, 3, 32, 32, device="meta"), ValueError,
     r"expected input on the model's device cpu, got meta"),
])
@pytest.mark.parametrize("training", [False, True])
def test_model_bad_input(model, make_x, exc, match, training):
    model.train(training)
    with pytest.raises(exc, match=match):
        model(make_x())


def _op_args():
    return dict(x=torch.randn(2, 8, 5, 5), weight=torch.randn(4, 8, 3, 3),
                scale=torch.ones(4), shift=torch.zeros(4))


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(8, 5, 5)), ValueError, r"expected x of shape \(N, C, H, W\), got a 3-D"),
    (dict(weight=torch.randn(4, 8, 3)), ValueError, r"expected weight of shape"),
    (dict(x=torch.randn(2, 6, 5, 5)), ValueError, r"expected x with 8 channels .* got 6"),
    (dict(x=torch.ones(2, 8, 5, 5, dtype=torch.int32)), TypeError,
     r"expected a floating-point x .* got torch.int32"),
    (dict(weight=torch.randn(4, 8, 3, 3, dtype=torch.float64)), TypeError,
     r"expected weight dtype to equal x dtype torch.float32, got torch.float64"),
    (dict(scale=torch.ones(5)), ValueError, r"expected scale of shape \(4,\), got \(5,\)"),
    (dict(shift=torch.zeros(4, dtype=torch.float16)), TypeError,
     r"expected shift of dtype torch.float32 for torch.float32 input, got torch.float16"),
    (dict(scale=torch.ones(4, device="meta")), ValueError,
     r"expected scale on x's device cpu, got meta"),
    (dict(residual=torch.randn(2, 4, 5, 5)), ValueError,
     r"expected residual of shape \(2, 4, 3, 3\), got \(2, 4, 5, 5\)"),
    (dict(x=torch.randn(2, 8, 1, 1)), ValueError, r"too small for kernel"),
    (dict(groups=3), ValueError, r"groups must be >= 1 and divide C_out=4, got 3"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(stride=1.5), TypeError, r"stride must be an int, got float 1.5"),
    (dict(stride=True), TypeError, r"stride must be an int, got bool True"),
    (dict(padding=(1, "1")), TypeError, r"padding must be an int, got str '1'"),
    (dict(dilation=(1, 1, 1)), ValueError, r"dilation must be an int or a pair of ints"),
    (dict(groups=2.0), TypeError, r"groups must be an int, got float 2.0"),
])
def test_op_bad_input(change, exc, match):
    args = {**_op_args(), **change}
    with pytest.raises(exc, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("scale"), args.pop("shift"),
                    **args)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--arch", "resnet9000"], "invalid choice: 'resnet9000' (choose from 'resnet18'"),
    (["bench", "--batch", "-2"], "argument --batch: expected a whole number >= 1, got -2"),
    (["bench", "--batch", "0"], "argument --batch: expected a whole number >= 1, got 0"),
    (["profile", "--batch", "0"], "argument --batch: expected a whole number >= 1, got 0"),
    (["profile", "--arch", "vgg16"], "invalid choice: 'vgg16'"),
    (["check", "--workers", "0"], "argument --workers: expected a whole number >= 1"),
    (["warmup", "--size", "x", "--target", "sm_90"], "argument --size: expected a whole number"),
] + ([(["profile", "--device", "cuda"], "no CUDA device is visible")]
     if not torch.cuda.is_available() else []))
def test_cli_refuses_bad_arguments_in_one_line(argv, message, capsys):
    """Exit status 2 and one argparse line naming the argument (in-process: argparse exits
    before any work; the real process is checked once below)."""
    from resnet_fused.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_process_refuses_a_bad_argument_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "resnet_fused", "bench", "--batch", "-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "argument --batch: expected a whole number >= 1, got -2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_reports_a_bad_backend_variable():
    proc = subprocess.run([sys.executable, "-m", "resnet_fused", "info"], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "RESNET_FUSED_BACKEND": "bogus"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "selected     invalid: $RESNET_FUSED_BACKEND: unknown resnet_fused backend 'bogus'" \
        in proc.stdout


def test_nothing_is_lost_after_bad_input():
    """A battery of bad calls (model, blocks, the op, backends, warmup), each a clear error; the
    model and the op give the right answer afterwards, eval and train, and no state leaked
    (backend selection, fold cache, tuning mode)."""
    from numerics import assert_within_rule, randomize_bn, stock_outputs
    import copy
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=4)).eval()
    ours = resnet_fused.resnet18(num_classes=4).eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    untouched = copy.deepcopy(ours)
    bad_calls = [
        (lambda: ours(torch.randn(2, 4, 32, 32)), ValueError),
        (lambda: ours(torch.randn(2, 3, 32, 32, dtype=torch.float16)), TypeError),
        (lambda: ours(x.long()), TypeError),
        (lambda: ours.layer1(torch.randn(2, 32, 8, 8)), ValueError),          # wrong channels
        (lambda: ours.layer1[0](torch.randn(2, 64, 8, 8).double()), TypeError),
        (lambda: conv_bn_act(x, torch.randn(4, 3, 3, 3), torch.ones(4), torch.zeros(4),
                             stride=1.5), TypeError),
        (lambda: resnet_fused.set_backend("fastest"), ValueError),
        (lambda: resnet_fused.backend("nope").__enter__(), ValueError),
        (lambda: resnet_fused.warmup(ours, [(0, 3, 32, 32)], target=90), ValueError),
    ]
    for call, exc in bad_calls:
        with pytest.raises(exc):
            with torch.no_grad():
                call()
    assert resnet_fused.get_backend() == "auto"
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        assert_within_rule(ours(x), stock_outputs(tv, x), ref, torch.float32)
    # train mode: exactly what a model that never saw the bad calls computes, stats included
    out, want = ours.train()(x), untouched.train()(x)
    assert torch.equal(out, want)
    for (name, a), (_, b) in zip(ours.named_buffers(), untouched.named_buffers()):
        assert torch.equal(a, b), name
