"""The accuracy rule every fused result is held to, against a float64 reference.

    err(fused, ref64) <= factor * err(stock in the same dtype, ref64)
                         + ATOL[dtype] * max(1, max|ref64|)

ATOL only has to cover the case where stock happens to be (nearly) exact: a few rounding steps of
the dtype at the output's magnitude: 2^-10 * 4 for fp16, 2^-7 * 4 for bf16, 2^-23 * 4 for fp32.
Non-finite elements are compared apart: the fused result must be NaN/Inf exactly where the
reference is (stock PyTorch propagates NaN through conv, BatchNorm, add and ReLU), or exactly
where stock's same-dtype result is, where stock's own pattern departs from float64's (oneDNN's
bf16 convolution on an AMD EPYC turns an Inf input into NaN where float64 keeps the Inf): the
package's promise is stock's behaviour.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 5e-7, torch.float64: 1e-12}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64; NaN when either holds a NaN (so `err <= bound` fails)."""
    return (a.to(torch.float64) - ref.to(torch.float64)).abs().max().item() if a.numel() else 0.0


def _max_err_where_finite(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| over the elements where both are finite (the rule judges the NaN/Inf pattern
    on its own: stock cuDNN's fp16 stem, for one, spreads a NaN beyond the conv's receptive
    field, which must not make stock's error, and so the bound, NaN)."""
    finite = torch.isfinite(a) & torch.isfinite(ref)
    if bool(finite.all()):
        return max_err(a, ref)
    return max_err(a[finite], ref[finite]) if bool(finite.any()) else 0.0


def _pattern_problems(fused64: torch.Tensor, ref64: torch.Tensor) -> list:
    """How the NaN/Inf elements of `fused64` depart from the reference's (empty: they do not)."""
    problems = []
    nan_f, nan_r = torch.isnan(fused64), torch.isnan(ref64)
    if not torch.equal(nan_f, nan_r):
        problems.append(f"NaN pattern differs from the reference: {int(nan_f.sum())} NaN, "
                        f"expected {int(nan_r.sum())}")
    inf_r = torch.isinf(ref64)
    if not torch.equal(fused64[inf_r], ref64[inf_r]):
        problems.append("Inf elements differ from the reference")
    both = torch.isfinite(fused64) & torch.isfinite(ref64)
    if not torch.equal(both, torch.isfinite(ref64)):
        problems.append(f"{int((torch.isfinite(ref64) & ~both).sum())} non-finite elements where "
                        f"the reference is finite")
    return problems


def _same_pattern(fused64: torch.Tensor, stock: torch.Tensor) -> bool:
    """NaN, +Inf and -Inf exactly where `stock` has them."""
    stock64 = stock.to(torch.float64)
    return (fused64.shape == stock64.shape
            and all(torch.equal(f(fused64), f(stock64))
                    for f in (torch.isnan, torch.isposinf, torch.isneginf)))


def rule_violation(fused: torch.Tensor, stock: Union[None, torch.Tensor, Sequence[torch.Tensor]],
                   ref64: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> Optional[str]:
    """None when `fused` satisfies the rule, else a sentence saying how it fails.

    `stock` is one tensor, several (the largest error counts: stock's two layouts round
    differently) or None when no stock same-dtype result exists."""
    if fused.shape != ref64.shape:
        return f"shape {tuple(fused.shape)}, expected {tuple(ref64.shape)}"
    fused64 = fused.to(torch.float64)
    stocks = [] if stock is None else [stock] if isinstance(stock, torch.Tensor) else list(stock)
    problems = _pattern_problems(fused64, ref64)
    if problems and any(_same_pattern(fused64, s) for s in stocks):
        problems = []  # stock's own pattern, where it departs from float64's
    # The error on the elements both got finite (the non-finite ones are judged above).
    err = _max_err_where_finite(fused64, ref64)
    stock_err = max([_max_err_where_finite(s.to(torch.float64), ref64) for s in stocks],
                    default=0.0)
    finite_ref = ref64[torch.isfinite(ref64)]
    ref_max = finite_ref.abs().max().item() if finite_ref.numel() else 0.0
    bound = factor * stock_err + ATOL[dtype] * max(1.0, ref_max)
    if not err <= bound:
        problems.append(f"{dtype}: err {err:.3e} > {factor} * stock err {stock_err:.3e} + atol "
                        f"-> {bound:.3e}")
    return "; ".join(problems) or None
