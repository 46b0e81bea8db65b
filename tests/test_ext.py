"""The compiled extension (csrc/): the build itself, bn_act_train (+ backward), scale_shift_act
and bn_eval_act against float64 references on odd shapes and both layouts, gradcheck, opcheck,
bad input, and the package without the extension."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import extension
import components
from numerics import assert_within_rule, max_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Missing or stale: skipped locally, a failure under strict mode (CI) unless opted out.
_EXT_OFF = components.opted_out("extension")
pytestmark = components.needs("extension", f"${_EXT_OFF} is set" if _EXT_OFF
                              else extension.unavailable_reason())
# No GPU: a skip; a GPU but no CUDA kernels in the extension: components' rule.
CUDA_KERNELS = components.needs_gpu("cuda-kernels", lambda: extension.unavailable_reason("cuda"))

ops = torch.ops.resnet_fused
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=CUDA_KERNELS)] if torch.cuda.is_available()
                     else [])
# (N, C, H, W): C not a multiple of the vector width (8 fp32 / 4 fp64 lanes), batch 1, 1x1 maps,
# one channel, and some full vectors.
SHAPES = [(1, 3, 5, 7), (2, 13, 1, 1), (1, 1, 3, 3), (3, 17, 4, 5), (2, 9, 3, 1), (2, 16, 3, 3)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bn_inputs(shape, dtype, param_dtype, residual, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    # Per-channel offsets and scales over a wide range: a centred unit input hides bugs.
    x = (torch.randn(shape, generator=gen) * (torch.rand(c, 1, 1, generator=gen) * 3 + 0.1)
         + torch.randn(c, 1, 1, generator=gen) * 2)
    weight = torch.rand(c, generator=gen) * 1.5 + 0.25
    bias = torch.randn(c, generator=gen) * 0.5
    res = torch.randn(shape, generator=gen) if residual else None
    rm = torch.randn(c, generator=gen) * 0.5
    rv = 10 ** (torch.rand(c, generator=gen) * 4 - 3)
    cast = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (cast(x, dtype), cast(weight, param_dtype), cast(bias, param_dtype), cast(res, dtype),
            cast(rm, param_dtype), cast(rv, param_dtype))


def _bn_stock(x, weight, bias, residual, rm, rv, momentum, eps, relu):
    """Stock torch, same dtype: F.batch_norm (+ residual) (+ relu); returns (out, rm, rv)."""
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    out = F.batch_norm(x, rm, rv, weight, bias, True, momentum, eps)
    if residual is not None:
        out = out + residual
    return (torch.relu(out) if relu else out), rm, rv


def _double(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def _fmt(t, fmt):
    return None if t is None else t.contiguous(memory_format=fmt)


# ---- build ------------------------------------------------------------------------------------
def _cuda_toolchain_missing():
    """None when setup.py must have built CUDA kernels here (torch with CUDA + matching nvcc),
    else why it could not."""
    if components.opted_out("cuda-kernels"):
        return f"${components.opted_out('cuda-kernels')} is set"
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        nvcc = shutil.which("nvcc")
    if not nvcc:
        return f"no nvcc in {home}/bin or on PATH"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as e:
        return f"{nvcc} --version failed: {e}"
    m = re.search(r"release (\d+)\.", out)
    if not m or m.group(1) != torch.version.cuda.split(".")[0]:
        return f"{nvcc} is CUDA {m.group(1) if m else '?'}, torch is CUDA {torch.version.cuda}"
    return None


def test_library_is_in_the_package_and_reports_itself():
    module = extension.load()
    assert os.path.dirname(module.__file__) == os.path.dirname(resnet_fused.__file__)
    assert module.torch_version == torch.__version__
    assert module.ops_version == extension.OPS_VERSION
    status = extension.status()
    assert status.startswith("built: ") and module.__file__ in status


def test_library_from_other_sources_is_refused(monkeypatch):
    """A build whose ops_version differs (e.g. one from before the autograd moved to C++, which
    would run the ops without gradients) is refused, with the rebuild command."""
    monkeypatch.setattr(extension, "OPS_VERSION", extension.OPS_VERSION + 1)
    module, reason = extension._load()
    assert module is None
    assert f"ops version {extension.OPS_VERSION - 1}" in reason and "make install" in reason


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only torch: no CUDA kernels to build")
@components.needs("cuda-kernels", torch.version.cuda and _cuda_toolchain_missing())
def test_cuda_objects_built_for_sm80_and_sm90():
    """CI compiles the .cu sources: a CUDA toolchain present means CUDA kernels in the build,
    with SASS for sm_80 and sm_90 (unless TORCH_CUDA_ARCH_LIST asked for something else)."""
    module = extension.load()
    assert module.with_cuda, extension.status()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        assert {"sm_80", "sm_90"} <= set(extension.built_archs()), extension.status()


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only torch: no CUDA kernels to build")
@components.needs("cuda-kernels", torch.version.cuda and _cuda_toolchain_missing())
def test_cuda_kernels_static_report():
    """benchmarks/cuda_kernel_report.py reads every kernel's resources from the built library:
    no register spills anywhere, and the elementwise kernels' vector variants use 16-byte
    loads and stores."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import cuda_kernel_report as report
    tool = report.find_cuobjdump()
    components.require("cuda-kernels", None if tool else "no cuobjdump to read the kernels")
    rows = report.collect(report.library(), tool)
    assert {r["arch"] for r in rows} >= {"sm_80", "sm_90"}
    assert not [r["name"] for r in rows if r["local"]]
    vectorised = [r for r in rows
                  if re.match(r"(apply_nhwc|apply_nchw|grad_input)_kernel<\w+, [248]\b", r["name"])]
    assert {r["name"].split("<")[0] for r in vectorised} == {
        "apply_nhwc_kernel", "apply_nchw_kernel", "grad_input_kernel"}
    assert all(r["load_bits"] == r["store_bits"] == 128 for r in vectorised), \
        [(r["name"], r["load_bits"], r["store_bits"]) for r in vectorised]
    assert "| sm_90 |" in report.markdown(rows, report.library())


