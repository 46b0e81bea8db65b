"""The correctness sweep (`python -m resnet_fused check`) and the accuracy rule it applies.

On CPU the sweep runs in Triton's interpreter on a small subset (resnet18 at 32x32, batch 1,
every Hopper config the autotuner could pick there): the same code path the GPU suite runs."""
from __future__ import annotations

import argparse

import pytest
import torch

from resnet_fused.tools import check
from resnet_fused.numerics import rule_violation

import components
components.importorskip("triton", "triton")  # pinned: a failure under strict mode (CI)


def _args(**kw):
    p = argparse.ArgumentParser()
    check.add_arguments(p)
    argv = ["--device", "cpu", "--workers", "1", "--batch", "1", "--size", "32"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *([v] if isinstance(v, str) else v)]
    return p.parse_args(argv)


@pytest.mark.slow  # ~45 s; the kernel configs it sweeps are covered by test_conv_triton
def test_sweep_under_interpreter(monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "check.json"
    rc = check.main(_args(arch=["resnet18"], dtype=["fp32"], json=str(out)))
    import json
    report = json.loads(out.read_text())
    assert rc == 0, check.format_table(report["summary"])
    assert report["rows"] and all(r["status"] == "ok" for r in report["rows"])
    # every distinct conv of resnet18 ran with at least one config
    assert {r["problem"] for r in report["rows"]} == {
        str(p) for p in check.problems(["resnet18"], [1], 32)}


def test_problems_are_distinct_and_cover_the_chain_kinds():
    probs = check.problems(["resnet50"], [1, 256], 224)
    assert len(probs) == len(set(probs))
    kinds = {(p.kh, p.relu, p.residual) for p in probs}
    assert {(7, True, False), (1, False, False), (1, True, True), (3, True, False)} <= kinds
    assert {p.n for p in probs} == {1, 256}


def test_sweep_runs_every_candidate_variant():
    """The GPU sweep covers what tuning can pick, variants included: the stem's 32-wide K block,
    split-K at batch 1, TMA on Hopper; every candidate belongs to exactly one job."""
    from resnet_fused.backends.triton import conv
    probs = {str(p): p for p in check.problems(["resnet50"], [1], 224)}
    dtype = torch.float16

    def swept(p):
        return [c for i in check.tunable(p, "hopper", dtype)
                for c in check.variants(p, "hopper", dtype, i)]
    stem = swept(probs["1x3x224x224 -> 64 7x7/2"])
    assert stem and all(c.block_k == 32 for c in stem)
    late = swept(probs["1x2048x7x7 -> 512 1x1/1"])
    assert any(c.split_k > 1 for c in late) and any(c.tma for c in late)
    for p in probs.values():
        got = swept(p)
        assert len(got) == len(set(got))
        args = check.kernel_args_for(p, dtype, "hopper")
        assert set(got) == set(conv.candidates("hopper", dtype, p.m, p.c_out,
                                               conv.FAMILY_SMS["hopper"], args))


def test_nan_stays_in_its_group(monkeypatch, one_thread):
    """A grouped conv whose N tile spans several groups: a NaN input must not spread to the
    other groups of the tile through the zero weights of the block-diagonal B tile (the H200
    sweep found it in every config; the kernel now recomputes such tiles group by group)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from resnet_fused.backends.triton import conv
    p = check.Problem(1, 32, 6, 6, 32, 3, 3, (1, 1), (1, 1), (1, 1), 8, True, False)
    x, w, scale, shift, res = check.make_inputs(p, torch.float32, torch.device("cpu"), seed=0)
    stock, ref = check.stock_and_reference(p, x, w, scale, shift, res)
    out = conv.conv_bn_act(x, w, scale, shift, res, p.stride, p.padding, p.dilation, p.groups,
                           p.relu, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1))
    assert rule_violation(out, stock, ref, torch.float32) is None


def test_rule_judges_nan_pattern_and_ignores_stock_nan_elsewhere():
    ref = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    good = ref.float()
    assert rule_violation(good, good, ref, torch.float32) is None
    spread = torch.tensor([float("nan"), float("nan"), 3.0])
    assert "NaN pattern" in rule_violation(spread, good, ref, torch.float32)
    lost = torch.tensor([1.0, 0.0, 3.0])
    assert "NaN pattern" in rule_violation(lost, good, ref, torch.float32)
    # stock that spreads NaN further (cuDNN's fp16 stem does) still gives a finite bound
    assert rule_violation(good, spread, ref, torch.float32) is None
    off = torch.tensor([1.01, float("nan"), 3.0])
    assert "err" in rule_violation(off, good, ref, torch.float32)


def test_rule_takes_stocks_own_nonfinite_pattern():
    """Where stock's pattern departs from float64's (oneDNN's bf16 conv on an AMD EPYC turns an
    Inf input into NaN), exactly stock's pattern passes too; anything else still fails."""
    ref = torch.tensor([float("inf"), 2.0, 3.0], dtype=torch.float64)
    stock = torch.tensor([float("nan"), 2.0, 3.0])
    assert rule_violation(stock.clone(), stock, ref, torch.float32) is None
    assert rule_violation(ref.float(), stock, ref, torch.float32) is None  # float64's pattern
    spread = torch.tensor([float("nan"), float("nan"), 3.0])
    assert "NaN pattern" in rule_violation(spread, stock, ref, torch.float32)
    assert "NaN pattern" in rule_violation(stock.clone(), None, ref, torch.float32)
    off = torch.tensor([float("nan"), 2.5, 3.0])
    assert "err" in rule_violation(off, stock, ref, torch.float32)
