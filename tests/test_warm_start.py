"""resnet_fused.warmup / `python -m resnet_fused warmup`, and the tuning store it fills.

CPU: the plan (problems, buckets, compile jobs), the parallel AOT compile for sm_90, the tuning
pass under Triton's interpreter, the on-disk store (round trip, corrupt and foreign files), and
bad arguments. GPU: warm-up, then a forward with run-time tuning off that times nothing.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import resnet_fused
from resnet_fused import tuning
from resnet_fused.warm_start import covering_batches, problems

import components
triton = components.importorskip("triton", "triton")  # pinned: a failure under strict mode (CI)
from resnet_fused.backends.triton import conv as tconv  # noqa: E402


def _meta_model(name="resnet18"):
    with torch.device("meta"):
        return getattr(resnet_fused, name)().eval()


@pytest.mark.parametrize("lo,hi", [(1, 64), (3, 10), (5, 5), (100, 300)])
def test_covering_batches_cover_every_bucket(lo, hi):
    """Every batch size in the range meets, in every layer (P output pixels per image), a bucket
    that one of the warmed batch sizes met."""
    warmed = covering_batches(lo, hi)
    assert warmed[0] == lo and warmed[-1] == hi and len(warmed) <= hi.bit_length() + 2
    for pixels in (1, 49, 196, 784, 3136, 12544, 7 * 9):
        seen = {tuning.bucket(b * pixels) for b in warmed}
        for n in range(lo, hi + 1):
            assert tuning.bucket(n * pixels) in seen, (n, pixels)


def test_problems_match_the_models_convs():
    from resnet_fused.tools.check import problems as check_problems
    found = problems(_meta_model(), [(1, 3, 224, 224)], [torch.float16])
    assert len(found) == len(check_problems(["resnet18"], [1], 224)) == 15
    # a range of batch sizes: the covering batches' problems, each dtype apart
    ranged = problems(_meta_model(), [(range(1, 5), 3, 32, 32)], [torch.float16, torch.bfloat16])
    batches = {layer.in_shape[0] for layer, _ in ranged}
    assert batches == {1, 2, 4}
    assert {d for _, d in ranged} == {torch.float16, torch.bfloat16}


def test_warmup_compiles_for_sm90_without_a_gpu(tmp_path, monkeypatch):
    """The parallel compile lands every candidate in Triton's cache (one mid config per problem
    and resnet18's first five problems here, to keep CI short: ~1-2 s per cold compile; the
    CLI and the GPU suite warm the whole model with every candidate)."""
    import resnet_fused.warm_start as ws
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tconv, "candidates",
                        lambda family, dtype, m, c_out, sms=None, args=None:
                        [tconv.config_tuples(family, dtype)[5]])
    monkeypatch.setattr(ws, "problems", lambda *args: problems(*args)[:5])
    report = resnet_fused.warmup(_meta_model(), [(1, 3, 32, 32)], [torch.float16], workers=2,
                                 target=90)
    assert report["problems"] == 5 and report["errors"] == [] and report["workers"] == 2
    assert 1 <= report["jobs"] <= 5
    assert len(list(tmp_path.rglob("*.cubin"))) == report["jobs"]


def test_warmup_tunes_under_the_interpreter(monkeypatch):
    """The tuning pass on CPU tensors under TRITON_INTERPRET=1 (several candidates, a stand-in
    timer): one decision per (problem bucket, dtype), persisted; a second pass times nothing."""
    from resnet_fused.warm_start import _tune
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tconv, "INTERPRETER", [(16, 32, 128, 1, 4, 1), (32, 64, 64, 1, 4, 1)])
    timed = []

    def fake_time(args, config):
        timed.append(config)
        return float(config[0])  # the smaller tile "wins"

    monkeypatch.setattr(tconv, "time_config", fake_time)
    # the stem (at 16x16 the one layer with both tiles to time) and layer1: the deeper layers only
    # add ~25 s of interpreter time
    found = problems(_meta_model(), [(1, 3, 16, 16)], [torch.float32])[:4]
    with resnet_fused.backend("triton"):
        _tune(found, torch.device("cpu"), "triton")
    decided = tuning.decisions(torch.device("cpu"))
    assert decided and set(decided.values()) == {tconv.Config(16, 32, 128, 1, 4, 1)}
    assert len(timed) == 2 * len(decided)
    tuning.clear()
    with resnet_fused.backend("triton"):
        _tune(found, torch.device("cpu"), "triton")
    assert len(timed) == 2 * len(decided)  # read back from disk


def test_store_ignores_corrupt_and_foreign_files(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path))
    cpu = torch.device("cpu")
    s = tuning.store(cpu)
    s.put("k", (1, 2, 3))
    saved = json.loads(s.path.read_text())
    assert saved["decisions"] == {"k": [1, 2, 3]}
    tuning.clear()
    assert tuning.store(cpu).get("k") == (1, 2, 3)

    s.path.write_text("{not json")
    tuning.clear()
    with pytest.warns(UserWarning, match="corrupt"):
        assert tuning.store(cpu).get("k") is None
    saved["fingerprint"] = dict(saved["fingerprint"], gpu="NVIDIA H100")
    s.path.write_text(json.dumps(saved))
    tuning.clear()
    with pytest.warns(UserWarning, match="made for"):
        assert tuning.store(cpu).get("k") is None
    # a remembered value that is no longer a candidate is measured again
    tuning.store(cpu).put("k2", "gone")
    assert tuning.decide(cpu, "k2", ("a", "b"), measure={"a": 2.0, "b": 1.0}.get,
                         heuristic=lambda: "a") == "b"


def test_store_survives_an_unwritable_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.DIR_ENV, str(blocker / "sub"))  # a folder under a file
    with pytest.warns(UserWarning, match="cannot read"):
        s = tuning.store(torch.device("cpu"))
    with pytest.warns(UserWarning, match="cannot write"):
        s.put("k", 1)
    assert tuning.store(torch.device("cpu")).get("k") == 1


def test_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="RESNET_FUSED_TUNING"):
        monkeypatch.setenv(tuning.MODE_ENV, "sometimes")
        tuning.mode()
    monkeypatch.delenv(tuning.MODE_ENV)
    model = _meta_model()
    with pytest.raises(TypeError, match="torchvision's structure"):
        resnet_fused.warmup(torch.nn.Linear(2, 2), [(1, 3, 32, 32)], target=90)
    with pytest.raises(ValueError, match="dtypes"):
        resnet_fused.warmup(model, [(1, 3, 32, 32)], [torch.float64], target=90)
    with pytest.raises(ValueError, match="batch size"):
        resnet_fused.warmup(model, [(0, 3, 32, 32)], target=90)
    with pytest.raises(ValueError, match="range"):
        resnet_fused.warmup(model, [(range(4, 1), 3, 32, 32)], target=90)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        resnet_fused.warmup(model, [(3, 32, 32)], target=90)
    report = resnet_fused.warmup(resnet_fused.resnet18(), [(1, 3, 32, 32)])
    assert "nothing to compile" in report["skipped"]


def test_cli(capsys):
    from resnet_fused.__main__ import main
    with pytest.raises(SystemExit):
        main(["warmup", "--batch", "1-x", "--target", "sm_90"])
    assert "range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["warmup", "--target", "sm_70"])
    assert "8.0+" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["warmup", "--arch", "resnet18"]) == 2
        assert "--target" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["warmup", "--arch", "resnet_nope", "--target", "sm_90"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_model_runs_without_timing_gpu(monkeypatch):
    """After warmup, with run-time tuning off, a forward at a warmed batch size and at an unseen
    one in the same buckets times nothing and matches the stock model."""
    from numerics import assert_within_rule, randomize_bn
    torch.manual_seed(0)
    model = randomize_bn(resnet_fused.resnet18(num_classes=10)).eval()
    import torchvision
    stock_model = torchvision.models.resnet18(num_classes=10).eval()
    stock_model.load_state_dict(model.state_dict())
    ref_model = copy.deepcopy(stock_model).double()
    stock_model = stock_model.cuda().half()
    model = model.cuda().half()
    report = resnet_fused.warmup(model, [(range(2, 9), 3, 64, 64)])
    assert report["errors"] == [] and report["tune_seconds"] > 0
    monkeypatch.setenv(tuning.MODE_ENV, "cached")
    monkeypatch.setattr(tconv, "time_config", lambda *a: pytest.fail("timed at run time"))
    for n in (8, 5):
        x = torch.randn(n, 3, 64, 64, device="cuda", dtype=torch.half)
        with torch.no_grad():
            out = model(x)
            stock = stock_model(x)
            ref = ref_model(x.double().cpu())
        assert_within_rule(out.cpu(), stock.cpu(), ref, torch.float16)