def test_arch_compatibility_rule():
    archs = ("sm_80", "sm_90", "compute_90")
    assert extension._runs_on((8, 0), archs) and extension._runs_on((8, 6), archs)
    assert extension._runs_on((9, 0), archs) and extension._runs_on((10, 0), archs)  # PTX JIT
    assert not extension._runs_on((7, 5), archs)
    assert not extension._runs_on((10, 0), ("sm_80", "sm_90"))


# ---- bn_act_train: forward, running stats, backward vs float64 ----------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_train_matches_float64(device, shape, fmt, dtype, residual, relu):
    reduced = dtype in (torch.float16, torch.bfloat16)
    param_dtype = torch.float32 if reduced and shape[1] % 2 else dtype  # mixed and pure
    x, w, b, res, rm, rv = _bn_inputs(shape, dtype, param_dtype, residual, device)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    momentum, eps = 0.3, 1e-5
    leaves = [t.requires_grad_() for t in (x, w, b, res) if t is not None]

    out, mean, invstd, new_rm, new_rv, scale, shift = ops.bn_act_train(x, w, b, res, rm, rv,
                                                                       momentum, eps, relu)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last if not x.is_contiguous()
                             else torch.contiguous_format)
    assert mean.dtype == invstd.dtype == _acc(dtype)
    assert new_rm.dtype == new_rv.dtype == param_dtype
    # scale/shift are what `out` was computed from: scale_shift_act with the batch mean as its
    # center gives `out` again, bit for bit (the recompute of stage_recompute.py)
    assert scale.dtype == shift.dtype == _acc(dtype) and scale.shape == shift.shape == mean.shape
    with torch.no_grad():
        again = ops.scale_shift_act(x, scale, shift, res, relu, mean)
    assert again.stride() == out.stride() and torch.equal(again, out.detach())

    xd, wd, bd, resd = _double(x, w, b, res)
    ref, ref_rm, ref_rv = _bn_stock(xd, wd, bd, resd, rm.double(), rv.double(), momentum, eps, relu)
    stock, stock_rm, stock_rv = _bn_stock(x, w, b, res, rm, rv, momentum, eps, relu)
    _, ref_mean, ref_invstd = torch.native_batch_norm(xd.detach(), None, None, None, None, True,
                                                      momentum, eps)
    _, stock_mean, stock_invstd = torch.native_batch_norm(x.detach(), None, None, None, None,
                                                          True, momentum, eps)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, [t for t in (xd, wd, bd, resd) if t is not None],
                               grad.double())
    stock_grads = torch.autograd.grad(stock, leaves, grad)

    pairs = [("out", out, stock, ref), ("mean", mean, stock_mean, ref_mean),
             ("invstd", invstd, stock_invstd, ref_invstd),
             ("running_mean", new_rm, stock_rm, ref_rm), ("running_var", new_rv, stock_rv, ref_rv)]
    pairs += [(f"grad{i}", g, s, r) for i, (g, s, r) in enumerate(zip(got, stock_grads, want))]
    for name, fused, stock_t, ref_t in pairs:
        if dtype == torch.float64:
            scale = max(1.0, ref_t.abs().max().item())
            assert max_err(fused, ref_t) <= 1e-10 * scale, name
        else:
            # fp32 statistics of low-precision input are as exact as the fp32 reference
            rule_dtype = _acc(dtype) if name in ("mean", "invstd") or fused.dtype == torch.float32 \
                else dtype
            try:
                assert_within_rule(fused, stock_t, ref_t, rule_dtype)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
    if residual:  # the residual's grad is the masked grad, exactly
        assert leaves[3] is res
        masked = torch.where(out.detach() > 0, grad, torch.zeros_like(grad)) if relu else grad
        assert got[3].dtype == res.dtype == dtype
        assert torch.equal(got[3], masked.to(res.dtype)), \
            f"grad residual differs from the masked grad in {(got[3] != masked).sum()} places"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_bn_act_train_without_affine_or_running_stats(device, fmt):
    x, *_ = _bn_inputs((2, 7, 3, 4), torch.float64, torch.float64, False, device)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    out, mean, invstd, new_rm, new_rv, _, _ = ops.bn_act_train(x, None, None, None, None, None,
                                                               0.1, 1e-3, True)
    assert new_rm.numel() == 0 and new_rv.numel() == 0
    ref = torch.relu(F.batch_norm(x, None, None, None, None, True, 0.1, 1e-3))
    assert max_err(out, ref) <= 1e-12
    g = torch.randn_like(out)
    assert max_err(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_train_large_channel_mean(device):
    """|mean| >> std: the corrected two-pass statistics stay accurate in fp32."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 16, 16, generator=gen) * 1e-2 + 300).to(device)
    out, mean, invstd, *_ = ops.bn_act_train(x, None, None, None, None, None, 0.1, 1e-5, False)
    ref = F.batch_norm(x.double(), None, None, None, None, True, 0.1, 1e-5)
    stock = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert_within_rule(out, stock, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_bn_act_train_many_chunks(device, fmt):
    """Enough rows for several parallel chunks in both layouts (and several CUDA blocks)."""
    x, w, b, res, rm, rv = _bn_inputs((8, 24, 40, 40), torch.float64, torch.float64, True, device)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    out, _, _, new_rm, new_rv, _, _ = ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, True)
    ref, ref_rm, ref_rv = _bn_stock(x, w, b, res, rm, rv, 0.1, 1e-5, True)
    for got, want in ((out, ref), (new_rm, ref_rm), (new_rv, ref_rv)):
        assert max_err(got, want) <= 1e-12 * max(1.0, want.abs().max().item())


def test_bn_act_train_is_deterministic():
    """The same bits on 3 threads as on 1 (chunked moments merged in a fixed order)."""
    x, w, b, res, rm, rv = _bn_inputs((4, 24, 30, 30), torch.float32, torch.float32, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        first = ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, True)
        torch.set_num_threads(1)
        second = ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, True)
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_baseline_cpu_kernels_pass_the_same_tests():
    """The CPU kernels are compiled per instruction set and picked at run time; the baseline
    build (what a CPU without AVX2 runs, forced with torch's own ATEN_CPU_CAPABILITY=default)
    passes this file's CPU parity tests too."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    which = subprocess.run([sys.executable, "-c", "from resnet_fused import extension; "
                            "print(extension.load().cpu_kernels)"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert which.stdout.strip() == "baseline", which.stdout + which.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q",
                          "-p", "no:cacheprovider", "-k",
                          "not baseline and not cuda and (float64 or chunks or deterministic "
                          "or relu_mask)"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


def test_relu_mask_follows_torch_for_nan():
    """torch.relu keeps NaN and threshold_backward passes the grad at NaN outputs."""
    x = torch.tensor([[[[1.0, -2.0, float("nan"), 4.0]]]]).repeat(1, 2, 1, 1).double()
    x.requires_grad_()
    out = ops.bn_act_train(x, None, None, None, None, None, 0.1, 1e-5, True)[0]
    assert torch.isnan(out).all()  # NaN in the stats poisons the channel, as stock
    y = ops.scale_shift_act(x, torch.ones(2, dtype=torch.float64),
                            torch.zeros(2, dtype=torch.float64), None, True)
    ref = torch.relu(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and y[~torch.isnan(y)].eq(
        ref[~torch.isnan(ref)]).all()


# ---- scale_shift_act ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu,center", [(True, True, False), (False, True, False),
                                                   (False, False, False), (True, True, True)])
def test_scale_shift_act_matches_float64(device, shape, fmt, dtype, residual, relu, center):
    gen = torch.Generator().manual_seed(2)
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    res = (torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
           if residual else None)
    scale = (torch.rand(c, generator=gen) * 2 - 0.5).to(device, _acc(dtype))
    shift = torch.randn(c, generator=gen).to(device, _acc(dtype))
    mid = torch.randn(c, generator=gen).to(device, _acc(dtype)) if center else None
    leaves = [t.requires_grad_() for t in (x, scale, shift, res, mid) if t is not None]
    out = ops.scale_shift_act(x, scale, shift, res, relu, mid)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    xd, scaled, shiftd, resd, midd = _double(x, scale, shift, res, mid)
    ref = (xd - v(midd) if center else xd) * v(scaled) + v(shiftd)
    stock = (x - v(mid.to(dtype)) if center else x) * v(scale.to(dtype)) + v(shift.to(dtype))
    if residual:
        ref, stock = ref + resd, stock + res
    if relu:
        ref, stock = torch.relu(ref), torch.relu(stock)
    assert out.dtype == dtype and out.shape == x.shape
    # the backward (one kernel sweep on CPU) against float64 and stock ops in the same dtype
    grad = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, [t for t in (xd, scaled, shiftd, resd, midd)
                                     if t is not None], grad.double())
    stock_grads = torch.autograd.grad(stock, leaves, grad)
    pairs = [("out", out, stock, ref)]
    pairs += [(f"grad{i}", g, s, r) for i, (g, s, r) in enumerate(zip(got, stock_grads, want))]
    _assert_pairs(pairs, dtype)


