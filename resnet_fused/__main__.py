"""Command line: python -m resnet_fused {info,bench} ..."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fused")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends")
    from . import bench
    bench.add_arguments(sub.add_parser("bench", help="fused vs stock torchvision, side by side"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report
        print(report())
        return 0
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
