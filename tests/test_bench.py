"""`python -m resnet_fused bench`: providers, statistics, JSON and PNG output (tiny sizes)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from resnet_fused import backends
from resnet_fused.__main__ import main
from resnet_fused.tools import bench, bench_isolated, timing

import components

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_quantiles():
    assert timing.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert timing.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    s = timing.summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["reps"]) == (3.0, 1.8, 4.2, 5)


def test_measure_cpu_respects_rep_limits():
    calls = []
    times = timing.measure(lambda: calls.append(1), CPU, warmup=2, min_reps=4, max_reps=6,
                          min_time_s=0.0)
    assert len(times) == 4 and len(calls) == 6
    times = timing.measure(lambda: None, CPU, warmup=0, min_reps=1, max_reps=7, min_time_s=60.0)
    assert len(times) == 7


def test_default_cpu_providers_leave_out_compile():
    providers = bench.default_providers(CPU)
    assert providers[:2] == ["eager", "eager_cl"]
    assert not any(p.startswith("compile") for p in providers)
    assert "fused+graphs" not in providers
    for name in bench.available_fused_backends(CPU):
        assert f"fused:{name}" in providers
    assert bench.expand_providers("eager,fused:torch,eager", CPU) == ["eager", "fused:torch"]
    with pytest.raises(SystemExit, match="unknown provider"):
        bench.expand_providers("eager,nope", CPU)


def test_bench_cli_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--arch", "resnet18", "--batch", "1", "2", "--size", "32", "--device",
               "cpu", "--providers", "eager,eager_cl,jit_ofi,fused,fused+graphs", "--warmup", "0",
               "--min-reps", "2", "--min-time", "0", "--quiet", "--json", str(js),
               "--plot", str(png)])
    assert rc == 0
    report = json.loads(js.read_text())
    meta, rows = report["meta"], report["results"]
    assert meta["device"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert meta["auto_backend"] == backends.device_choice(CPU)
    n_fused = len(bench.available_fused_backends(CPU))
    assert len(rows) == 2 * (4 + n_fused)
    for r in rows:
        if r["provider"] == "fused+graphs":  # CPU: reported as not runnable, not a crash
            assert "CUDA" in r["error"]
            continue
        assert "error" not in r, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        assert r["max_rel_diff_vs_eager"] < 1e-3
        assert r["reps"] >= 2 and len(r["times_ms"]) == r["reps"]
        assert timing.minor_faults() is None or r["page_faults_per_call"] >= 0
    assert meta["heap"] == "the allocator as configured"
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["provider"] == "eager")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "median ms" in out and "vs eager" in out and "fused" in out


_FAULTS_OF_A_FRESH_BLOCK = """
import sys, torch
from resnet_fused.tools import timing
if sys.argv[1] == "keep":
    print(timing.keep_heap_memory())
