"""Ahead-of-time compilation of the Triton conv kernel for sm_90 and sm_80 .

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole
compiler (TTIR -> TTGIR -> LLIR -> PTX -> cubin via ptxas). Every autotune config of each arch's
list is compiled for its target, for the specialisations the JIT would produce on ResNet shapes
(argument types, divisibility-by-16 and ==1 specialisation derived from real tensor strides, exactly
as triton.jit derives them). The test records registers (from the cubin), spills, shared memory and
the MMA instruction family, fails if a config needs more shared memory than the target has, and
writes the table to build/triton_compile_report.md (`make compile-report`: the committed
benchmarks/results/triton_compile_report.md).

The compiled (not interpreted) kernel object is built on demand by the backend, so this test works
in the same session as the interpreter tests, whatever TRITON_INTERPRET says.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import List

import pytest
import torch

import components
triton = components.importorskip("triton", "triton")  # pinned: a failure under strict mode (CI)
from resnet_fused.backends.triton import aot, sass  # noqa: E402
from resnet_fused.backends.triton import conv as tconv  # noqa: E402

# Shared memory per block (opt-in maximum): H100 227 KiB, A100 163 KiB.
TARGETS = {90: ("hopper", 232448), 80: ("ampere", 166912)}
# Tests never write tracked files: the report goes to build/ unless `make compile-report` asks for
# the committed copy (benchmarks/results/triton_compile_report.md).
REPORT = Path(os.environ.get("RESNET_FUSED_COMPILE_REPORT") or
              Path(__file__).resolve().parents[1] / "build" / "triton_compile_report.md")


def _cl(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(
        memory_format=torch.channels_last)


def _problem(variant: str, dtype: torch.dtype):
    """(x, weight, residual, stride, padding, dilation, groups, relu) for a ResNet-like shape."""
    if variant == "3x3 taps":             # ResNet-50 layer1 3x3 at batch 32
        return _cl((32, 64, 56, 56), dtype), _cl((64, 64, 3, 3), dtype), None, 1, 1, 1, 1, True
    if variant == "1x1 +res":             # bottleneck expand 1x1 with the residual add
        return (_cl((32, 64, 56, 56), dtype), _cl((256, 64, 1, 1), dtype),
                _cl((32, 256, 56, 56), dtype), 1, 0, 1, 1, True)
    if variant == "stem flat-K":          # 7x7/2, C_in = 3
        return _cl((32, 3, 224, 224), dtype), _cl((64, 3, 7, 7), dtype), None, 2, 3, 1, 1, True
    if variant == "grouped 3x3":          # ResNeXt-50 32x4d layer1 3x3/1 (4 channels per group)
        return _cl((32, 128, 56, 56), dtype), _cl((128, 4, 3, 3), dtype), None, 1, 1, 1, 32, True
    if variant == "1x1/2 linear":         # downsample, relu=False
        return _cl((32, 256, 56, 56), dtype), _cl((512, 256, 1, 1), dtype), None, 2, 0, 1, 1, False
    if variant == "depthwise":            # C_in/g = C_out/g = 1: both specialise to constexpr 1
        return _cl((8, 64, 28, 28), dtype), _cl((64, 1, 3, 3), dtype), None, 1, 1, 1, 64, True
    if variant == "NCHW input":           # channel stride H*W, pixel stride 1
        x = torch.empty((8, 64, 28, 28), dtype=dtype, device="meta")
        return x, _cl((64, 64, 3, 3), dtype), None, 1, 1, 1, 1, True
    if variant == "int64 strides":        # a batch stride past 2^31 elements: i64 arguments
        x = torch.empty_strided((2, 64, 56, 56), (2**31 + 64, 1, 56 * 64, 64), dtype=dtype,
                                device="meta")
        res = torch.empty_strided((2, 64, 56, 56), (2**31 + 64, 1, 56 * 64, 64), dtype=dtype,
                                  device="meta")
        return x, _cl((64, 64, 3, 3), dtype), res, 1, 1, 1, 1, True
    raise KeyError(variant)


def problem_args(variant: str, dtype: torch.dtype, precision: str) -> dict:
    """conv.kernel_args for the variant (meta tensors), with the precision forced."""
    x, weight, res, s, p, d, groups, relu = _problem(variant, dtype)
    c_out, _, kh, kw = weight.shape
    oh, ow = tconv.out_hw(x.shape[2], x.shape[3], (kh, kw), (s, s), (p, p), (d, d))
    out = _cl((x.shape[0], c_out, oh, ow), dtype)
    scale = torch.empty(c_out, device="meta")
    args = tconv.kernel_args(x, weight, scale, scale, res, out, (s, s), (p, p), (d, d), groups,
                             relu, interpret=False)
    args["PRECISION"] = precision
    return args


# What is compiled, per target with that arch's config list: every config for each K-loop kind /
# epilogue in fp16 (the product dtype) and for fp32 with 3xTF32 (fp32 has its own list: BLOCK_K
# halved); one mid config for the remaining specialisations (bf16 compiles like fp16 with another
# MMA type; fp32-IEEE is the allow_tf32=False path; strides/groups edge cases).
EVERY_CONFIG = [("fp16", "3x3 taps"), ("fp16", "1x1 +res"), ("fp16", "stem flat-K"),
                ("fp16", "grouped 3x3"), ("fp32-tf32", "3x3 taps")]
ONE_CONFIG = [("bf16", "3x3 taps"), ("fp32-ieee", "3x3 taps"), ("fp16", "1x1/2 linear"),
              ("fp16", "depthwise"), ("fp16", "NCHW input"), ("fp16", "int64 strides")]
DTYPES = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"),
          "fp32-tf32": (torch.float32, "tf32x3"), "fp32-ieee": (torch.float32, "ieee")}


def _shared_estimate(cfg) -> int:
    """Relative shared-memory footprint of a config: the A and B tiles times the stages."""
    bm, bn, bk, stages = cfg.block_m, cfg.block_n, cfg.block_k, cfg.stages
    return (bm * bk + bk * bn) * stages


def _jobs(every: bool = True, caps=tuple(TARGETS)):
    """every=True: the full sweep. every=False (the default run's quick test): one config per
    variant and target -- for EVERY_CONFIG's variants the largest (most shared memory, the one
    a target's limit catches first), for ONE_CONFIG's the same mid config as the full sweep."""
    jobs = []
    for cap in caps:
        family = TARGETS[cap][0]
        for label, variant in EVERY_CONFIG + ONE_CONFIG:
            dtype, precision = DTYPES[label]
            configs = tconv.config_tuples(family, dtype)
            if (label, variant) in ONE_CONFIG:
                configs = [configs[len(configs) // 2]]
            elif not every:
                configs = [max(configs, key=_shared_estimate)]
            jobs += [(cap, label, dtype, precision, variant, cfg) for cfg in configs]
    return jobs


def _compile_one(job):
    cap, label, dtype, precision, variant, cfg = job
    compiled = aot.compile_job(aot.job(problem_args(variant, dtype, precision), cfg, cap))
    ptx = compiled.asm["ptx"]
    try:
        res = sass.resource_usage(compiled.asm["cubin"])
    except FileNotFoundError:  # no cuobjdump: the rest of the report still stands
        res = {}
    return dict(cap=cap, dtype=label, variant=variant, config=cfg,
                shared=int(compiled.metadata.shared), regs=res.get("REG"),
                spill=sass.spill_bytes(res) if res else None,
                mma=sass.mma_kind(ptx), cp_async=sass.cp_async_widths(ptx))


def _write_report(rows: List[dict]) -> None:
    lines = [
        "# Triton conv kernel: ahead-of-time compile report",
        "",
        f"Generated by `tests/test_triton_compile.py` with triton {triton.__version__} "
        f"(no GPU: `triton.compile(ASTSource(...), target=GPUTarget('cuda', cap, 32))`).",
        "Each arch's autotune list is compiled for its target (HOPPER -> sm_90, AMPERE -> sm_80). "
        "Config = BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M, warps, stages. Registers and spills "
        "(local + stack bytes per thread) from `cuobjdump -res-usage` on the cubin; shared = "
        "bytes of shared memory Triton allocates (limit: sm_90 232448, sm_80 166912). MMA: the "
        "instruction family in the PTX (wgmma = Hopper warpgroup MMA, mma.sync = Ampere-style "
        "tensor-core MMA, fma = no tensor cores). cp.async: global->shared copies by width.",
        "",
        "| target | dtype | kernel | config | regs | spill B | shared B | MMA | cp.async |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bm, bn, bk, gm, w, s = r["config"][:6]
        lines.append(f"| sm_{r['cap']} | {r['dtype']} | {r['variant']} | {bm}x{bn}x{bk} g{gm} "
                     f"w{w} s{s} | {r['regs'] if r['regs'] is not None else 'n/a'} | "
                     f"{r['spill'] if r['spill'] is not None else 'n/a'} | {r['shared']} | "
                     f"{r['mma']} | {r['cp_async']} |")
    wg = sorted({r["config"] for r in rows if r["cap"] == 90 and r["mma"] == "wgmma"})
    no_wg = sorted({r["config"] for r in rows
                    if r["cap"] == 90 and r["mma"] != "wgmma" and r["dtype"] != "fp32-ieee"})
    def fmt(cs):
        return ", ".join("x".join(map(str, c[:3])) + f" w{c[4]}" for c in cs) or "none"

    lines += ["", "## wgmma on sm_90", "",
              f"- Configs that emit wgmma (some kernel/dtype): {fmt(wg)}",
              f"- Configs without wgmma for some kernel/dtype (fp32-IEEE excluded: no tensor "
              f"cores by definition): {fmt(no_wg)}", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines))


def _compile_and_check(jobs, report: bool):
    # Triton's on-disk cache is keyed on source, target and options, so a rerun reuses the
    # compiled kernels safely (cold: ~1 s per compile per core).
    rows, failures = [], []
    for job in jobs:
        try:
            rows.append(_compile_one(job))
        except Exception as e:  # collect every failure, then fail once with all of them
            failures.append(f"sm_{job[0]} {job[1]} {job[4]} {job[5]}: {type(e).__name__}: {e}")
    if report:
        _write_report(rows)
        print("\n" + REPORT.read_text())
    assert not failures, "\n".join(failures)
    for r in rows:
        limit = TARGETS[r["cap"]][1]
        assert r["shared"] <= limit, f"{r} needs {r['shared']} B shared memory > {limit}"
    # Every fp16/bf16/TF32 config compiles to tensor-core MMA on both targets.
    for r in rows:
        if r["dtype"] in ("fp16", "bf16", "fp32-tf32"):
            assert r["mma"] in ("wgmma", "mma.sync"), r


# sm_90 is the GPU the project runs on; sm_80's share (~20 s on a cold cache) is `slow`.
@pytest.mark.parametrize("cap", [90, pytest.param(80, marks=pytest.mark.slow)],
                         ids=["sm_90", "sm_80"])
def test_compile_one_config_per_variant(cap):
    """The default run's share of the sweep below: every kernel variant and dtype, one config
    each (11 compiles per target instead of the sweep's 87 for both; ~20 s cold on 2 cores)."""
    _compile_and_check(_jobs(every=False, caps=(cap,)), report=False)


@pytest.mark.slow  # ~70 s on a cold Triton cache (2 cores); `make test-all`, `make compile-report`
def test_compile_every_config_for_sm90_and_sm80():
    """Every autotune config: writes the compile report (build/, or the committed copy)."""
    _compile_and_check(_jobs(), report=True)


def _jit_cache_key(args: dict, config: tuple, capability: int) -> str:
    """The on-disk cache key triton.jit computes for the first launch of `config` on `args`."""
    return _jit_launch_key(tconv.launches(args, config)[0][1], capability)


def _jit_launch_key(run: dict, capability: int) -> str:
    """The on-disk cache key triton.jit computes for one launch with keyword arguments `run`
    (conv.launches): its own binder and argument packing with the options JITFunction.run adds
    (private API, test only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import get_cache_key
    from triton.runtime import jit as triton_jit
    from triton._C.libtriton import get_cache_invalidating_env_vars
    kernel = tconv.jit_kernel(False)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    values = dict(run)
    kwargs = {"num_warps": values.pop("num_warps"), "num_stages": values.pop("num_stages"),
              "debug": False}
    if "instrumentation_mode" in inspect.getsource(triton_jit.JITFunction.run):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(**values, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return get_cache_key(ASTSource(kernel, signature, constexprs, attrs), backend, options,
                         get_cache_invalidating_env_vars())


def _aot_cache_key(j) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.compiler.compiler import get_cache_key
    from triton._C.libtriton import get_cache_invalidating_env_vars
    backend = make_backend(GPUTarget("cuda", j.capability, 32))
    options = backend.parse_options({"num_warps": j.num_warps, "num_stages": j.num_stages})
    return get_cache_key(aot.source(j), backend, options, get_cache_invalidating_env_vars())


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("residual", [False, True])
def test_aot_source_is_what_the_jit_would_compile(batch, residual):
    """warmup compiles with aot.job in worker processes; that only saves time if the JIT's own
    launch later finds the result in Triton's cache, i.e. if both derive the same cache key
    (signature, ==1 and divisibility specialisation, options). Real CPU tensors stand in for the
    GPU ones (the JIT reads only their dtype and address alignment). Batch 1/3/16 give M = 49,
    147, 784: M is not specialised, so every batch size must map to the same key."""
    keys = set()
    for cap in (90, 80):
        x = torch.zeros(batch, 64, 7, 7, dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        w = torch.zeros(64, 64, 3, 3, dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        out = torch.empty_like(x)
        s = torch.zeros(64)
        res = torch.zeros_like(x) if residual else None
        args = tconv.kernel_args(x, w, s, s, res, out, (1, 1), (1, 1), (1, 1), 1, True,
                                 interpret=False)
        config = tconv.config_tuples("hopper" if cap == 90 else "ampere", torch.float16)[-2]
        key = _aot_cache_key(aot.job(args, config, cap))
        assert key == _jit_cache_key(args, config, cap)
        keys.add(key)
    assert len(keys) == 2


@pytest.mark.parametrize("config", [tconv.Config(16, 32, 128, 1, 4, 4, split_k=4),
                                    tconv.Config(64, 64, 64, 8, 4, 3, tma=True)],
                         ids=["split_k", "tma"])
def test_aot_keys_match_the_jit_for_every_launch(config):
    """Split-K (main + REDUCE) and TMA launches (tensor-descriptor arguments): every kernel the
    warmup compiles is the one each launch looks up, and the TMA kernel uses the TMA unit."""
    x = torch.zeros(1, 512, 7, 7, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    w = torch.zeros(256, 512, 1, 1, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    out = torch.empty(1, 256, 7, 7, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    s = torch.zeros(256)
    args = tconv.kernel_args(x, w, s, s, None, out, (1, 1), (0, 0), (1, 1), 1, True,
                             interpret=False)
    runs = tconv.launches(args, config)
    jobs = aot.jobs(args, config, 90)
    assert len(runs) == len(jobs) == (2 if config.split_k > 1 else 1)
    for (_, run), j in zip(runs, jobs):
        assert _aot_cache_key(j) == _jit_launch_key(run, 90)
    assert sass.uses_tma(aot.compile_job(jobs[0]).asm["ptx"]) == config.tma


@pytest.mark.parametrize("tma", [False, True])
def test_fallback_specialisation_compiles_the_same_code(monkeypatch, tmp_path, tma):
    """Without Triton's binder, aot.job derives the specialisation from public facts: the same
    signature and constants, and the same code (the JIT's extra empty attribute lists change only
    the cache key). With TMA: tensor-descriptor arguments, and the PTX uses the TMA unit."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    args = problem_args("1x1 +res", torch.float16, "ieee")
    config = (tconv.Config(64, 64, 64, 8, 4, 3, 1, True) if tma else
              tconv.config_tuples("hopper", torch.float16)[-1])
    exact = aot.job(args, config, 90)
    monkeypatch.setattr(aot, "_jit_specialisation", lambda *a: 1 / 0)
    derived = aot.job(args, config, 90)
    src_exact, src_derived = aot.source(exact), aot.source(derived)
    assert src_exact.signature == src_derived.signature
    assert src_exact.constants == src_derived.constants
    assert ({k: v for k, v in src_exact.attrs.items() if v}
            == {k: v for k, v in src_derived.attrs.items() if v})
    ptx = aot.compile_job(exact).asm["ptx"]
    assert ptx == aot.compile_job(derived).asm["ptx"]
    assert sass.uses_tma(ptx) == tma


def test_compile_all_in_parallel(tmp_path, monkeypatch):
    """Distinct jobs only, each landing in Triton's cache: on a cold cache the first two run in
    this process (the second is a miss) and the rest in worker processes; on a warm one all
    run here (cache hits, no process spawned)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    args = problem_args("1x1 +res", torch.float16, "ieee")
    configs = tconv.config_tuples("hopper", torch.float16)[-3:]
    jobs = [aot.job(args, c, 90) for c in configs] * 2
    report = aot.compile_all(jobs, workers=2)
    assert report["jobs"] == 3 and report["workers"] == 2 and report["errors"] == []
    assert report["in_process"] == 2
    assert len(list(tmp_path.rglob("*.cubin"))) == 3
    again = aot.compile_all(jobs, workers=2)
    assert again["in_process"] == 3 and again["errors"] == []
