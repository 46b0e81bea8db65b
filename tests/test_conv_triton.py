"""Numerics of the `triton` backend.

On CPU the real kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set per test with
monkeypatch: the backend builds its interpreted kernel on demand, so import order does not matter).
Where a CUDA GPU is present, the same cases also run compiled on it.

Every distinct conv class of ResNet-18/50 and ResNeXt-50, scaled down, plus odd cases, with and
without residual and ReLU, in fp32/fp16/bf16, against a float64 reference, bound by the numerics
rule (docs/design.md): err(triton) <= 2 * err(stock same dtype) + atol (tests/numerics.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from numerics import assert_within_rule, conv_bn_act_ref, randomize_bn
from resnet_fused import backends, ops
from resnet_fused.backends import autoselect, stock
from resnet_fused.fold import fold_scale_shift

import components
components.importorskip("triton", "triton")  # pinned: a failure under strict mode (CI)
from resnet_fused.backends.triton import conv as tconv  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def one_mid_config(monkeypatch):
    """On a GPU the many tiny cases below run one mid config of the arch's list (compiling and
    timing every config for every case would take many minutes); test_tuned_gpu and the
    model tests cover tuning there."""
    real = tconv.candidates

    def mid(family, dtype, m, c_out, sms=None, args=None):
        configs = tconv.config_tuples(family, dtype)
        return [configs[len(configs) // 2]] if family != "interpreter" else real(family, dtype,
                                                                                  m, c_out)
    monkeypatch.setattr(tconv, "candidates", mid)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """cpu: the interpreter. cuda: the compiled kernel (interpreter off)."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        one_mid_config(monkeypatch)
    return torch.device(request.param)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups, dtype, device, *,
                 residual=False, seed=0):
    """x, packed weight, folded scale/shift (randomised BN) and optional residual."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), _pair(stride), _pair(pad), _pair(dil), groups,
                     bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g)
                          / (c_in // groups * kh * kw) ** 0.5)
    bn = randomize_bn(nn.BatchNorm2d(c_out).eval(), seed=seed + 1)
    with torch.no_grad():
        scale, shift = fold_scale_shift(conv, bn, dtype)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = backends.prepare("triton", conv.weight.detach().to(dtype), scale, shift).weight
    res = None
    if residual:
        oh, ow = tconv.out_hw(h, w, (kh, kw), _pair(stride), _pair(pad), _pair(dil))
        res = torch.randn(n, c_out, oh, ow, generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(weight), to(scale), to(shift), to(res)


def check(x, weight, scale, shift, res, stride, pad, dil, groups, relu, dtype, **launcher_kw):
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, relu=relu)
    if launcher_kw:  # a fixed config / forced K-loop kind: call the launcher directly
        out = tconv.conv_bn_act(x, weight, scale, shift, res, _pair(stride), _pair(pad),
                                _pair(dil), groups, relu, **launcher_kw)
    else:
        with backends.backend("triton"):
            out = ops.conv_bn_act(x, weight, scale, shift, residual=res, **kw)
    ref = conv_bn_act_ref(x, weight, scale, shift, residual=res, **kw)
    base = stock.conv_bn_act(x, weight, scale, shift, res, _pair(stride), _pair(pad), _pair(dil),
                             groups, relu)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    if out.numel():  # a fresh output: never the input's or the residual's memory
        assert out.data_ptr() != x.data_ptr()
        assert res is None or out.data_ptr() != res.data_ptr()
    assert_within_rule(out.cpu(), base.cpu(), ref.cpu(), dtype)
    return out


# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
CASES = {
    # the conv classes of ResNet-18/50 and ResNeXt-50, scaled down
    "stem_7x7s2": (2, 3, 20, 20, 16, 7, 2, 3, 1, 1),
    "3x3s1": (2, 144, 6, 6, 24, 3, 1, 1, 1, 1),                   # 2 channel blocks per tap
    "3x3s2": (2, 24, 9, 9, 136, 3, 2, 1, 1, 1),                   # 2 N tiles
    "1x1s1": (2, 264, 7, 7, 36, 1, 1, 0, 1, 1),                   # 3 channel blocks
    "1x1s2_downsample": (2, 32, 8, 8, 48, 1, 2, 0, 1, 1),
    "grouped_3x3_32x4d": (2, 64, 6, 6, 64, 3, 1, 1, 1, 16),       # 4 channels per group
    "grouped_3x3s2": (1, 64, 7, 7, 64, 3, 2, 1, 1, 32),           # 2 channels per group
    "grouped_wide": (1, 40, 5, 5, 272, 3, 1, 1, 1, 2),            # C_out/g = 136 > BLOCK_N
    "grouped_uneven_packing": (1, 56, 5, 5, 168, 3, 1, 1, 1, 7),  # C_out/g = 24: 5 + 2 groups
    "depthwise": (1, 12, 5, 5, 12, 3, 1, 1, 1, 12),
    "dilated_3x3": (1, 16, 9, 9, 16, 3, 1, 2, 2, 1),
    "dilated_3x3s2": (1, 8, 11, 11, 16, 3, 2, 2, 2, 1),
    # odd cases
    "odd_channels_3x3": (2, 13, 6, 6, 19, 3, 1, 1, 1, 1),
    "odd_channels_1x1": (2, 13, 5, 5, 19, 1, 1, 0, 1, 1),
    "map_1x1_3x3": (3, 32, 1, 1, 24, 3, 1, 1, 1, 1),
    "map_1x1_1x1": (2, 20, 1, 1, 20, 1, 1, 0, 1, 1),
    "map_7x7_batch1": (1, 32, 7, 7, 32, 3, 1, 1, 1, 1),           # M = 49, as layer4 at batch 1
    "batch0": (0, 16, 8, 8, 16, 3, 1, 1, 1, 1),
    "rect_kernel_stride_pad": (1, 8, 9, 7, 16, (3, 1), (2, 1), (1, 0), (1, 1), 1),
    "1x1_padded": (1, 8, 4, 4, 8, 1, 1, 1, 1, 1),
}
EPILOGUES = [(True, True), (False, True), (False, False), (True, False)]  # (residual, relu)


def _case_params():
    for i, (name, case) in enumerate(CASES.items()):
        residual, relu = EPILOGUES[i % len(EPILOGUES)]
        for dtype in DTYPES:
            yield pytest.param(case, residual, relu, dtype,
                               id=f"{name}-{'res' if residual else 'nores'}-"
                                  f"{'relu' if relu else 'linear'}-{str(dtype)[6:]}")


@pytest.mark.parametrize("case,residual,relu,dtype", list(_case_params()))
def test_conv_classes(device, case, residual, relu, dtype):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = case
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, device, residual=residual)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, relu, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("residual,relu", EPILOGUES,
                         ids=["res-relu", "relu", "linear", "res-linear"])
@pytest.mark.parametrize("case", ["3x3s2", "1x1s1"])
def test_epilogue_combinations(device, case, residual, relu, dtype):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = CASES[case]
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, device, residual=residual, seed=3)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, relu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["nchw", "channel_slice", "spatial_stride", "nchw_residual",
                                    "unpacked_weight", "expanded_residual"])
def test_input_strides(device, layout, dtype):
    """Any strides are read correctly: no silent wrong result on NCHW / non-contiguous input."""
    n, c_in, h, w, c_out = 2, 12, 9, 9, 20
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, 3, 1, 1, 1, 1, dtype,
                                                device, residual=True, seed=7)
    if layout == "nchw":
        x = x.contiguous()
        assert not x.is_contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # channels_last view into a wider tensor
        big = torch.randn(n, c_in + 5, h, w, device=device).to(dtype).contiguous(
            memory_format=torch.channels_last)
        x = big[:, 3:3 + c_in]
    elif layout == "spatial_stride":  # every other pixel of a bigger NCHW tensor
        x = torch.randn(n, c_in, 2 * h, 2 * w, device=device).to(dtype)[:, :, ::2, ::2]
    elif layout == "nchw_residual":
        res = res.contiguous()
    elif layout == "unpacked_weight":
        weight = weight.contiguous()
    elif layout == "expanded_residual":  # stride-0 batch and channel dims
        res = torch.randn(1, 1, h, w, device=device).to(dtype).expand(n, c_out, h, w)
    check(x, weight, scale, shift, res, 1, 1, 1, 1, True, dtype)


# Every distinct tile shape of the real (GPU) config lists, run through the interpreter: the tile
# mapping, group packing and masks must be right for all of them, not just the interpreter's.
# (The fp32 lists only halve BLOCK_K, to values the fp16 lists already contain.)
_TILES = sorted({c[:4] for fam in ("hopper", "ampere")
                 for c in tconv.config_tuples(fam, torch.float16)})


@pytest.mark.parametrize("tile", _TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("case", ["stem_7x7s2", "grouped_3x3_32x4d"])
def test_every_config_tile(device, case, tile):
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = CASES[case]
    dtype = torch.float16
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, device, residual=True, seed=11)
    bm, bn, bk, gm = tile
    config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=4, num_stages=2)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, True, dtype, config=config)


@pytest.mark.parametrize("flat_k", [True, False])
@pytest.mark.parametrize("case", ["stem_7x7s2", "grouped_uneven_packing", "dilated_3x3s2",
                                  "rect_kernel_stride_pad"])
def test_k_loop_kinds_agree(device, case, flat_k):
    """Both KxK loops (per-element K gather, and (tap, channel-block)) on shapes where the
    launcher would pick the other one."""
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = CASES[case]
    dtype = torch.float32
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, device, residual=True, seed=5)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, True, dtype, flat_k=flat_k)


@pytest.mark.parametrize("block_k", [32, 16], ids=["row_loop", "flat_gather"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("case", ["stem_7x7s2", "dilated_3x3s2", "odd_channels_3x3"])
def test_stem_row_loop_and_flat_gather(device, case, layout, block_k):
    """Small-C_in convs: the row loop (ROW_K: a kernel row's taps fit one K block: 7 x 3 = 21 <=
    32) and the per-element gather (FLAT_K: 21 > 16), with the residual, fp16, either layout of
    x, against float64."""
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = CASES[case]
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                torch.float16, device, residual=True, seed=23)
    if layout == "nchw":
        x = x.contiguous()
    args = tconv.kernel_args(x, weight, scale, shift, res, res, (stride,) * 2, (pad,) * 2,
                             (dil,) * 2, groups, True, True, flat_k=True)
    assert tconv.row_k(args, tconv.Config(16, 32, block_k, 1, 4, 2)) == (k * c_in <= block_k)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=2)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, True, torch.float16,
          config=config, flat_k=True)


# Split-K: (case, split). The tile is 16x32 with BLOCK_K = 16 so that every case has several K
# iterations to split (and, for odd C_in, a partial last channel block: EVEN_K off); a split
# larger than the iterations leaves some splits an empty K range (they write zero partials).
SPLIT_CASES = [("3x3s1", 2), ("3x3s1", 4), ("1x1s1", 3), ("map_7x7_batch1", 16),
               ("odd_channels_3x3", 2), ("odd_channels_1x1", 4), ("1x1_padded", 2),
               ("rect_kernel_stride_pad", 2), ("dilated_3x3s2", 3), ("1x1s2_downsample", 2),
               ("batch0", 2)]


@pytest.mark.parametrize("case,split,dtype", [
    pytest.param(case, split, dtype, id=f"{case}-k{split}-{str(dtype)[6:]}")
    for i, (case, split) in enumerate(SPLIT_CASES) for dtype in [DTYPES[i % len(DTYPES)]]])
def test_split_k(device, case, split, dtype):
    """Split-K (partial tiles, then the reduction with the epilogue) against float64, with and
    without the residual, ReLU on; the dtypes rotate over the cases."""
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = CASES[case]
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2,
                  SPLIT_K=split)
    for residual in (False, True):
        x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil,
                                                    groups, dtype, device, residual=residual,
                                                    seed=13)
        check(x, weight, scale, shift, res, stride, pad, dil, groups, True, dtype, config=config,
              flat_k=False)   # C_in = 13 would take the per-element gather, which does not split


def test_split_k_needs_the_dense_loops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    s = torch.zeros(8)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, SPLIT_K=2)
    with pytest.raises(ValueError, match="split-K needs the dense K loops.*groups=2"):
        tconv.conv_bn_act(x, torch.zeros(8, 4, 3, 3), s, s, None, (1, 1), (1, 1), (1, 1), 2,
                          True, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
def test_split_k_nonfinite_and_strides(device, dtype):
    """Split-K on NCHW input with NaN and Inf planted: the reduction flags the tiles (fp32's
    3xTF32 needs the exact fix-up), and NaN/Inf land exactly where stock puts them; two runs are
    bitwise equal (the partials are summed in split order)."""
    n, c_in, h, w, c_out = 1, 48, 7, 7, 40
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, 3, 1, 1, 1, 1, dtype,
                                                device, residual=True, seed=17)
    x = x.contiguous()
    x[0, 5, 3, 3] = float("nan")
    x[0, 9, 0, 6] = float("inf")
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2,
                  SPLIT_K=4)
    first = check(x, weight, scale, shift, res, 1, 1, 1, 1, True, dtype, config=config)
    again = tconv.conv_bn_act(x, weight, scale, shift, res, (1, 1), (1, 1), (1, 1), 1, True,
                              config=config)
    assert torch.equal(first.isnan(), again.isnan())
    assert torch.equal(first.nan_to_num(), again.nan_to_num())


# TMA configs: (case, split). 1x1 stride-1 convs take both operands by TMA, the others only the
# weight (KxK: C_in a multiple of BLOCK_K = 16). Rows past M and channels past C_in come back as
# zeros from the descriptor, so partial tiles and C_in = 40 (not a multiple of 16) are covered.
TMA_CASES = [("1x1s1_tma", 1), ("1x1s1_tma", 2), ("1x1_odd_k_tma", 1), ("3x3s1_tma", 1),
             ("3x3s1_tma", 3), ("1x1s2_downsample", 1), ("3x3s2_tma", 1)]
TMA_SHAPES = {"1x1s1_tma": (2, 64, 7, 7, 48, 1, 1, 0, 1, 1),
              "1x1_odd_k_tma": (1, 40, 5, 5, 24, 1, 1, 0, 1, 1),
              "3x3s1_tma": (2, 64, 6, 6, 40, 3, 1, 1, 1, 1),
              "3x3s2_tma": (1, 32, 7, 7, 24, 3, 2, 1, 1, 1)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case,split", TMA_CASES, ids=lambda v: str(v))
def test_tma_operands(device, case, split, dtype):
    """Operands through tensor descriptors (Hopper's TMA; the interpreter emulates them) against
    float64, with the residual and a NaN planted in x."""
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = TMA_SHAPES.get(case) or CASES[case]
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2,
                  SPLIT_K=split, TMA=True)
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, device, residual=True, seed=19)
    x[0, 3, 1, 1] = float("nan")
    meta = torch.empty(n, c_out, *tconv.out_hw(h, w, (k, k), (stride,) * 2, (pad,) * 2, (1, 1)))
    args = tconv.kernel_args(x, weight, scale, shift, res, meta, (stride,) * 2, (pad,) * 2,
                             (1, 1), 1, True, True)
    assert tconv.tma_operands(args, tconv.Config(16, 32, 16, 1, 4, 2, split, True)) == (
        k == 1 and stride == 1, True)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, True, dtype, config=config)


def test_tma_needs_16_bit_dense_operands(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    s = torch.zeros(16)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, TMA=True)
    with pytest.raises(ValueError, match="a TMA config needs 16-bit operands.*torch.float32"):
        tconv.conv_bn_act(x, torch.zeros(16, 16, 1, 1), s, s, None, (1, 1), (0, 0), (1, 1), 1,
                          True, config=config)
    args = tconv.kernel_args(x.half(), torch.zeros(16, 16, 3, 3).half(), s, s, None, x, (1, 1),
                             (1, 1), (1, 1), 1, True, False)
    assert tconv.tma_operands(args, tconv.Config(64, 64, 64, 8, 4, 3, 1, True)) == (False, False)
    # a remembered TMA decision meeting such a problem runs without descriptors, not an error
    (_, run), = tconv.launches(dict(args, M=4096), tconv.Config(64, 64, 64, 8, 4, 3, 1, True))
    assert run["b_desc"] is None and not run["TMA_B"] and not run["TMA_A"]
    cands = tconv.candidates("hopper", torch.float16, 4096, 256, 132, dict(args, M=4096))
    assert not any(c.tma for c in cands)  # NCHW weight: its K is not contiguous


@pytest.mark.parametrize("family,sms", [("hopper", 132), ("ampere", 108)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_every_resnet50_layer_fills_a_wave_at_batch_1(family, sms, dtype):
    """Split-K's purpose: at batch 1 every conv of ResNet-50 has a candidate that launches at
    least one program per SM (without it 16 layers on sm_90 could not), and the candidates are
    the same for every batch size of an M bucket."""
    from resnet_fused.walk import layers, meta_model
    from resnet_fused.warm_start import layer_kernel_args
    short = []
    for layer in layers(meta_model("resnet50"), (1, 3, 224, 224)):
        if layer.kind != "conv_bn_act":
            continue
        args = layer_kernel_args(layer, dtype)
        cands = tconv.candidates(family, dtype, args["M"], args["C_out"], sms, args)
        if max(tconv.programs(args, c) for c in cands) < sms:
            short.append(layer.name)
        for c in cands:
            assert c.split_k == 1 or tconv.k_iterations(args, c) >= 2 * c.split_k, (layer, c)
        other = dict(args, M=args["M"] + 1)   # same bucket (49 -> 50, 196 -> 197, ...)
        if tconv.tuning.bucket(other["M"]) == tconv.tuning.bucket(args["M"]):
            assert cands == tconv.candidates(family, dtype, other["M"], args["C_out"], sms, other)
    assert short == []


def test_tuned_path_under_interpreter(monkeypatch):
    """The GPU launch path (several candidates pruned on the M bucket, tile heuristics, grid from
    the chosen config, one decision per bucket, persisted) run under the interpreter, with a
    stand-in for the timer."""
    from resnet_fused import tuning
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tconv, "INTERPRETER", tconv.AMPERE)
    timed = []

    def fake_time(args, config):
        tconv.launch(args, config, True)  # runs the kernel with this config
        timed.append(config)
        return float(len(timed))  # the first config timed "wins"

    monkeypatch.setattr(tconv, "time_config", fake_time)
    device = torch.device("cpu")
    # M = 49 (bucket 64) and C_out = 64: the tiles with BLOCK_M, BLOCK_N <= 64 (3 of 8).
    x, weight, scale, shift, res = make_problem(1, 32, 7, 7, 64, 3, 1, 1, 1, 1, torch.float16,
                                                device, residual=True, seed=2)
    check(x, weight, scale, shift, res, 1, 1, 1, 1, True, torch.float16)
    assert len(timed) == 3 and all(c[0] <= 64 and c[1] <= 64 for c in timed)
    (key, best), = tuning.decisions(device).items()
    assert best == timed[0] and "M64|" in key
    check(x, weight, scale, shift, res, 1, 1, 1, 1, True, torch.float16)  # remembered
    assert len(timed) == 3
    # batch 1 at 6x6 is M = 36: same bucket (64), so nothing is timed
    x6, weight6, scale6, shift6, res6 = make_problem(1, 32, 6, 6, 64, 3, 1, 1, 1, 1,
                                                     torch.float16, device, residual=True, seed=3)
    check(x6, weight6, scale6, shift6, res6, 1, 1, 1, 1, True, torch.float16)
    assert len(timed) == 3
    # a fresh process (memory cleared) reads the decision back from disk
    tuning.clear()
    check(x, weight, scale, shift, res, 1, 1, 1, 1, True, torch.float16)
    assert len(timed) == 3
    # a grouped shape: GPT = BLOCK_N // (C_out/groups) for the chosen tile
    x, weight, scale, shift, res = make_problem(2, 64, 6, 6, 64, 3, 1, 1, 1, 16, torch.float16,
                                                device, residual=False, seed=4)
    check(x, weight, scale, shift, None, 1, 1, 1, 16, True, torch.float16)
    assert len(timed) == 7  # M = 72 (bucket 128), C_out = 64: 4 candidates
    # no run-time tuning: the heuristic, nothing timed or remembered
    monkeypatch.setenv(tuning.MODE_ENV, "cached")
    x, weight, scale, shift, res = make_problem(4, 32, 7, 7, 64, 1, 1, 0, 1, 1, torch.float16,
                                                device, residual=False, seed=5)
    check(x, weight, scale, shift, None, 1, 0, 1, 1, True, torch.float16)
    assert len(timed) == 7 and len(tuning.decisions(device)) == 2


def test_per_layer_auto_choice(monkeypatch):
    """Under `auto` on CUDA, each problem bucket is timed once on triton and cuda, the faster one
    is kept. (Selection logic only: the CUDA timer and both backends are stand-ins here.)"""
    import types

    from resnet_fused import tuning
    monkeypatch.setattr(autoselect, "load", lambda name: types.SimpleNamespace(run=None))
    timings = iter([2.0, 1.0, 1.0, 3.0])  # (triton, cuda) per measured bucket
    monkeypatch.setattr(autoselect, "_time_ms", lambda fn, reps=10: next(timings))
    w = torch.zeros(8, 4, 3, 3)
    s = torch.zeros(8)
    prepared = backends.Prepared(w, s, s)
    args = (None, (1, 1), (1, 1), (1, 1), 1, True)
    a, b = torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 8, 8)  # M = 64 and 128
    assert autoselect.choose(prepared, a, *args) == "cuda"
    assert autoselect.choose(prepared, b, *args) == "triton"
    assert autoselect.choose(prepared, a, *args) == "cuda"  # remembered: not timed again
    assert autoselect.choose(prepared, torch.zeros(1, 4, 7, 8), *args) == "cuda"  # same bucket
    assert len(tuning.decisions(torch.device("cpu"))) == 2


def test_auto_on_cuda_is_per_layer_unless_switched_off(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: None)
    cuda = torch.device("cuda", 0)
    assert backends.device_choice(cuda) == backends.PER_LAYER
    monkeypatch.setenv(backends.PER_LAYER_ENV, "0")
    assert backends.device_choice(cuda) == "triton"
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device=None: "missing" if name == "triton" else None)
    assert backends.device_choice(cuda) == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", [
    (32, 64, 56, 56, 64, 3, 1, 1, 1, 1),      # ResNet-50 layer1 3x3, batch 32
    (1, 1024, 14, 14, 2048, 1, 2, 0, 1, 1),   # layer4 downsample 1x1/2, batch 1 (M = 49)
    (8, 3, 224, 224, 64, 7, 2, 3, 1, 1),      # stem
    (8, 256, 28, 28, 256, 3, 1, 1, 1, 32),    # ResNeXt-50 32x4d layer2 grouped 3x3
], ids=["layer1_3x3_b32", "layer4_down_b1", "stem_b8", "resnext_grouped_b8"])
def test_tuned_gpu(monkeypatch, case, dtype):
    """The real tuned launch (every candidate of the arch list timed) on ResNet shapes."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    n, c_in, h, w, c_out, k, stride, pad, dil, groups = case
    x, weight, scale, shift, res = make_problem(n, c_in, h, w, c_out, k, stride, pad, dil, groups,
                                                dtype, torch.device("cuda"), residual=True)
    check(x, weight, scale, shift, res, stride, pad, dil, groups, True, dtype)


def test_tf32_switch_follows_cudnn_flag(monkeypatch):
    """fp32 uses the tensor cores (3xTF32, fp32-accurate) when torch.backends.cudnn.allow_tf32 is
    on, plain IEEE fp32 when it is off."""
    x = torch.zeros(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(4, 4, 1, 1)
    s = torch.zeros(4)
    for flag, want in ((True, "tf32x3"), (False, "ieee")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag)
        args = tconv.kernel_args(x, w, s, s, None, x, (1, 1), (0, 0), (1, 1), 1, True, False)
        assert args["PRECISION"] == want
        args = tconv.kernel_args(x.half(), w.half(), s, s, None, x, (1, 1), (0, 0), (1, 1), 1,
                                 True, False)
        assert args["PRECISION"] == "ieee"  # not used for 16-bit operands


def test_tuning_key_is_the_bucket_not_the_shape():
    """Batch sizes in one M bucket share a key (and so a decision); strides other than the
    channel stride, pointers and H/W (beyond M) do not enter it."""
    def key(n, h):
        x = torch.zeros(n, 8, h, h).contiguous(memory_format=torch.channels_last)
        w = torch.zeros(8, 8, 3, 3)
        s = torch.zeros(8)
        return tconv.tuning_key(tconv.kernel_args(x, w, s, s, None, x, (1, 1), (1, 1), (1, 1), 1,
                                                  True, False), torch.float16)
    assert key(3, 7) == key(4, 7) == key(6, 6)      # M = 147, 196, 216: bucket 256
    assert key(2, 7) != key(3, 7)                   # M = 98: bucket 128
    assert len(tconv.config_tuples("interpreter", torch.float16)) == 1
    assert tconv.candidates("hopper", torch.float16, 49, 2048) == [
        c for c in tconv.config_tuples("hopper", torch.float16) if c.block_m <= 64]
    assert tconv.candidates("hopper", torch.float16, 50, 2048) == tconv.candidates(
        "hopper", torch.float16, 64, 2048)


def test_heuristic_config_fills_the_gpu():
    x = torch.zeros(1, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(64, 64, 3, 3)
    s = torch.zeros(64)
    args = tconv.kernel_args(x, w, s, s, None, x, (1, 1), (1, 1), (1, 1), 1, True, False)
    cands = tconv.candidates("hopper", torch.float16, args["M"], 64)
    best = tconv.heuristic_config(cands, args, 132)      # M = 3136: 25 programs of 128x64
    assert tconv.programs(args, best) >= 132
    assert all(c[0] * c[1] <= best[0] * best[1] for c in cands if tconv.programs(args, c) >= 132)
    tiny = dict(args, M=49)
    assert tconv.heuristic_config(cands, tiny, 132) == max(
        cands, key=lambda c: tconv.programs(tiny, c))


def test_availability(monkeypatch):
    from resnet_fused.backends import triton as tb
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert tb.unavailable_reason(None) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = tb.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason
    if not torch.cuda.is_available():
        assert "CUDA" in tb.unavailable_reason(torch.device("cuda"))
        assert tb.unavailable_reason(None) is not None
        with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
            with backends.backend("triton"):
                pass
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is for tests, never auto's pick
    assert backends.device_choice(torch.device("cpu")) != "triton"


def test_fp64_delegates_to_stock(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, scale, shift, res = make_problem(1, 8, 5, 5, 8, 3, 1, 1, 1, 1, torch.float64,
                                                torch.device("cpu"), residual=True)
    with backends.backend("triton"):
        out = ops.conv_bn_act(x, weight, scale, shift, residual=res, padding=1)
    ref = conv_bn_act_ref(x, weight, scale, shift, residual=res, padding=1)
    assert (out - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


def test_prepared_weight_matches_default_layout():
    """Same logical shape/dtype as the default (the `cuda` backend's) prepared form: one fold
    cache entry serves both under per-layer auto."""
    from resnet_fused.backends import triton as tb
    w = torch.randn(8, 4, 3, 3, dtype=torch.float16)
    s = torch.ones(8)
    packed = tb.prepare(w, s, s).weight
    assert torch.equal(packed, backends.prepare_default(w, s, s).weight)
    assert packed.shape == w.shape and packed.dtype == w.dtype
    assert packed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(packed, w)


def test_interpreter_mode_does_not_leak(monkeypatch):
    """Building the interpreted kernel leaves TRITON_INTERPRET as it was."""
    import os
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tconv.jit_kernel(True)
    assert "TRITON_INTERPRET" not in os.environ
    assert not tconv.interpreting()