def _assert_pairs(pairs, dtype):
    """(name, fused, stock or None, float64 reference): float64 within 1e-12 relative; other
    dtypes by the accuracy rule (the per-channel grads are fp32 sums), or where stock has no
    such grad (the running statistics' in bn_eval_act) within fp32 summation error: sums of at
    most 60 products of inputs exact in fp32, ~60 * 2^-24 = 4e-6 relative, bounded by 1e-5."""
    for name, fused, stock_t, ref_t in pairs:
        if dtype == torch.float64:
            assert max_err(fused, ref_t) <= 1e-12 * max(1.0, ref_t.abs().max().item()), name
        elif stock_t is None:
            assert max_err(fused, ref_t) <= 1e-5 * max(1.0, ref_t.abs().max().item()), name
        else:
            try:
                assert_within_rule(fused, stock_t, ref_t,
                                   torch.float32 if fused.dtype == torch.float32 else dtype)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None


# ---- bn_eval_act (eval-mode BN + residual + ReLU from BN's own tensors) --------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu,affine", [(True, True, True), (False, True, True),
                                                  (False, False, False)])
def test_bn_eval_act_matches_float64(device, shape, fmt, dtype, residual, relu, affine):
    """Against F.batch_norm(training=False) (+ residual) (+ ReLU) in float64 and in the same dtype,
    forward and every grad (x, weight, bias, residual, and the running statistics, which stock
    cannot differentiate: their float64 reference is the formula's autograd)."""
    x, w, b, res, rm, rv = _bn_inputs(shape, dtype, _acc(dtype), residual, device, seed=9)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    w, b = (w, b) if affine else (None, None)
    leaves = [t.requires_grad_() for t in (x, w, b, res, rm, rv) if t is not None]
    out = ops.bn_eval_act(x, w, b, rm, rv, 1e-5, res, relu)

    def formula(x, w, b, res, rm, rv):
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        y = (x - v(rm)) * v(torch.rsqrt(rv + 1e-5))
        y = y * v(w) + v(b) if w is not None else y
        y = y + res if res is not None else y
        return torch.relu(y) if relu else y
    doubles = _double(x, w, b, res, rm, rv)
    ref = formula(*doubles)
    stock = F.batch_norm(x, rm.detach(), rv.detach(), w, b, False, 0.0, 1e-5)
    stock = stock + res if residual else stock
    stock = torch.relu(stock) if relu else stock
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=fmt)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grad = grad.contiguous(memory_format=fmt)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, [t for t in doubles if t is not None], grad.double())
    stock_grads = list(torch.autograd.grad(stock, [t for t in (x, w, b, res) if t is not None],
                                           grad)) + [None, None]
    names = [n for n, t in zip(("x", "weight", "bias", "residual", "running_mean",
                                "running_var"), (x, w, b, res, rm, rv)) if t is not None]
    pairs = [("out", out, stock, ref)] + [
        (f"grad {n}", g, s, r) for n, g, s, r in zip(names, got, stock_grads, want)]
    _assert_pairs(pairs, dtype)


