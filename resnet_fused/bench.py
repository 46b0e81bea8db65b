"""`python -m resnet_fused bench`: fused vs stock torchvision, side by side (time, max difference)."""
from __future__ import annotations

import argparse
import time

import torch

from . import backends


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5)


def _time(model, x, iters: int, device: torch.device) -> float:
    with torch.inference_mode():
        model(x)  # warm-up: fold cache, autotuning, allocator
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(args: argparse.Namespace) -> int:
    import torchvision
    import resnet_fused

    device = torch.device(args.device)
    torch.manual_seed(0)
    stock = getattr(torchvision.models, args.arch)().eval().to(device)
    fused = resnet_fused.fuse(stock)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.inference_mode():
        diff = (fused(x) - stock(x)).abs().max().item()
    stock_ms = _time(stock, x, args.iters, device)
    fused_ms = _time(fused, x, args.iters, device)
    print(f"{args.arch} batch {args.batch} {args.size}x{args.size} fp32 on {device.type}, "
          f"backend auto -> {backends.auto_choice(device)}")
    print(f"{'provider':24s} {'median ms':>10s} {'img/s':>9s} {'speed-up':>9s}")
    for name, ms in (("torchvision eager", stock_ms), ("resnet_fused", fused_ms)):
        print(f"{name:24s} {ms:10.2f} {args.batch / ms * 1e3:9.1f} {stock_ms / ms:8.2f}x")
    print(f"max |fused - torchvision| = {diff:.3e}")
    return 0