torch.empty(16 << 20).fill_(1.0)  # 64 MiB, freed: above glibc's largest mmap threshold
f0 = timing.minor_faults()
torch.empty(15 << 20).fill_(1.0)  # 60 MiB: fits in the freed block where the heap kept it
print(timing.minor_faults() - f0)
"""


@pytest.mark.skipif(timing.minor_faults() is None, reason="no page-fault count on this platform")
def test_keep_heap_memory_stops_the_allocators_page_faults():
    """timing.keep_heap_memory (bench --keep-heap): a freed block is reused without faulting its
    pages in again; as configured, glibc unmaps it and the next one faults every page. In a
    subprocess: the setting is for the whole process."""
    if platform.libc_ver()[0] != "glibc":
        with pytest.raises(RuntimeError, match="glibc"):
            timing.keep_heap_memory()
        return
    runs = {how: subprocess.run([sys.executable, "-c", _FAULTS_OF_A_FRESH_BLOCK, how],
                                capture_output=True, text=True, check=True).stdout.split("\n")
            for how in ("as-configured", "keep")}
    assert "mallopt" in runs["keep"][0]
    kept, as_configured = int(runs["keep"][1]), int(runs["as-configured"][0])
    # (4 KiB pages: 15,360 faults as configured; a few of the interpreter's own when kept.
    # Transparent huge pages fault fewer, larger pages: the ratio still holds.)
    assert kept < 64 and 8 * kept < as_configured, runs


def test_keep_heap_without_glibc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    with pytest.raises(SystemExit, match="needs glibc's mallopt"):
        main(["bench", "--keep-heap", "--arch", "resnet18", "--batch", "1", "--size", "32",
              "--device", "cpu", "--quiet"])


def test_bench_isolate_runs_each_provider_in_processes_of_its_own(tmp_path):
    """--isolate N: every provider timed alone in N fresh processes; a row merges their calls
    and the speed-up is against the merged eager row."""
    js = tmp_path / "i.json"
    rc = main(["bench", "--arch", "resnet18", "--batch", "1", "--size", "32", "--device", "cpu",
               "--providers", "eager,fused:torch", "--isolate", "2", "--min-reps", "2",
               "--warmup", "0", "--threads", "1", "--quiet", "--json", str(js)])
    assert rc == 0
    report = json.loads(js.read_text())
    assert "processes of its own" in report["meta"]["timing"]
    rows = {r["provider"]: r for r in report["results"]}
    assert list(rows) == ["eager", "fused:torch"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["processes"] == 2 and r["reps"] == 4 and len(r["times_ms"]) == 4
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert "max_rel_diff_vs_eager" not in r  # (outputs live in different processes)
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    assert rows["fused:torch"]["speedup_vs_eager"] == pytest.approx(
        rows["eager"]["median_ms"] / rows["fused:torch"]["median_ms"])


def test_bench_isolate_merge_keeps_errors_and_scales_rates():
    def report(times, tflops, error=None):
        row = {"batch": 2, "dtype": "fp32", "provider": "fused:torch", "label": "f"}
        if error:
            row["error"] = error
        else:
            row.update(timing.summarize(times), times_ms=times, tflops=tflops,
                       page_faults=[1] * len(times), max_rel_diff_vs_eager=0.0)
        eager = {"batch": 2, "dtype": "fp32", "provider": "eager", "label": "e",
                 **timing.summarize([4.0, 4.0]), "times_ms": [4.0, 4.0], "tflops": 1.0}
        return {"meta": {"arch": "resnet18"}, "results": [eager, row]}
    # the same work in both processes: 2 TFLOP/s at a median of 2 ms, 1 TFLOP/s at 4 ms
    merged = bench_isolated.merge([report([1.0, 3.0], 2.0), report([4.0, 4.0], 1.0)], 2, 2)
    eager, fused = merged["results"]
    assert fused["times_ms"] == [1.0, 3.0, 4.0, 4.0] and fused["median_ms"] == 3.5
    assert fused["tflops"] == pytest.approx(4.0 / 3.5)
    assert fused["speedup_vs_eager"] == pytest.approx(4.0 / 3.5)
    assert fused["processes"] == 2 and fused["page_faults_per_call"] == 1
    assert "max_rel_diff_vs_eager" not in fused and eager["reps"] == 4
    merged = bench_isolated.merge([report([1.0], 1.0), report(None, None, "RuntimeError: x")],
                                  2, 1)
    assert merged["results"][1]["error"] == "RuntimeError: x"


def test_bench_train_cli(tmp_path, capsys):
    """--train: one training step per call for every training provider, the loss compared with
    torchvision's; an unknown provider is a row with an error naming the known ones."""
    js = tmp_path / "t.json"
    rc = main(["bench", "--train", "--arch", "resnet18", "--batch", "2", "--size", "32",
               "--device", "cpu", "--providers",
               "eager,eager_cl,fused,fused_cl,fused_bn,checkpoint_cl,bogus",
               "--warmup", "0", "--min-reps", "2", "--min-time", "0", "--quiet", "--json",
               str(js)])
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["meta"]["mode"] == "train" and report["meta"]["train_bn"] == "fused"
    rows = {r["provider"]: r for r in report["results"]}
    assert "expected one of" in rows["bogus"]["error"]
    for name in ("eager", "eager_cl", "fused", "fused_cl", "fused_bn", "checkpoint_cl"):
        r = rows[name]
        assert "error" not in r, r
        assert r["reps"] >= 2 and r["max_rel_diff_vs_eager"] < 1e-4  # the loss
    assert "train fused" in capsys.readouterr().out


@pytest.mark.parametrize("pass_", bench.EVAL_GRAD)
def test_bench_eval_grad_cli(tmp_path, pass_, monkeypatch):
    """--eval-grad: eval mode with autograd recording for every provider (the fused chains run
    bn_eval_act), outputs compared with torchvision's; --train with it is refused."""
    from resnet_fused import extension_ops
    calls = []
    original = extension_ops.bn_eval_act
    monkeypatch.setattr(extension_ops, "bn_eval_act", lambda *a: calls.append(1) or original(*a))
    js = tmp_path / "g.json"
    rc = main(["bench", "--eval-grad", pass_, "--arch", "resnet18", "--batch", "1", "--size",
               "32", "--device", "cpu", "--providers", "eager,eager_cl,fused:torch",
               "--warmup", "0", "--min-reps", "2", "--min-time", "0", "--quiet", "--json",
               str(js)])
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["meta"]["mode"] == f"eval with autograd ({pass_})"
    for r in report["results"]:
        assert "error" not in r, r
        assert r["reps"] >= 2 and r["max_rel_diff_vs_eager"] < 1e-4
    from resnet_fused import extension
    if extension.unavailable_reason() is None:  # (stock's ops without it: the rows still run)
        assert calls  # the fused rows ran the eval-with-autograd chain
    with pytest.raises(SystemExit, match="--train and --eval-grad exclude each other"):
        main(["bench", "--train", "--eval-grad", pass_, "--device", "cpu"])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_bench_openvino_and_autocast_rows(tmp_path, autocast):
    """The opt-in OpenVINO provider (a test-time extra) next to eager and fused, in fp32 and
    under autocast(bf16) (fp32 models, bf16 compute: OpenVINO's bf16 precision hint)."""
    components.importorskip("openvino", "openvino")
    js = tmp_path / "o.json"
    args = ["bench", "--arch", "resnet18", "--batch", "1", "--size", "32", "--device", "cpu",
            "--providers", "eager,openvino,fused", "--warmup", "0", "--min-reps", "2",
            "--min-time", "0", "--quiet", "--json", str(js)]
    if autocast:
        args += ["--dtype", "bf16", "--autocast"]
    assert main(args) == 0
    report = json.loads(js.read_text())
    assert report["meta"]["autocast"] is autocast
    rows = {r["provider"]: r for r in report["results"]}
    assert set(rows) == {"eager", "openvino", *(f"fused:{n}" for n in
                                                bench.available_fused_backends(CPU))}
    for r in rows.values():
        assert "error" not in r, r
        # fp32: ~1e-6 of rounding; bf16: a few bf16 steps, each provider rounding its own way
        assert r["max_rel_diff_vs_eager"] < (5e-2 if autocast else 1e-4), r
    assert "openvino" not in bench.expand_providers("all", CPU)