@CUDA_KERNELS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_cuda_vectorised_and_misaligned_paths_agree(dtype, fmt):
    """16-byte vector path (aligned, C or H*W a multiple of the width) vs the scalar path (a
    storage offset of one element): same numbers as the CPU kernels."""
    gen = torch.Generator().manual_seed(4)
    shape = (4, 64, 8, 8)
    base = torch.randn(torch.Size(shape).numel() + 1, generator=gen).to("cuda", dtype)
    aligned = base[:-1].view(shape)
    misaligned = base[1:].view(shape)
    if fmt == torch.channels_last:
        aligned = aligned.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        misaligned = base[1:].view(4, 8, 8, 64).permute(0, 3, 1, 2)
    scale = torch.rand(64, generator=gen).to("cuda", _acc(dtype))
    shift = torch.randn(64, generator=gen).to("cuda", _acc(dtype))
    for x in (aligned, misaligned):
        got = ops.scale_shift_act(x, scale, shift, x, True)
        want = ops.scale_shift_act(x.cpu(), scale.cpu(), shift.cpu(), x.cpu(), True)
        assert max_err(got, want) <= (1e-12 if dtype == torch.float64 else 1e-6 if
                                      dtype == torch.float32 else 1e-2)
        got = ops.bn_act_train(x, None, None, x, None, None, 0.1, 1e-5, True)[0]
        want = ops.bn_act_train(x.cpu(), None, None, x.cpu(), None, None, 0.1, 1e-5, True)[0]
        assert max_err(got, want) <= (1e-10 if dtype == torch.float64 else 1e-4 if
                                      dtype == torch.float32 else 5e-2)


