"""End-to-end forward: resnet18/50/101, every provider, side by side (pytest-benchmark).

GPU variants: batch 1, 32, 256 in fp16. CPU variants: batch 1 fp32 at 224x224 (torch.compile only
with --bench-compile). With --benchmark-disable (make test) every provider runs once on resnet18
at 32x32.
"""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torchvision

from resnet_fused import backends
from resnet_fused.tools import bench as rf_bench
from resnet_fused.tools.cli import DTYPES
from resnet_fused.walk import layers, meta_model

import components
from harness import device_or_skip, record, run_pedantic

ARCHS = ["resnet18", "resnet50", "resnet101"]
CASES = [("cpu", 1, "fp32"), ("cuda", 1, "fp16"), ("cuda", 32, "fp16"), ("cuda", 256, "fp16")]
PROVIDERS = ["eager", "eager_cl", "compile", "compile_max",
             *(f"fused:{n}" for n in backends.NAMES if n != "auto"), "fused+graphs",
             "fused+graphs_safe"]
ROUNDS = {"cpu": 5, 1: 50, 32: 20, 256: 10}

_models: dict = {}


def _stock(arch, device, dtype):
    key = (arch, device, dtype)
    if key not in _models:
        _models.clear()  # one model at a time (GPU memory)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        _models[key] = getattr(torchvision.models, arch)().eval().to(device=device, dtype=dtype)
    return _models[key]


def _skip_reason(arch, provider, device, is_smoke, bench_compile):
    if is_smoke and arch != ARCHS[0]:
        return f"the smoke run (--benchmark-disable) covers {ARCHS[0]} only"
    if provider.startswith("compile"):
        if is_smoke:
            return "torch.compile is too slow for the smoke run"
        if device.type == "cpu" and not bench_compile:
            return "torch.compile on CPU takes minutes: pass --bench-compile"
    if provider.startswith("fused+graphs") and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if provider.startswith("fused:"):
        name = provider[6:]
        if name == "triton" and device.type == "cpu":
            return "the Triton interpreter on CPU is for correctness, not timing"
        components.backend(name, device)  # skips, or fails where the backend should run
    return None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}")
@pytest.mark.parametrize("arch", ARCHS)
def test_e2e(benchmark, arch, case, provider, is_smoke, bench_compile):
    device_name, batch, dtype_name = case
    device = device_or_skip(device_name)
    reason = _skip_reason(arch, provider, device, is_smoke, bench_compile)
    if reason:
        pytest.skip(reason)
    dtype = DTYPES[dtype_name]
    size = 32 if is_smoke else 224
    if is_smoke:
        batch = 1
    stock = _stock(arch, device, dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    run = rf_bench.make_runner(provider, stock, x, device)
    name = getattr(run, "backend", None)  # fused:<name>: selected around the timing
    with backends.backend(name) if name else contextlib.nullcontext():
        with torch.inference_mode():
            out = run()  # first call: fold cache, autotuning, compilation
            ref = stock(x)
            rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert rel < (1e-3 if dtype == torch.float32 else 5e-2), f"{provider}: rel diff {rel:.2e}"
        rounds = 1 if is_smoke else ROUNDS["cpu" if device.type == "cpu" else batch]
        timed = run_pedantic(benchmark, run, device, rounds=rounds,
                             warmup_rounds=0 if is_smoke else 2)
    specs = layers(meta_model(arch), (batch, 3, size, size))
    record(benchmark, device, dtype, timed, images=batch, macs=sum(s.macs for s in specs),
           min_bytes=sum(s.min_bytes(x.element_size()) for s in specs), arch=arch, batch=batch,
           image_size=size, provider=provider, auto_backend=backends.device_choice(device),
           backend=name or "", max_rel_diff_vs_eager=rel)
