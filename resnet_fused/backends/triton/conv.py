"""Implicit-GEMM conv with BatchNorm scale/shift, residual add and ReLU fused: one Triton kernel.

What is fused
    out[n, oh, ow, co] = relu?(sum_k A[m, k] * B[k, co] * scale[co] + shift[co]
                               + residual[n, co, oh, ow])
    as a GEMM with M = N*OH*OW (output pixels), N = C_out, K = KH*KW*C_in/groups, A gathered on the
    fly from the activations through their strides (no im2col buffer, no padding copy: out-of-image
    taps are masked to zero) and B the weight read through its strides. fp32 accumulation; the
    epilogue (scale, shift, residual, ReLU) runs on the fp32 accumulator; one cast, one store into a
    freshly allocated channels_last output (it never aliases x or the residual).

Constexpr-selected K loops, all in the same kernel:
    dense       groups == 1 (every ResNet conv but the stem): operand pointer tiles built once,
                a scalar offset per iteration, rows and columns past the problem clamped (read,
                never stored) so only image padding and a partial last channel block (EVEN_K
                off) need masks; 1x1 loops over channel blocks with pointer increments, KxK over
                (tap, channel block) with a constant channel-block count (no division). These
                loops split along K (SPLIT_K): grid axis 1 is the split, each split writes an
                fp32 partial tile, a REDUCE launch sums them in split order and runs the
                epilogue once (batch 1: layer3/4 have too few tiles to fill the GPU otherwise).
    grouped     the general 1x1 and (tap, channel block) loops with the block-diagonal weight
                mask (below).
    ROW_K       the stem (7x7/2, C_in = 3): one K iteration per kernel row, k = kw * C_in + c
                within it (21 of a 32-wide block), so offsets, weight columns and the
                image-column mask are computed once and each iteration only steps a pointer.
    FLAT_K      K = (kh, kw, c) decomposed per element, for small C_in whose kernel row does not
                fit one K block: no channel padding.

Grouped convs (ResNeXt) are fused, not looped: an N tile covers either part of one group's output
channels (C_out/groups >= BLOCK_N) or several whole groups (C_out/groups < BLOCK_N). In the second
case the tile's K range spans those groups' input channels and B is masked block-diagonally, so a
32x4d layer runs as dense MMA tiles (more MACs than needed, but grouped convs are memory bound and
tensor cores are otherwise idle there).

NaN/Inf exactly as stock: a multi-group tile would leak a NaN (0 * NaN) across groups, and 3xTF32
turns Inf into NaN (Inf - Inf). Such problems (EXACT_NONFINITE) get a second, FIXUP launch: the
first flags each tile whose accumulator is non-finite, the second recomputes only those tiles
group by group in IEEE precision (other programs exit at once). A separate launch, because the
recompute inside the main kernel raised its register pressure and spilled inside the K loop.

Trade-offs
    - A is gathered with pointer arithmetic: works for any stride/padding/dilation and any input
      strides (NCHW included, slower but correct) on Ampere and Hopper alike. On Hopper, TMA
      candidates (Config.tma) load the weight through a tensor descriptor in every dense layer
      with a channels_last weight, and x too where the conv is a plain GEMM (1x1, stride 1, no
      padding, dense channels_last x); the descriptor zero-fills past M and C_in, so no masks.
      Tuning times them against the cp.async configs; which wins is a GPU measurement.
      For dense 1x1/KxK convs on channels_last input both operands move with 16-byte cp.async and
      the MMA is wgmma on sm_90 for BLOCK_M >= 64 (mma.sync below that, and on sm_80). The stem's
      per-element gather and the block-diagonal weight tile of grouped convs are scalar loads and
      spill registers on the largest tiles (benchmarks/results/triton_compile_report.md); the
      autotuner measures, and per-layer `auto` can hand such layers to cuDNN.
    - Row (pixel) offsets are int64, so tensors past 2^31 elements index correctly; per-element
      column offsets (channel * channel-stride) stay int32 and the launcher guarantees they fit.
    - Strides, padding, dilation, eps-derived values are plain runtime ints/tensors, never
      constexpr (Triton specialises ints only on ==1 and divisibility by 16). KH/KW, the loop kind,
      residual/ReLU presence, the TF32 choice and the interpreter bf16 upcast are constexpr: each
      takes a handful of values.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ... import tuning
from ...ops import out_hw
from .compat import interpreter_mode

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Kernel. A plain function, turned into a JIT or an interpreted kernel by `jit_kernel(interpret)`;
# see there for why it is not decorated here.
# ----------------------------------------------------------------------------------------------
def conv_bn_act_kernel(
    # tensors
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    flag_ptr,                    # EXACT_NONFINITE: one int32 per tile, "this tile met NaN/Inf"
    ws_ptr,                      # SPLIT_K > 1: fp32 partial tiles, [SPLIT_K, M, C_out]
    a_desc, b_desc,              # TMA_A / TMA_B: tensor descriptors of x as [M, C_in] and of the
                                 # weight as [C_out, KH*KW*C_in] (None otherwise)
    # problem shape (M is not specialised: a new batch size reuses the compiled kernel)
    M, C_in, C_out, groups, CIN_G, COUT_G,
    H, W, OH, OW,
    # N-tile grouping, derived from BLOCK_N by `tile_args` (runtime ints, so Triton's own
    # divisibility-by-16 specialisation tells the compiler when a tile's channel window is aligned)
    GPT, KC_TILE,
    # conv geometry: runtime ints, never constexpr
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # element strides of x (N, C, H, W), weight (C_out, C_in/g, KH, KW), residual (N, C, H, W)
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sr_n, sr_c, sr_h, sr_w,
    # compile-time switches
    KH: tl.constexpr, KW: tl.constexpr,
    FLAT_K: tl.constexpr,        # per-element (tap, channel) gather: tiny C_in/groups (the stem)
    HAS_RES: tl.constexpr, RELU: tl.constexpr,
    PRECISION: tl.constexpr,     # tl.dot input precision: "tf32x3" or "ieee" (fp32 operands only)
    UPCAST: tl.constexpr,        # interpreter only: bf16 operands to fp32 before tl.dot
    EXACT_NONFINITE: tl.constexpr,  # flag tiles that met NaN/Inf, for the FIXUP launch
    FIXUP: tl.constexpr,         # the second launch: recompute flagged tiles exactly
    DENSE: tl.constexpr,         # groups == 1: the lean K loops (no block-diagonal weight mask)
    EVEN_K: tl.constexpr,        # dense and C_in % BLOCK_K == 0: no channel mask in the K loop
    NCK: tl.constexpr,           # dense KxK (and split 1x1): channel blocks per tap, a constant
    IN_IMAGE: tl.constexpr,      # 1x1 without padding: every tap lies inside the image
    SPLIT_K: tl.constexpr,       # programs per tile along K (grid axis 1); 1: no split
    REDUCE: tl.constexpr,        # split-K's second launch: sum the partials, then the epilogue
    TMA_A: tl.constexpr,         # dense 1x1 stride-1 on a dense channels_last x: A by TMA
    TMA_B: tl.constexpr,         # dense, weight K-contiguous: B by TMA (Hopper)
    ROW_K: tl.constexpr,         # FLAT_K with KW * C_in <= BLOCK_K: a K iteration per kernel row
    # tile configuration (autotuned)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- which tile: grouped ordering of (pid_m, pid_n) so neighbouring programs share B in L2
    # (Only builtins in here, no tl.cdiv / tl.zeros: those are jit functions of triton.language,
    # and an interpreted kernel cannot call them when Triton was imported without TRITON_INTERPRET.)
    # GPT: whole groups per N tile (1: the tile lies within one group); KC_TILE = GPT * CIN_G.
    tiles_per_group = (COUT_G + BLOCK_N - 1) // BLOCK_N   # N tiles per group (1 when GPT > 1)
    num_pid_n = (groups + GPT - 1) // GPT * tiles_per_group
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)     # which K split (always 0 unless SPLIT_K > 1)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # ---- columns: output channels of this tile, and the input-channel window each column reads
    g_tile = pid_n // tiles_per_group
    g0 = g_tile * GPT                                  # first group of the tile
    col = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within the span
    co = g0 * COUT_G + col
    n_mask = (col < GPT * COUT_G) & (co < C_out)
    lo = (col // COUT_G) * CIN_G                       # column's K window (block diagonal)
    hi = lo + CIN_G
    c_base = g_tile * KC_TILE                          # first input channel the tile reads
    KC = tl.minimum(KC_TILE, C_in - c_base)            # input channels it reads per tap
    w_col = co.to(tl.int64) * sw_o - lo.to(tl.int64) * sw_i   # + kc * sw_i -> w[co, kc - lo]

    # ---- rows: output pixels m -> (n, oh, ow) -> top-left input position (int64 offsets)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.minimum(offs_m, M - 1)   # rows past M read row M - 1 (never stored): no load mask
    ow = rows % OW
    t = rows // OW
    oh = t % OH
    n = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = (n.to(tl.int64) * sx_n + c_base.to(tl.int64) * sx_c
             + ih0.to(tl.int64) * sx_h + iw0.to(tl.int64) * sx_w)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    rk = tl.arange(0, BLOCK_K)
    store_rows = m_mask      # a fix-up program stores only a tile it recomputed
    if FIXUP:
        # EXACT_NONFINITE problems get a second launch. A tile spanning several groups multiplies
        # every input channel of the tile with every column, other groups' columns through zero
        # weights: 0 * NaN = NaN (and 0 * Inf) leaks across groups; 3xTF32 splits Inf into
        # Inf - Inf = NaN. Either shows only where the accumulator is non-finite, so the first
        # launch flags such tiles (NaN/Inf inputs: rare) and this one recomputes them, one group
        # at a time over that group's channels only, in IEEE precision: NaN and Inf land
        # exactly where stock's convolution puts them. Unflagged programs do nothing.
        tile_bad = tl.load(flag_ptr + pid)
        if tile_bad != 0:
            nck_g = (CIN_G + BLOCK_K - 1) // BLOCK_K
            col_group = col // COUT_G                  # group of each column within the tile
            for j in range(0, GPT):
                acc_j = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for it in range(0, KH * KW * nck_g):
                    tap = it // nck_g
                    kc = j * CIN_G + (it - tap * nck_g) * BLOCK_K + rk
                    k_ok = (kc < (j + 1) * CIN_G) & (kc < KC)
                    kh = tap // KW
                    kw = tap - kh * KW
                    ih = ih0 + kh * dil_h
                    iw = iw0 + kw * dil_w
                    row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    tap_x = (kh * dil_h).to(tl.int64) * sx_h + (kw * dil_w).to(tl.int64) * sx_w
                    a = tl.load(x_ptr + (x_row[:, None] + tap_x + (kc * sx_c)[None, :]),
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_ptr + (w_col[None, :] + (kh * sw_h + kw * sw_w)
                                         + (kc * sw_i)[:, None]),
                                mask=(kc[:, None] >= lo[None, :]) & (kc[:, None] < hi[None, :])
                                & k_ok[:, None] & n_mask[None, :], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc_j = tl.dot(a, b, acc_j, input_precision="ieee")
                acc = tl.where((col_group == j)[None, :], acc_j, acc)
        store_rows = m_mask & (tile_bad != 0)
    elif REDUCE:
        # Split-K's second launch: the partial tiles summed in split order (deterministic).
        ws_mask = m_mask[:, None] & n_mask[None, :]
        for s in range(0, SPLIT_K):   # (SPLIT_K * M fits int32: MAX_SPLIT_M)
            ws_off = (offs_m + s * M).to(tl.int64)[:, None] * C_out + co[None, :]
            acc += tl.load(ws_ptr + ws_off, mask=ws_mask, other=0.0)
    elif ROW_K:
        # The stem (C_in = 3): one K iteration per kernel row kh, k = kw * C_in + c within it
        # (contiguous in a channels_last x). Offsets, weight columns and the image-column mask
        # are the same for every row: computed once; per iteration a pointer step and the row
        # mask. (BLOCK_K >= KW * C_in; the rest of the block is masked off.)
        kw_k = rk // C_in
        c_k = rk - kw_k * C_in
        k_ok = rk < KW * C_in
        iw = iw0[:, None] + (kw_k * dil_w)[None, :]
        col_ok = k_ok[None, :] & (iw >= 0) & (iw < W)
        a_ptrs = x_ptr + (x_row[:, None] + ((kw_k * dil_w).to(tl.int64) * sx_w
                                             + c_k * sx_c)[None, :])
        b_ptrs = (w_ptr + (tl.minimum(co, C_out - 1).to(tl.int64) * sw_o)[None, :]
                  + (kw_k * sw_w + c_k * sw_i)[:, None])
        # 2-byte elements cannot go through cp.async, so Triton's pipeliner leaves these loads
        # alone: the next row is prefetched into registers by hand while this one multiplies.
        ih = ih0
        a_next = tl.load(a_ptrs, mask=col_ok & ((ih >= 0) & (ih < H))[:, None], other=0.0)
        b_next = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        for r in range(0, KH):
            a = a_next
            b = b_next
            a_ptrs += dil_h * sx_h
            b_ptrs += sw_h
            ih += dil_h
            more = r + 1 < KH   # the last prefetch is masked off: no memory access
            a_next = tl.load(a_ptrs, mask=col_ok & ((ih >= 0) & (ih < H) & more)[:, None],
                             other=0.0)
            b_next = tl.load(b_ptrs, mask=k_ok[:, None] & more, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    elif DENSE and not FLAT_K:
        # groups == 1: the lean loops. The operand pointer tiles are built once; per iteration
        # only a scalar offset changes, masks are loop-invariant (1x1) or per-tap rows only (KxK),
        # and with EVEN_K no channel mask at all. A K split covers iterations [it0, it1).
        # (columns past C_out read column C_out - 1, never stored: B needs no column mask)
        a_ptrs = x_ptr + (x_row[:, None] + (rk * sx_c)[None, :])
        b_ptrs = (w_ptr + (tl.minimum(co, C_out - 1).to(tl.int64) * sw_o)[None, :]
                  + (rk * sw_i)[:, None])
        if KH * KW == 1:
            row_ok = ((ih0 >= 0) & (ih0 < H) & (iw0 >= 0) & (iw0 < W))[:, None]
            if SPLIT_K > 1:
                n_it = NCK   # constant bounds per split (a runtime bound spilled 8 B here)
            else:
                n_it = (C_in + BLOCK_K - 1) // BLOCK_K
            per = (n_it + SPLIT_K - 1) // SPLIT_K
            it0 = pid_k * per
            it1 = tl.minimum(it0 + per, n_it)
            a_ptrs += it0 * BLOCK_K * sx_c
            b_ptrs += it0 * BLOCK_K * sw_i
            for it in range(it0, it1):
                # (TMA zero-fills rows past M and channels past C_in: no masks either way)
                if TMA_A:
                    a = a_desc.load([pid_m * BLOCK_M, it * BLOCK_K])
                elif EVEN_K and IN_IMAGE:
                    a = tl.load(a_ptrs)
                elif EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok, other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_ok & (it * BLOCK_K + rk < C_in)[None, :],
                                other=0.0)
                if TMA_B:
                    b = b_desc.load([pid_n * BLOCK_N, it * BLOCK_K]).T
                elif EVEN_K:
                    b = tl.load(b_ptrs)
                else:
                    b = tl.load(b_ptrs, mask=(it * BLOCK_K + rk < C_in)[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * sx_c
                b_ptrs += BLOCK_K * sw_i
        else:
            # KxK: one flat loop over (tap, channel block); NCK is a constant, so `it // NCK` is
            # a shift or a multiply, not a division.
            per = (KH * KW * NCK + SPLIT_K - 1) // SPLIT_K
            it0 = pid_k * per
            it1 = tl.minimum(it0 + per, KH * KW * NCK)
            for it in range(it0, it1):
                tap = it // NCK
                c0 = (it - tap * NCK) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_ok = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
                a_off = ((kh * dil_h).to(tl.int64) * sx_h + (kw * dil_w).to(tl.int64) * sx_w
                         + c0 * sx_c)
                b_off = kh * sw_h + kw * sw_w + c0 * sw_i
                if TMA_B:  # (EVEN_K: a channel block never crosses into the next tap)
                    a = tl.load(a_ptrs + a_off, mask=row_ok, other=0.0)
                    b = b_desc.load([pid_n * BLOCK_N, tap * C_in + c0]).T
                elif EVEN_K:
                    a = tl.load(a_ptrs + a_off, mask=row_ok, other=0.0)
                    b = tl.load(b_ptrs + b_off)
                else:
                    k_ok = c0 + rk < C_in
                    a = tl.load(a_ptrs + a_off, mask=row_ok & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs + b_off, mask=k_ok[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        if KH * KW == 1:
            # 1x1: the input row of every pixel is fixed; loop over channel blocks only.
            row_ok = m_mask & (ih0 >= 0) & (ih0 < H) & (iw0 >= 0) & (iw0 < W)
            for c0 in range(0, KC, BLOCK_K):
                kc = c0 + rk
                a = tl.load(x_ptr + (x_row[:, None] + (kc * sx_c)[None, :]),
                            mask=row_ok[:, None] & (kc < KC)[None, :], other=0.0)
                b = tl.load(w_ptr + (w_col[None, :] + (kc * sw_i)[:, None]),
                            mask=(kc[:, None] >= lo[None, :]) & (kc[:, None] < hi[None, :])
                            & n_mask[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        elif FLAT_K:
            # K index k = tap * KC + kc, decomposed per element: no channel padding (stem: K = 147).
            K_total = KH * KW * KC
            for k0 in range(0, K_total, BLOCK_K):
                k = k0 + rk
                tap = k // KC
                kc = k - tap * KC
                kh = tap // KW
                kw = tap - kh * KW
                dh = kh * dil_h
                dw = kw * dil_w
                ih = ih0[:, None] + dh[None, :]
                iw = iw0[:, None] + dw[None, :]
                a_mask = (m_mask[:, None] & (k < K_total)[None, :]
                          & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
                a_off = x_row[:, None] + (dh.to(tl.int64) * sx_h + dw.to(tl.int64) * sx_w
                                          + kc * sx_c)[None, :]
                a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
                b_mask = ((k < K_total)[:, None] & (kc[:, None] >= lo[None, :])
                          & (kc[:, None] < hi[None, :]) & n_mask[None, :])
                b = tl.load(w_ptr + (w_col[None, :] + (kc * sw_i + kh * sw_h + kw * sw_w)[:, None]),
                            mask=b_mask, other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            # KxK: one flat loop over (tap, channel block) so the pipeliner sees a single loop.
            nck = (KC + BLOCK_K - 1) // BLOCK_K
            for it in range(0, KH * KW * nck):
                tap = it // nck
                c0 = (it - tap * nck) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                tap_x = (kh * dil_h).to(tl.int64) * sx_h + (kw * dil_w).to(tl.int64) * sx_w
                kc = c0 + rk
                a = tl.load(x_ptr + (x_row[:, None] + tap_x + (kc * sx_c)[None, :]),
                            mask=row_ok[:, None] & (kc < KC)[None, :], other=0.0)
                b = tl.load(w_ptr + (w_col[None, :] + (kh * sw_h + kw * sw_w)
                                     + (kc * sw_i)[:, None]),
                            mask=(kc[:, None] >= lo[None, :]) & (kc[:, None] < hi[None, :])
                            & n_mask[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if EXACT_NONFINITE and not FIXUP and (SPLIT_K == 1 or REDUCE):
        bad = ((acc != acc) | (acc == float("inf")) | (acc == -float("inf"))).to(tl.int32)
        tl.store(flag_ptr + pid, tl.reduce(bad, None, _MAX_COMBINE))

    if SPLIT_K > 1 and not REDUCE and not FIXUP:
        # a partial tile: every program of every split writes its whole tile (zeros for an empty
        # K range), so the workspace needs no clearing and a graph replay stays valid
        ws_off = (offs_m + pid_k * M).to(tl.int64)[:, None] * C_out + co[None, :]
        tl.store(ws_ptr + ws_off, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        # ---- epilogue on the fp32 accumulator: scale, shift, (+ residual), (ReLU); one cast,
        # one store
        scale = tl.load(scale_ptr + co, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + co, mask=n_mask, other=0.0)
        y = acc * scale[None, :] + shift[None, :]
        mask = store_rows[:, None] & n_mask[None, :]
        if HAS_RES:
            r_row = (n.to(tl.int64) * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w)
            r = tl.load(res_ptr + (r_row[:, None] + co.to(tl.int64)[None, :] * sr_c), mask=mask,
                        other=0.0)
            y = y + r.to(tl.float32)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)   # keeps NaN, as torch.relu does
        out_off = offs_m.to(tl.int64)[:, None] * C_out + co[None, :]  # channels_last, contiguous
        tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)


# tl.max is a jit function, which a kernel interpreted in a process that imported Triton without
# TRITON_INTERPRET cannot call; tl.reduce is a builtin, given here the combine function tl.max
# itself passes (the interpreter runs that one as numpy's max; tests cover both modes).
_MAX_COMBINE = tl.standard._elementwise_max


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
class Config(NamedTuple):
    """One tile configuration. split_k > 1: the K loop is split over that many programs per
    tile, whose fp32 partial tiles a second launch sums in split order (deterministic) before the
    epilogue."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int
    split_k: int = 1
    tma: bool = False        # operands by TMA where the problem allows (Hopper; tma_operands)

    @property
    def label(self) -> str:
        """128x64x64 g8 w4 s4 (k4 with a K split)."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.warps} "
                f"s{self.stages}" + (f" k{self.split_k}" if self.split_k > 1 else "")
                + (" tma" if self.tma else ""))

    def launch_dict(self) -> Dict[str, int]:
        """The `config` argument of conv_bn_act."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m, num_warps=self.warps, num_stages=self.stages,
                    SPLIT_K=self.split_k, TMA=self.tma)