# ---- gradcheck and opcheck ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu,affine", [(True, True, True), (False, False, True),
                                                  (False, True, False)])
def test_gradcheck_bn_act_train(fmt, residual, relu, affine):
    x, w, b, res, rm, rv = _bn_inputs((3, 5, 2, 3), torch.float64, torch.float64, residual)
    # keep pre-activations away from the ReLU kink, where finite differences are meaningless
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    inputs = [x.requires_grad_(), w.requires_grad_() if affine else None,
              b.requires_grad_() if affine else None,
              res.requires_grad_() if res is not None else None]

    def f(x, w, b, res):
        return ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, relu)[0]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu,center", [(True, True, False), (False, False, False),
                                                   (True, True, True)])
def test_gradcheck_scale_shift_act(fmt, residual, relu, center):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    res = torch.randn_like(x) if residual else None
    scale = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(3, generator=gen, dtype=torch.float64)
    mid = torch.randn(3, generator=gen, dtype=torch.float64) if center else None
    inputs = [t.requires_grad_() if t is not None else None for t in (x, scale, shift, res, mid)]

    def f(x, scale, shift, res, mid):
        return ops.scale_shift_act(x, scale, shift, res, relu, mid)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("relu", [True, False])
def test_scale_shift_act_double_backward(relu):
    """create_graph runs the differentiable torch-ops formula instead of the backward kernel."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    scale = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(3, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, scale, shift)]
    assert torch.autograd.gradgradcheck(
        lambda x, scale, shift: ops.scale_shift_act(x, scale, shift, None, relu), inputs)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_train_double_backward(fmt, residual, relu):
    """Second derivatives (gradient penalties): under create_graph the backward runs torch's
    differentiable batch-norm backward on the masked grad (gradgradcheck, fp64), and a penalty's
    grads are stock's (F.batch_norm + add + ReLU: the same formula, so agreement to rounding)."""
    x, w, b, res, _, _ = _bn_inputs((2, 3, 2, 3), torch.float64, torch.float64, residual)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    inputs = [t.requires_grad_() for t in (x, w, b, res) if t is not None]

    def fused(x, w, b, *res):
        return ops.bn_act_train(x, w, b, res[0] if res else None, None, None, 0.1, 1e-5,
                                relu)[0]
    assert torch.autograd.gradgradcheck(fused, inputs)

    def stock(x, w, b, *res):
        out = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        out = out + res[0] if res else out
        return torch.relu(out) if relu else out

    def penalty_grads(f):
        grads = torch.autograd.grad(f(*inputs).square().sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
    for got, want in zip(penalty_grads(fused), penalty_grads(stock), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_bn_act_train(fmt):
    x, w, b, res, rm, rv = _bn_inputs((2, 5, 3, 3), torch.float32, torch.float32, True)
    x, res = _fmt(x, fmt).requires_grad_(), _fmt(res, fmt).requires_grad_()
    torch.library.opcheck(ops.bn_act_train.default,
                          (x, w.requires_grad_(), b.requires_grad_(), res, rm, rv, 0.1, 1e-5, True))
    torch.library.opcheck(ops.bn_act_train.default,
                          (x.detach().half(), None, None, None, None, None, 0.1, 1e-5, False))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_bn_act_train_backward(fmt):
    x, w, b, res, rm, rv = _bn_inputs((2, 5, 3, 3), torch.float32, torch.float32, True)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    out, mean, invstd, *_ = ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.bn_act_train_backward.default,
                          (grad, x, w, out, mean, invstd, True, True))
    torch.library.opcheck(ops.bn_act_train_backward.default,
                          (grad, x, None, None, mean, invstd, False, False))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_scale_shift_act(fmt):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, 3, generator=gen).contiguous(memory_format=fmt)
    scale, shift = torch.rand(5, generator=gen), torch.randn(5, generator=gen)
    torch.library.opcheck(ops.scale_shift_act.default,
                          (x.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(),
                           torch.randn_like(x).requires_grad_(), True))
    torch.library.opcheck(ops.scale_shift_act.default,
                          (x.detach().to(torch.bfloat16), scale.detach(), shift.detach(), None,
                           False))
    torch.library.opcheck(ops.scale_shift_act.default,
                          (x, scale, shift, None, True, torch.randn(5, generator=gen)))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_scale_shift_act_backward(fmt):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 3, 3, generator=gen).contiguous(memory_format=fmt)
    out = torch.relu(x * 0.5)
    g = torch.randn(x.shape, generator=gen).contiguous(memory_format=fmt)
    for relu, grad_res in ((True, True), (True, False), (False, False)):
        torch.library.opcheck(ops.scale_shift_act_backward.default,
                              (g, x, torch.rand(5, generator=gen), out if relu else None, relu,
                               grad_res))
    torch.library.opcheck(ops.scale_shift_act_backward.default,
                          (g, x, torch.rand(5, generator=gen), out, True, True,
                           torch.randn(5, generator=gen)))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_bn_eval_act(fmt):
    x, w, b, res, rm, rv = _bn_inputs((2, 5, 3, 3), torch.float32, torch.float32, True)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    torch.library.opcheck(ops.bn_eval_act.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv,
                           1e-5, res.requires_grad_(), True))
    torch.library.opcheck(ops.bn_eval_act.default,
                          (x.detach().to(torch.bfloat16), None, None, rm, rv, 1e-3, None, False))
    for args in ((x.detach(), w.detach(), None, rm, rv, 1e-5),
                 (x.detach().double(), None, b.detach().double(), rm.double(), rv.double(), 0.1)):
        torch.library.opcheck(ops.bn_eval_fold.default, args)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu,affine", [(True, True, True), (False, False, False)])
