"""Command line: python -m resnet_fused {info,bench,profile,check,warmup,kernels} ...; the tools
live in resnet_fused/tools/ (this is the one module outside it that imports them)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fused")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends")
    from .tools import bench, check, kernels, profile, warmup
    bench.add_arguments(sub.add_parser("bench", help="fused vs stock PyTorch, side by side"))
    profile.add_arguments(sub.add_parser("profile", help="per-layer time, stock vs fused"))
    check.add_arguments(sub.add_parser(
        "check", help="every Triton config on every conv, vs float64"))
    warmup.add_arguments(sub.add_parser(
        "warmup", help="compile (in parallel) and tune ahead of time; the next start is warm"))
    kernels.add_arguments(sub.add_parser(
        "kernels", help="static report of the Triton kernels for a GPU target (no GPU needed)"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from .tools.info import report
        print(report())
        return 0
    if args.command == "check":
        return check.main(args)
    if args.command == "kernels":
        return kernels.main(args)
    if args.command == "warmup":
        return warmup.main(args)
    if args.command == "profile":
        return profile.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
