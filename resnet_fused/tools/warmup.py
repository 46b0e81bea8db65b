"""`python -m resnet_fused warmup --arch resnet50 --batch 1 256 --dtype fp16`: the command line
of `resnet_fused.warmup()` (resnet_fused/warm_start.py). A batch entry may be a range (`1-64`);
without a GPU, `--target sm_90` compiles for that architecture and stops. With `--probe-batch`,
the first call at an unseen batch size is timed against its steady state."""
from __future__ import annotations

import argparse
import json
import time
from typing import Tuple, Union

import torch

from ..warm_start import KERNEL_DTYPES, batch_sizes, warmup
from . import cli

DTYPES = cli.dtype_names(KERNEL_DTYPES)  # fp16, bf16, fp32


def _batch_arg(text: str) -> Union[int, range]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return range(lo, hi + 1)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size (8) or a range (1-64), got "
                                         f"{text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arch(p, default="resnet50")
    p.add_argument("--batch", nargs="+", type=_batch_arg, default=[1],
                   help="batch sizes and ranges (1 256, or 1-64)")
    p.add_argument("--size", type=cli.positive_int, default=224,
                   help="image height and width (default 224)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp16"])
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="compile processes (default: cores)")
    p.add_argument("--target", type=cli.cuda_target, default=None,
                   help="without a GPU: compile for this arch (sm_90) and stop")
    p.add_argument("--probe-batch", type=cli.positive_int, default=None,
                   help="after warming, time the first call at this (unseen) batch size against "
                        "its steady state")
    p.add_argument("--json", default=None, help="write the report here")


def _first_and_steady_ms(model, x, reps: int = 10) -> Tuple[float, float]:
    def once() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3
    first = once()
    steady = sorted(once() for _ in range(reps))[reps // 2]
    return first, steady


def main(args: argparse.Namespace) -> int:
    import resnet_fused
    start = time.perf_counter()
    builder = getattr(resnet_fused, args.arch)
    on_gpu = torch.cuda.is_available() and args.target is None
    if not on_gpu and args.target is None:
        print("warmup: no CUDA device here; pass --target sm_90 to compile for a GPU without one")
        return 2
    model = builder().eval()
    dtypes = [DTYPES[d] for d in args.dtype]
    if on_gpu:
        model = model.cuda().to(dtypes[0])
    else:
        model = model.to("meta")
    shapes = [(b, 3, args.size, args.size) for b in args.batch]
    report = warmup(model, shapes, dtypes, workers=args.workers, target=args.target)
    if on_gpu and "skipped" not in report:
        firsts = {}
        with torch.no_grad():
            for b in args.batch:
                for n in batch_sizes(b):
                    x = torch.randn(n, 3, args.size, args.size, device="cuda", dtype=dtypes[0])
                    firsts[n] = _first_and_steady_ms(model, x)[0]
        report["first_forward_ms"] = firsts
        if args.probe_batch:
            x = torch.randn(args.probe_batch, 3, args.size, args.size, device="cuda",
                            dtype=dtypes[0])
            with torch.no_grad():
                first, steady = _first_and_steady_ms(model, x)
            report["probe"] = {"batch": args.probe_batch, "first_ms": first, "steady_ms": steady,
                               "ratio": first / steady}
    report["wall_seconds"] = time.perf_counter() - start
    for key, value in report.items():
        print(f"{key:18s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if report.get("errors") else 0