def test_gradcheck_bn_eval_act(fmt, residual, relu, affine):
    """First and second derivatives (create_graph runs the differentiable formula), the running
    statistics included."""
    x, w, b, res, rm, rv = _bn_inputs((2, 3, 2, 3), torch.float64, torch.float64, residual)
    x, res = _fmt(x, fmt), _fmt(res, fmt)
    w, b = (w, b) if affine else (None, None)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, w, b, rm, rv, res)]

    def f(x, w, b, rm, rv, res):
        return ops.bn_eval_act(x, w, b, rm, rv, 1e-5, res, relu)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_bn_act_train_under_torch_compile():
    x, w, b, res, rm, rv = _bn_inputs((2, 6, 4, 4), torch.float32, torch.float32, True)

    def f(x, w, b, res):
        return ops.bn_act_train(x, w, b, res, rm, rv, 0.1, 1e-5, True)[0].sum()
    args = [t.requires_grad_() for t in (x, w, b, res)]
    eager = torch.autograd.grad(f(*args), args)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    for a, e in zip(got, eager):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


# ---- bad input: clear C++ errors naming expected and got --------------------------------------
def _bad_bn_cases():
    x, w, b, res, rm, rv = _bn_inputs((2, 4, 3, 3), torch.float32, torch.float32, True)
    base = dict(x=x, weight=w, bias=b, residual=res, running_mean=rm, running_var=rv)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    return [
        (dict(x=x[0]), r"expected x of shape \(N, C, H, W\) \(4-D\), got a 3-D tensor"),
        (dict(x=x.int()), r"expected x of dtype Half, BFloat16, Float or Double, got Int"),
        (dict(x=x.transpose(1, 2)), r"expected x dense in NCHW .* or NHWC .* got shape"),
        (dict(weight=w[:3]), r"expected weight of shape \[4\] .* got \[3\]"),
        (dict(bias=b.double()), r"expected bias of dtype Float \(the dtype of weight\), "
                                r"got Double"),
        (dict(weight=w.half()), r"expected weight of dtype Float for Float x, got Half"),
        (dict(residual=res[:, :, :2]), r"expected residual of shape \[2, 4, 3, 3\] .* got "
                                       r"\[2, 4, 2, 3\]"),
        (dict(residual=res.double()), r"expected residual of dtype Float .* got Double"),
        (dict(x=nhwc), r"expected residual in x's layout NHWC \(channels_last\), got strides"),
        (dict(running_var=None), r"expected running_mean and running_var both given or both "
                                 r"None, got running_mean only"),
        (dict(running_mean=rm[::2]), r"expected running_mean of shape \[4\] .* got \[2\]"),
        (dict(x=x[:1, :, :1, :1].contiguous(), residual=None),
         r"expected more than 1 value per channel when training, got input of shape "
         r"\[1, 4, 1, 1\]"),
    ], base


