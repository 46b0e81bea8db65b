"""The static kernel report (`python -m resnet_fused kernels`, resnet_fused/tools/kernels.py):
every candidate config of every conv layer compiled for sm_90 without a GPU, and the invariants
the kernel is held to: no register spills in any candidate, a candidate that fills one wave of
SMs for every layer at batch 1 (split-K), wgmma on every Hopper tile of 64 rows or more, TMA
in exactly the TMA candidates, and a main-loop instruction count for every kernel. The committed
table is benchmarks/results/triton_kernel_report_sm90.md (`make kernel-report`)."""
from __future__ import annotations

import json

import pytest

import components
components.importorskip("triton", "triton")  # pinned: a failure under strict mode (CI)
from resnet_fused.__main__ import main  # noqa: E402
from resnet_fused.tools import kernels  # noqa: E402

SHARED_LIMIT = 232448  # sm_90, bytes per block


def _check_invariants(rep):
    rows = rep["rows"]
    assert rows and rep["compile"]["errors"] == []
    assert rep["summary"]["max_spill_bytes"] == 0, [
        (r["layer"], r["batch"], r["config"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    if 1 in rep["batches"]:
        assert rep["summary"]["bs1_layers_below_one_wave"] == 0, rep["summary"]["below_one_wave"]
    for r in rows:
        assert r["shared_bytes"] <= SHARED_LIMIT, r
        assert r["loop_instructions"] and r["loop_mma"], r
        assert r["ctas_per_sm"] >= 1, r
        bm = int(r["config"].split("x")[0])
        assert r["mma"] == ("wgmma" if bm >= 64 else "mma.sync"), r
        assert r["roofline_us"] > 0
    split = [r for r in rows if r["split_k"] > 1]
    assert all(r["batch"] == 1 and r["kernels"] == 2 for r in split)  # split + reduction
    tma = [r for r in rows if r["config"].endswith(" tma")]
    assert tma and all(r["tma"] for r in tma) and not any(r["tma"] for r in rows if r not in tma)
    return rows


def test_report_invariants_on_representative_layers(tmp_path):
    """At batch 1, through the command line: layer4's 3x3 and the 1x1 after it (long K, few
    tiles: the layers split-K is for; TMA candidates for a 3x3 and a 1x1). The whole model at
    batch 1 and 256 (the stem too) is the slow test below and the committed report."""
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    assert main(["kernels", "--target", "sm_90", "--arch", "resnet50", "--batch", "1",
                 "--dtype", "fp16", "--layers", "layer4.0.conv2", "layer4.1.conv1",
                 "--json", str(out), "--markdown", str(md)]) == 0
    rep = json.loads(out.read_text())
    assert rep["target"] == "sm_90" and rep["sms"] == 132
    rows = _check_invariants(rep)
    names = {n for r in rows for n in r["layers"]}
    assert names == {"layer4.0.conv2", "layer4.1.conv1"}
    assert rep["summary"]["layers"] == len(names)
    assert all(any(r["split_k"] > 1 for r in rows if r["layer"] == name)
               for name in ("layer4.0.conv2", "layer4.1.conv1"))
    # TMA candidates: both operands on 1x1 stride-1 layers, the weight on 3x3 ones
    assert {"layer4.0.conv2", "layer4.1.conv1"} <= {r["layer"] for r in rows if r["tma"]}
    assert "| 1 | layer4.0.conv2 |" in md.read_text()


@pytest.mark.slow  # every layer, ~2-6 min per batch size on 2 cores: one test each, so that
@pytest.mark.parametrize("batch", [1, 256])  # pytest-xdist's two workers share them
def test_whole_resnet50_report_sm90(batch):
    _check_invariants(kernels.report("resnet50", [batch], "fp16", 90))


def test_occupancy_and_roofline_arithmetic():
    t = kernels.TARGETS[90]
    # 128 regs x 128 threads = 16384 regs per CTA: 4 by registers; 64 KiB + 1 KiB shared: 3
    assert kernels.ctas_per_sm(t, 128, 4, 65536) == 3
    assert kernels.ctas_per_sm(t, 255, 8, 1024) == 1       # 256 regs x 256 threads
    assert kernels.ctas_per_sm(t, 32, 4, 0) == 16          # warp slots: 64 / 4

    class Layer:  # 1 GFLOP, 1 MB: math-bound on sm_90
        macs = 500_000_000

        @staticmethod
        def min_bytes(element):
            return 1_000_000

    assert kernels.roofline_us(Layer, "fp16", t) == pytest.approx(1e9 / 790e12 * 1e6)


def test_bad_target_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["kernels", "--target", "sm_70"])
    assert e.value.code == 2
    assert "expected a CUDA architecture such as sm_90" in capsys.readouterr().err