# SMs of the GPUs the tile lists are tuned for (H100 SXM, A100): what split-K aims to fill when
# planning without a device (warmup --target, the static report, the sweep's plan).
FAMILY_SMS = {"hopper": 132, "ampere": 108}


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), for 2-byte operands. fp32 operands
# halve BLOCK_K (same shared memory per stage). Shared memory per config ~ stages * (BM + BN) * BK *
# elem bytes; the AOT compile test checks every one against the target's limit.
HOPPER = [  # sm_90: 227 KiB shared memory per block; wgmma needs BLOCK_M >= 64 and 4k warps
    (128, 256, 64, 8, 8, 3),   # large batch, wide layers (1x1 expand, N = 256..2048)
    (256, 128, 64, 8, 8, 3),   # large batch, early layers (M = N * 56 * 56)
    (128, 128, 64, 8, 8, 3),
    (128, 64, 64, 8, 4, 4),    # narrow layers (C_out = 64)
    (64, 128, 64, 8, 4, 4),    # mid batch, late layers
    (64, 64, 64, 8, 4, 4),
    (32, 64, 128, 1, 4, 4),    # small M (batch 1: M = 49 .. 3136), long K
    (16, 32, 128, 1, 4, 4),    # tiny M: more programs for M = 49 (layer4 at batch 1)
]
AMPERE = [  # sm_80: 163 KiB shared memory per block; mma.sync; shallower K tiles, more stages
    (128, 256, 32, 8, 8, 3),
    (256, 128, 32, 8, 8, 3),
    (128, 128, 32, 8, 4, 4),
    (128, 64, 32, 8, 4, 4),
    (64, 128, 32, 8, 4, 4),
    (64, 64, 32, 8, 4, 4),
    (32, 64, 64, 1, 4, 4),
    (16, 32, 128, 1, 4, 4),
]
# Under the interpreter: one config. Small M tiles so that tiny test shapes span several, wider N/K
# tiles because the interpreter's cost is per loop iteration and per program, not per element (the
# tests run every real config's tile shape through the interpreter too).
INTERPRETER = [(32, 128, 128, 4, 4, 1)]