@pytest.mark.parametrize("index", range(len(_bad_bn_cases()[0])))
def test_bn_act_train_bad_input(index):
    cases, base = _bad_bn_cases()
    change, message = cases[index]
    args = {**base, **change}
    with pytest.raises(RuntimeError, match="bn_act_train: " + message):
        ops.bn_act_train(args["x"], args["weight"], args["bias"], args["residual"],
                         args["running_mean"], args["running_var"], 0.1, 1e-5, True)


def test_backward_and_epilogue_bad_input():
    x, w, b, res, rm, rv = _bn_inputs((2, 4, 3, 3), torch.float32, torch.float32, False)
    out, mean, invstd, *_ = ops.bn_act_train(x, w, b, None, rm, rv, 0.1, 1e-5, True)
    g = torch.randn_like(out)
    bwd = ops.bn_act_train_backward
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \[2, 4, 3, 3\] .*got "
                                           r"\[2, 4, 3, 2\]"):
        bwd(g[..., :2], x, w, out, mean, invstd, True, False)
    with pytest.raises(RuntimeError, match=r"expected grad_out in x's layout NCHW"):
        bwd(g.contiguous(memory_format=torch.channels_last), x, w, out, mean, invstd, True, False)
    with pytest.raises(RuntimeError, match=r"expected the forward output `out` .* got None"):
        bwd(g, x, w, None, mean, invstd, True, False)
    with pytest.raises(RuntimeError, match=r"expected save_mean of dtype Float for Float x, "
                                           r"got Double"):
        bwd(g, x, w, out, mean.double(), invstd, True, False)
    ssa = ops.scale_shift_act
    with pytest.raises(RuntimeError, match=r"expected scale of dtype Float for Half x, got Half"):
        ssa(x.half(), w.half(), b, None, True)
    with pytest.raises(RuntimeError, match=r"expected shift of shape \[4\] .* got \[5\]"):
        ssa(x, w, torch.zeros(5), None, True)
    with pytest.raises(RuntimeError, match=r"expected shift contiguous, got strides"):
        ssa(x, w, torch.zeros(8)[::2], None, True)
    with pytest.raises(RuntimeError, match=r"expected center of shape \[4\] .* got \[3\]"):
        ssa(x, w, b, None, True, torch.zeros(3))
    sab = ops.scale_shift_act_backward
    with pytest.raises(RuntimeError, match=r"scale_shift_act_backward: expected center of dtype "
                                           r"Float for Float x, got Double"):
        sab(g, x, w, out, True, False, rm.double())


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(2, 4, 3)), r"expected x of shape \(N, C, H, W\) \(4-D\), got a 3-D"),
    (dict(weight=torch.ones(3)), r"expected weight of shape \[4\] .* got \[3\]"),
    (dict(running_var=torch.ones(4, dtype=torch.float64)),
     r"expected running_var of dtype Float \(the dtype of weight\), got Double"),
    (dict(running_mean=torch.zeros(8)[::2]), r"expected running_mean contiguous, got strides"),
    (dict(residual=torch.zeros(2, 4, 3, 2)), r"expected residual of shape \[2, 4, 3, 3\]"),
])
def test_bn_eval_act_bad_input(change, message):
    """Both the op and its fold name what they expected and what came (CPU fold loop, and the
    torch-ops composite under fake tensors would run the same checks)."""
    x, w, b, res, rm, rv = _bn_inputs((2, 4, 3, 3), torch.float32, torch.float32, True)
    args = {**dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv, residual=res),
            **change}
    with pytest.raises(RuntimeError, match=message):
        ops.bn_eval_act(args["x"], args["weight"], args["bias"], args["running_mean"],
                        args["running_var"], 1e-5, args["residual"], True)


def test_bn_eval_act_half_parameters():
    """A model made .half() (fp16 parameters and statistics with fp16 x) folds in fp32 exactly as
    the call with those values in fp32 parameters does; the fold is 1 / sqrt(var + eps) in fp32
    (within 1 ulp of float64 after each rounding: 2 roundings here)."""
    x, w, b, _, rm, rv = _bn_inputs((2, 5, 3, 4), torch.float16, torch.float16, False)
    half = ops.bn_eval_act(x, w, b, rm, rv, 1e-5, None, True)
    full = ops.bn_eval_act(x, w.float(), b.float(), rm.float(), rv.float(), 1e-5, None, True)
    assert torch.equal(half, full)
    inv, scale, shift, center = ops.bn_eval_fold(x, w, b, rm, rv, 1e-5)
    assert inv.dtype == scale.dtype == shift.dtype == center.dtype == torch.float32
    want = 1 / torch.sqrt(rv.double() + 1e-5)
    assert ((inv.double() - want).abs() <= 2 * 2.0 ** -23 * want).all()
    assert torch.equal(scale, w.float() * inv) and torch.equal(center, rm.float())
    assert torch.equal(shift, b.float())


@CUDA_KERNELS
def test_device_mismatch_raises():
    x, w, b, res, rm, rv = _bn_inputs((2, 4, 3, 3), torch.float32, torch.float32, True, "cuda")
    with pytest.raises(RuntimeError, match=r"expected weight on device cuda:0 .* got cpu"):
        ops.bn_act_train(x, w.cpu(), b, res, rm, rv, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"expected residual on device cuda:0 .* got cpu"):
        ops.scale_shift_act(x, w, b, res.cpu(), True)


# ---- the package without the extension ---------------------------------------------------------
def test_package_works_without_the_extension():
    """With resnet_fused._C missing, import, status, backends, eval and a training step all work
    (stock BN in train mode) and the `cuda` backend says why it is unavailable."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "resnet_fused._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, resnet_fused
        from resnet_fused import backends, extension
        assert not extension.available(), extension.status()
        assert extension.status().startswith("not available"), extension.status()
        print(backends.unavailable_reason("cuda", torch.device("cpu")))
        m = resnet_fused.resnet18(num_classes=4).train()
        loss = m(torch.randn(2, 3, 32, 32)).sum()
        loss.backward()
        m.eval()(torch.randn(1, 3, 32, 32))
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
    assert "resnet_fused._C" in run.stdout or "extension" in run.stdout


def test_cuda_backend_reports_why_it_cannot_run_on_cpu():
    from resnet_fused.backends import cuda as cuda_backend
    reason = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "cuda" in reason.lower()