def arch_family(capability: Tuple[int, int]) -> str:
    return "hopper" if capability[0] >= 9 else "ampere"


@functools.lru_cache(maxsize=None)
def _device_family(index: Optional[int]) -> str:
    return arch_family(torch.cuda.get_device_capability(index))


# fp32 runs as 3xTF32: the operands are split in registers, so the largest tiles spill (static
# report, triton 3.6: sm_90 128x256 488 B and 256x128 584 B; sm_80 128x128 624 B, 256x128 4.4 KB).
FP32_MAX_TILE = {"hopper": 128 * 128, "ampere": 128 * 64}


def config_tuples(family: str, dtype: torch.dtype) -> List[Config]:
    base = {"hopper": HOPPER, "ampere": AMPERE, "interpreter": INTERPRETER}[family]
    if dtype == torch.float32 and family != "interpreter":
        base = [(bm, bn, max(16, bk // 2), gm, w, s) for bm, bn, bk, gm, w, s in base
                if bm * bn <= FP32_MAX_TILE[family]]
    return [Config(*c) for c in base]


def tile_args(args: Dict, config: Sequence[int]) -> Dict[str, int]:
    """The constexprs a config implies on a problem: GPT (whole groups per N tile, >= 1),
    KC_TILE (input channels per tile and tap), whether tiles that meet NaN/Inf need the exact
    fix-up launch (several groups per tile, or 3xTF32), and the dense loop's DENSE / EVEN_K / NCK
    (NCK only for KxK and split 1x1 loops, so unsplit 1x1 kernels are shared across C_in)."""
    cfg = Config(*config)
    gpt = groups_per_tile(args, cfg.block_n)
    exact = (gpt > 1 and args["groups"] > 1) or args["PRECISION"] == "tf32x3"
    dense = args["groups"] == 1
    taps = dense and not args["FLAT_K"] and (args["KH"] * args["KW"] > 1 or cfg.split_k > 1)
    return {"GPT": gpt, "KC_TILE": gpt * args["CIN_G"], "EXACT_NONFINITE": exact,
            "DENSE": dense, "EVEN_K": dense and args["C_in"] % cfg.block_k == 0,
            "NCK": ceil_div(args["C_in"], cfg.block_k) if taps else 1,
            "IN_IMAGE": (dense and args["KH"] * args["KW"] == 1 and args["pad_h"] == 0
                         and args["pad_w"] == 0),
            **dict(zip(("TMA_A", "TMA_B"), tma_operands(args, cfg))),
            "ROW_K": row_k(args, cfg),
            "SPLIT_K": cfg.split_k}


def ceil_div(a: int, b: int) -> int:
    """Host-side integer ceil division (triton.cdiv is a JIT function: ~5 us per call from
    Python, and candidates() runs on every tuned launch)."""
    return -(-a // b)


def groups_per_tile(args: Dict, block_n: int) -> int:
    """GPT: whole groups an N tile of `block_n` columns covers (1: it lies within one group)."""
    return max(block_n // args["COUT_G"], 1)


def row_k(args: Dict, config: Sequence[int]) -> bool:
    """The stem's loop (one K iteration per kernel row) where a row's taps fit one K block."""
    return (bool(args["FLAT_K"]) and args["groups"] == 1
            and args["KW"] * args["C_in"] <= Config(*config).block_k)


def tma_operands(args: Dict, config: Sequence[int]) -> Tuple[bool, bool]:
    """(A by TMA, B by TMA) for a TMA config: B wherever the weight is K-contiguous (a
    channels_last weight: [C_out, KH*KW*C_in] rows) with 16-byte aligned rows and, for KxK, whole
    channel blocks per tap; A for 1x1 stride-1 unpadded convs on a dense channels_last x ([M, C_in]
    rows). 16-bit operands only. (False, False) for other configs and problems."""
    cfg = Config(*config)
    x, w = args["x_ptr"], args["w_ptr"]
    if (not cfg.tma or args["groups"] != 1 or args["FLAT_K"] or x.element_size() != 2
            or x.dtype not in (torch.float16, torch.bfloat16)):
        return False, False
    kh, kw, c_in = args["KH"], args["KW"], args["C_in"]
    row = kh * kw * c_in
    b = (dense_strides(w, (1, 3, 2, 0)) and row * 2 % 16 == 0 and w.data_ptr() % 16 == 0
         and (kh * kw == 1 or c_in % cfg.block_k == 0))
    a = (b and kh * kw == 1 and (args["stride_h"], args["stride_w"], args["pad_h"],
                                 args["pad_w"]) == (1, 1, 0, 0)
         and dense_strides(x, (1, 3, 2, 0)) and c_in * 2 % 16 == 0 and x.data_ptr() % 16 == 0)
    return a, b


def dense_strides(t: torch.Tensor, order: Sequence[int]) -> bool:
    """Whether `t` is densely packed with its dims nested in `order` (innermost first), ignoring
    the strides of size-1 dims (which are arbitrary)."""
    expected = 1
    for d in order:
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def k_iterations(args: Dict, config: Sequence[int]) -> int:
    """K-loop iterations of one tile without a split (dense loops)."""
    return args["KH"] * args["KW"] * ceil_div(args["C_in"], Config(*config).block_k)


# Split-K: at most this many splits, each with at least MIN_SPLIT_ITERATIONS K iterations, and
# only where M is small (the workspace is SPLIT_K x M x C_out fp32; batch-1 late layers).
MAX_SPLIT_K = 16
MIN_SPLIT_ITERATIONS = 2
MAX_SPLIT_M = 1 << 16


def splittable(args: Dict) -> bool:
    """Whether the problem runs the dense loops, the ones that split along K."""
    return args["groups"] == 1 and not args["FLAT_K"]


def split_k_for(args: Dict, config: Config, sms: int) -> int:
    """The smallest power-of-two split that gives `sms` programs, within the limits above (1: no
    split helps)."""
    if not splittable(args) or args["M"] > MAX_SPLIT_M:
        return 1
    n_tiles, iters = tiles(args, config), k_iterations(args, config)
    split = 1
    while (n_tiles * split < sms and split * 2 <= MAX_SPLIT_K
           and iters // (split * 2) >= MIN_SPLIT_ITERATIONS):
        split *= 2
    return split


def spills(args: Dict, config: Config) -> bool:
    """Configs the static report (tools/kernels.py; sm_90, triton 3.6 or 3.8) shows spilling
    registers on this kind of problem: the residual epilogue on tiles past 128x128 (184-480 B),
    the stem's row loop past 128x128 (64-496 B) or past 64x64 on 4 warps (224 B, triton 3.8),
    the per-element K gather (FLAT_K without ROW_K) past 64x64 or 32x64 with BLOCK_K 128
    (88-1008 B), and the split 1x1 loop past 16x32 (8 B: one value kept across the loop)."""
    area = config.block_m * config.block_n
    if args["FLAT_K"]:
        if row_k(args, config):  # the stem's row loop: past 128x128, or past 64x64 on 4 warps
            return area > 128 * 128 or (area > 64 * 64 and config.warps < 8)
        return area > 64 * 64 or (config.block_k > 64 and area > 16 * 32)
    if config.split_k > 1 and args["KH"] * args["KW"] == 1 and area > 16 * 32:
        return True
    return bool(args["HAS_RES"]) and area > 128 * 128


# candidates() per problem class: pick_config calls it on every tuned launch, and the planning
# below costs 20-45 us of Python per call.
_candidate_lists: Dict[tuple, List[Config]] = {}


def candidates(family: str, dtype: torch.dtype, m: int, c_out: int, sms: Optional[int] = None,
               args: Optional[Dict] = None) -> List[Config]:
    """The configs worth timing for a problem: tiles not far larger than its M bucket and C_out
    (M = 49 needs no 256-row tile); at least one. With the kernel `args`, also fewer pipeline
    stages where K is too short to fill them, and (given `sms`) the two smallest tiles split along
    K where no tile gives every SM a program (batch 1). Pruned on the bucket, so every batch size
    in a bucket has the same candidates. On Hopper, the wgmma tiles also with TMA operands
    (tma_operands) where the problem allows."""
    if args is None or family == "interpreter":
        return _candidates(family, dtype, m, c_out, sms, args)
    # the class: the tuning key (M bucket, shapes, geometry, epilogue, dtype, layout) and what
    # the planning reads beyond it: padding, the operands' strides and 16-byte alignment (TMA)
    x, w = args["x_ptr"], args["w_ptr"]
    klass = (family, sms, tuning.bucket(m), c_out, tuning_key(args, dtype), args["pad_h"],
             args["pad_w"], x.stride(), w.stride(), x.data_ptr() % 16, w.data_ptr() % 16)
    found = _candidate_lists.get(klass)
    if found is None:
        found = _candidate_lists.setdefault(klass, _candidates(family, dtype, m, c_out, sms, args))
    return list(found)


def _candidates(family: str, dtype: torch.dtype, m: int, c_out: int, sms: Optional[int],
                args: Optional[Dict]) -> List[Config]:
    configs = config_tuples(family, dtype)
    if args is not None and family != "interpreter":
        configs = [c for c in configs if not spills(args, c)] or configs
    m_cap, n_cap = max(16, tuning.bucket(m)), max(16, tuning.bucket(c_out))
    kept = [c for c in configs if c.block_m <= m_cap and c.block_n <= n_cap]
    kept = kept or [min(configs, key=lambda c: c.block_m * c.block_n)]
    if args is None or family == "interpreter":
        return kept
    # planned on the smallest M of the bucket: every batch size in it gets the same candidates,
    # and a split wherever the smallest needs one
    bucketed = dict(args, M=tuning.bucket(m) // 2 + 1)
    if args["FLAT_K"] and args["groups"] == 1:
        # the stem: K blocks as wide as a kernel row's taps (7 x 3 -> 32), so ROW_K runs
        row = 1 << max(4, (args["KW"] * args["C_in"] - 1).bit_length())
        if row <= 128:
            kept = list(dict.fromkeys(c._replace(block_k=row, stages=min(c.stages, args["KH"]))
                                      for c in kept))
    if splittable(args):
        kept = [c._replace(stages=max(2, min(c.stages, k_iterations(bucketed, c) + 1)))
                for c in kept]
    if sms and max(programs(bucketed, c) for c in kept) < sms:
        smallest = sorted(kept, key=lambda c: c.block_m * c.block_n)[:2]
        split = [c._replace(split_k=k) for c in smallest
                 if (k := split_k_for(bucketed, c, sms)) > 1]
        kept += [c for c in split if not spills(args, c)]
    if family == "hopper":  # the wgmma tiles again with TMA operands, where the problem allows
        kept += [t for c in kept if c.block_m >= 64 and c.split_k == 1
                 and tma_operands(args, t := c._replace(tma=True))[1]]
    return kept


def tiles(args: Dict, config: Sequence[int]) -> int:
    """Output tiles of `config` on the problem; must agree with the tile mapping in the kernel."""
    bm, bn = config[0], config[1]
    gpt = groups_per_tile(args, bn)
    n_tiles = ceil_div(args["groups"], gpt) * ceil_div(args["COUT_G"], bn)
    return ceil_div(args["M"], bm) * n_tiles


def programs(args: Dict, config: Sequence[int]) -> int:
    """CTAs of the main launch: a program per tile and K split."""
    return tiles(args, config) * Config(*config).split_k


def heuristic_config(cands: Sequence[Config], args: Dict, sms: int) -> Config:
    """Without timing: the largest tile that still gives every SM a program, else the tile with
    the most programs (small problems are latency bound: spread them)."""
    filling = [c for c in cands if programs(args, c) >= sms]
    if filling:
        return max(filling, key=lambda c: c[0] * c[1])
    return max(cands, key=lambda c: programs(args, c))


def tuning_key(args: Dict, dtype: torch.dtype) -> str:
    """What a tile decision depends on, with M bucketed (H and W enter only through M)."""
    layout = "cl" if args["sx_c"] == 1 else f"c{args['sx_c']}"
    return (f"conv|{str(dtype)[6:]}|{args['PRECISION']}|M{tuning.bucket(args['M'])}|"
            f"{args['C_in']}>{args['C_out']}|g{args['groups']}|k{args['KH']}x{args['KW']}|"
            f"s{args['stride_h']}x{args['stride_w']}|d{args['dil_h']}x{args['dil_w']}|"
            f"res{int(args['HAS_RES'])}|flat{int(args['FLAT_K'])}|{layout}")


# ----------------------------------------------------------------------------------------------
# JIT / interpreted kernel objects, built lazily per mode
# ----------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1), read now, not at import."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Arguments triton.jit must not specialise (on ==1 or divisibility by 16): M changes with the
# batch size, and a new specialisation would be a new compile at the first call of that batch.
NOT_SPECIALISED = ("M",)


@functools.lru_cache(maxsize=None)
def jit_kernel(interpret: bool = False):
    """The kernel as triton.jit makes it: compiled (JITFunction) or interpreted.

    Built here rather than with a decorator so that whether TRITON_INTERPRET was set before this
    module was imported does not matter: both kinds can coexist in one process (the interpreter for
    CPU tensors in tests, the compiled one for the AOT compile test)."""
    if interpret:
        from .compat import fix_interpreter_scalar_index
        fix_interpreter_scalar_index()
    with interpreter_mode(interpret):
        return triton.jit(conv_bn_act_kernel, do_not_specialize=list(NOT_SPECIALISED))


def launches(args: Dict, config: Sequence[int]) -> List[Tuple[Tuple[int, ...], Dict]]:
    """The launches `config` makes on `args` (from kernel_args), as (grid, keyword arguments):
    the main kernel; with split_k > 1 the split launch (grid axis 1: the split) then REDUCE; and
    where NaN/Inf need it (tile_args' EXACT_NONFINITE) the FIXUP launch, which recomputes the
    tiles the launch before it flagged. The buffers (flags, split-K workspace) are allocated on
    the output's device: on meta tensors this costs nothing, so the AOT compile plans from here
    too."""
    cfg = Config(*config)
    if cfg.split_k > 1 and not splittable(args):
        raise ValueError(f"triton conv_bn_act: split-K needs the dense K loops (groups == 1, no "
                         f"per-element K gather), got groups={args['groups']}, "
                         f"flat_k={args['FLAT_K']}")
    meta = dict(**tile_args(args, cfg), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.warps,
                num_stages=cfg.stages)
    out = args["out_ptr"]
    grid = (tiles(args, cfg),)
    run = dict(args, **meta)
    if meta["TMA_B"]:  # (a TMA config on a problem that cannot use it runs without: tma_operands)
        from triton.tools.tensor_descriptor import TensorDescriptor
        row = args["KH"] * args["KW"] * args["C_in"]
        run["b_desc"] = TensorDescriptor(args["w_ptr"], [args["C_out"], row], [row, 1],
                                         [cfg.block_n, cfg.block_k])
        if meta["TMA_A"]:
            run["a_desc"] = TensorDescriptor(args["x_ptr"], [args["M"], args["C_in"]],
                                             [args["C_in"], 1], [cfg.block_m, cfg.block_k])
    if meta["EXACT_NONFINITE"]:  # every program of the flagging launch writes its tile's flag
        run["flag_ptr"] = torch.empty(grid[0], dtype=torch.int32, device=out.device)
    steps = []
    if cfg.split_k == 1:
        steps.append((grid, run))
    else:
        ws = torch.empty((cfg.split_k, args["M"], args["C_out"]), dtype=torch.float32,
                         device=out.device)
        steps.append(((grid[0], cfg.split_k), dict(run, ws_ptr=ws, flag_ptr=out)))
        steps.append((grid, dict(run, ws_ptr=ws, REDUCE=True)))
    if meta["EXACT_NONFINITE"]:
        steps.append((grid, dict(run, FIXUP=True, SPLIT_K=1)))
    return steps


def launch(args: Dict, config: Sequence[int], interpret: bool) -> None:
    """Every launch of `config` on `args`, in order (see launches)."""
    kernel = jit_kernel(interpret)
    for grid, kwargs in launches(args, config):
        kernel[grid](**kwargs)


def time_config(args: Dict, config: Sequence[int]) -> float:
    """Milliseconds per launch (short runs: 5 ms warm-up, 25 ms measured, not Triton's 25/100)."""
    import triton.testing
    return triton.testing.do_bench(lambda: launch(args, config, False), warmup=5, rep=25)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(args: Dict, family: str, dtype: torch.dtype, device: torch.device) -> Config:
    """The tile config for this problem: remembered per bucket, else measured (tuning.decide)."""
    sms = _sm_count(device)
    cands = candidates(family, dtype, args["M"], args["C_out"], sms, args)
    return tuning.decide(device, tuning_key(args, dtype), cands,
                         measure=lambda c: time_config(args, c),
                         heuristic=lambda: heuristic_config(cands, args, sms))


# ----------------------------------------------------------------------------------------------
# Launcher: check -> allocate -> launch
# ----------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_flat_k(cin_g: int, kh: int, kw: int, groups: int) -> bool:
    """Per-element K gather when a tap has too few channels to fill a K block (the stem)."""
    return kh * kw > 1 and groups == 1 and cin_g < 16


def _fits_int32_columns(t: torch.Tensor, channel_dim: int) -> bool:
    return (t.shape[channel_dim] - 1) * t.stride(channel_dim) <= _INT32_MAX // 2


def kernel_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], out: torch.Tensor, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool,
                interpret: bool, flat_k: Optional[bool] = None) -> Dict:
    """Every kernel argument except the tile config and `tile_args`, by name (also used by the
    AOT compile test)."""
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    oh, ow = out.shape[2], out.shape[3]
    res = residual if residual is not None else out   # never read when HAS_RES is False
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)
    fp32 = x.dtype == torch.float32
    return dict(
        x_ptr=x, w_ptr=weight, scale_ptr=scale, shift_ptr=shift, res_ptr=res, out_ptr=out,
        flag_ptr=out, ws_ptr=out,   # launches() passes buffers where a config needs them
        a_desc=None, b_desc=None,   # and tensor descriptors (TMA configs)
        M=n * oh * ow, C_in=c_in, C_out=c_out, groups=groups, CIN_G=cin_g, COUT_G=c_out // groups,
        H=h, W=w, OH=oh, OW=ow,
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
        dil_h=dilation[0], dil_w=dilation[1],
        sx_n=x.stride(0), sx_c=x.stride(1), sx_h=x.stride(2), sx_w=x.stride(3),
        sw_o=weight.stride(0), sw_i=weight.stride(1), sw_h=weight.stride(2), sw_w=weight.stride(3),
        sr_n=rs[0], sr_c=rs[1], sr_h=rs[2], sr_w=rs[3],
        KH=kh, KW=kw,
        FLAT_K=use_flat_k(cin_g, kh, kw, groups) if flat_k is None else bool(flat_k),
        HAS_RES=residual is not None, RELU=bool(relu),
        # Not plain "tf32": Hopper's TF32 MMA truncates its operands, 2.5x cuDNN's TF32 error, and
        # cuDNN runs exact fp32 algorithms on some shapes anyway (H200, 2026-11-27: 3-5e-3 against
        # cuDNN's 4e-7..1.4e-3). tf32x3 (three MMAs on the split operands) is fp32-accurate.
        PRECISION="tf32x3" if fp32 and torch.backends.cudnn.allow_tf32 else "ieee",
        UPCAST=interpret and x.dtype == torch.bfloat16,
        FIXUP=False, REDUCE=False,
    )


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool, *,
                config: Optional[Dict] = None, flat_k: Optional[bool] = None) -> torch.Tensor:
    """relu?(conv2d(x, weight) * scale + shift + residual) in one launch; channels_last output.

    Inputs are assumed checked by resnet_fused.ops.check_inputs. `config` (a dict with BLOCK_M,
    BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, optionally SPLIT_K) bypasses tuning and
    `flat_k` forces the K-loop kind; both exist for tests and the correctness sweep."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton conv_bn_act: expected float16, bfloat16 or float32 tensors, got "
                        f"{x.dtype}")
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = out_hw(h, w, (kh, kw), stride, padding, dilation)
    out = torch.empty((n, c_out, oh, ow), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    m = n * oh * ow
    if m == 0 or c_out == 0:
        return out
    if m > _INT32_MAX - 1024:
        raise ValueError(f"triton conv_bn_act: N*OH*OW = {m} output pixels exceeds the kernel's "
                         f"int32 pixel index")
    # Per-element channel offsets are int32: re-lay-out the (rare) tensors where they would not fit.
    if not _fits_int32_columns(x, 1):
        x = x.contiguous(memory_format=torch.channels_last)
    if not _fits_int32_columns(weight, 1):
        weight = weight.contiguous(memory_format=torch.channels_last)
    scale, shift = scale.contiguous(), shift.contiguous()

    interpret = interpreting()
    args = kernel_args(x, weight, scale, shift, residual, out, stride, padding, dilation, groups,
                       relu, interpret, flat_k)
    family = "interpreter" if interpret else _device_family(x.device.index)
    device_guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device_guard:
        if config is None:
            cfg = pick_config(args, family, x.dtype, x.device)
        else:
            cfg = Config(*(config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
                         config.get("num_warps", 4), config.get("num_stages", 1),
                         config.get("SPLIT_K", 1), config.get("TMA", False))
            if cfg.tma and not tma_operands(args, cfg)[1]:
                raise ValueError(
                    f"triton conv_bn_act: a TMA config needs 16-bit operands, groups == 1 and a "
                    f"K-contiguous weight with 16-byte aligned rows, got {x.dtype}, "
                    f"groups={groups}, weight strides {tuple(weight.stride())}")
        launch(args, cfg, interpret)
    return out
