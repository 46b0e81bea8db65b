"""`python -m resnet_fused profile`: where the time goes, layer by layer, stock vs fused.

Layers are the units the fused model runs (resnet_fused/walk.py): every conv -> BN (-> +
residual) (-> ReLU) chain (one `conv_bn_act` call), plus maxpool, avgpool and fc. For each layer
it reports the input/output shape, multiply-adds, the stock time (torchvision's own modules: conv,
BN, add, ReLU as separate ops), the fused time (one conv_bn_act on the folded weights, selected
backend), the speed-up, the achieved TFLOP/s of the fused op (2 FLOP per multiply-add) and its
share of the device's peak, measured here in the same dtype: a large matrix product on CUDA; on
CPU the best of that and two large oneDNN convolutions (what the convs run on). A layer faster
than every probe shows ">100%": the probes, not the layer, are then the limit of the estimate.

Both sides get channels_last activations (what the fused model uses), so the difference is the
fusion, not the layout. Layers are timed one by one on random inputs of the right shape; on CUDA
with triton.testing.do_bench (L2 flushed between calls) when triton is importable, else CUDA
events; on CPU with time.perf_counter, stock and fused calls alternated (tools/timing.py).

Multiply-adds count convolutions and the fc layer only, like torchvision's published figures
(resnet50: 4.089 G per 224x224 image); BN, ReLU, residual adds and pooling are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..walk import Layer, layers
from . import cli
from .timing import (device_name, interleaved, measured_peak_tflops, quantile, time_ms,
                     versions)


def _layer_fns(layer: Layer, x: torch.Tensor,
               res: Optional[torch.Tensor]) -> Tuple[Callable[[], Any], Callable[[], Any]]:
    """(stock, fused) zero-argument callables for one layer; fused is the chain exactly as the
    model runs it under the caller's selection (auto: per device, dtype and layer)."""
    from ..layers import conv_bn

    if layer.kind == "conv_bn_act":
        conv, bn = layer.modules

        def stock():
            y = bn(conv(x))
            if res is not None:
                y = y + res
            return F.relu(y) if layer.relu else y

        act = nn.ReLU() if layer.relu else None

        def fused():
            return conv_bn(conv, bn, x, residual=res, act=act)
        return stock, fused
    module = layer.modules[0]
    if layer.kind == "linear":
        flat = x.flatten(1)
        return (lambda: module(flat)), (lambda: module(flat))
    return (lambda: module(x)), (lambda: module(x))


def _cudnn_path(layer: Layer, x: torch.Tensor, res: Optional[torch.Tensor]) -> str:
    """Which path the `cudnn` backend runs for this chain: "fused", or why conv + epilogue."""
    from ..backends import cudnn
    conv, _ = layer.modules
    w = conv.weight.detach().contiguous(memory_format=torch.channels_last)
    why = cudnn.fallback_reason(x, w, res, conv.stride, conv.padding, conv.dilation, conv.groups,
                                layer.relu)
    return f"conv+epilogue: {why}" if why else "fused"


def run_profile(arch: str = "resnet50", batch: int = 1, dtype: str = "fp16",
                device: Optional[str] = None, size: int = 224, backend: str = "auto",
                min_time_s: Optional[float] = None, peak: bool = True,
                progress: bool = False, seed: int = 0,
                compare: Sequence[str] = ()) -> Dict[str, Any]:
    """`compare`: backends whose fused chain is timed too, per conv layer (`<name>` columns)."""
    import torchvision

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = cli.DTYPES[dtype]
    if min_time_s is None:
        min_time_s = 0.1 if dev.type == "cuda" else 0.2
    concrete = backends.resolve(dev, backend, dt)
    unavailable = {n: backends.unavailable_reason(n, dev) for n in compare}
    runnable = [n for n in compare if unavailable[n] is None]
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)().eval().to(device=dev, dtype=dt)
    specs = layers(model, (batch, 3, size, size))
    peak_tflops, peak_how = measured_peak_tflops(dev, dt) if peak else (None, "not measured")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    with torch.inference_mode(), backends.backend(backend):
        for i, layer in enumerate(specs):
            x = torch.randn(layer.in_shape, generator=gen).to(device=dev, dtype=dt)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            res = None
            if layer.residual:
                res = torch.randn(layer.out_shape, generator=gen).to(device=dev, dtype=dt)
                res = res.contiguous(memory_format=torch.channels_last)
            stock, fused = _layer_fns(layer, x, res)
            if dev.type == "cuda":
                stock_ms = time_ms(stock, dev, min_time_s)
                fused_ms = time_ms(fused, dev, min_time_s)
            else:  # alternate the two, so that load from other processes hits both alike
                ts, tf = interleaved([(stock, None), (fused, None)], 1, 3, 1000, min_time_s)
                stock_ms, fused_ms = quantile(ts, 0.5), quantile(tf, 0.5)
            compared: Dict[str, Optional[float]] = {n: None for n in compare}
            if layer.kind == "conv_bn_act":
                for name in runnable:
                    with backends.backend(name):
                        compared[name] = (time_ms(fused, dev, min_time_s) if dev.type == "cuda"
                                          else quantile(interleaved([(fused, None)], 1, 3, 1000,
                                                                    min_time_s)[0], 0.5))
            flops = 2 * layer.macs
            row = {"name": layer.name, "kind": layer.kind, "in_shape": list(layer.in_shape),
                   "out_shape": list(layer.out_shape),
                   "weight_shape": list(layer.weight_shape), "stride": list(layer.stride),
                   "groups": layer.groups, "relu": layer.relu, "residual": layer.residual,
                   "macs": layer.macs, "macs_per_image": layer.macs // batch,
                   "min_bytes": layer.min_bytes(x.element_size()),
                   "stock_ms": stock_ms, "fused_ms": fused_ms, "compare_ms": compared,
                   "speedup": stock_ms / fused_ms if fused_ms > 0 else None,
                   "fused_tflops": flops / (fused_ms * 1e-3) / 1e12 if fused_ms > 0 else None,
                   "fused_gbps": layer.min_bytes(x.element_size()) / (fused_ms * 1e-3) / 1e9
                   if fused_ms > 0 else None}
            if "cudnn" in runnable and layer.kind == "conv_bn_act":
                row["cudnn_path"] = _cudnn_path(layer, x, res)
            row["pct_of_peak"] = (100 * row["fused_tflops"] / peak_tflops
                                  if peak_tflops and row["fused_tflops"] is not None and flops
                                  else None)
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(specs)}] {layer.name}: stock {stock_ms:.3f} ms, fused "
                      f"{fused_ms:.3f} ms ({time.perf_counter() - t_start:.0f} s)", flush=True,
                      file=sys.stderr)
    total_macs = sum(r["macs"] for r in rows)
    stock_total = sum(r["stock_ms"] for r in rows)
    fused_total = sum(r["fused_ms"] for r in rows)
    return {
        "arch": arch, "batch": batch, "dtype": dtype, "image_size": size,
        "device": dev.type, "device_name": device_name(dev), "versions": versions(),
        "backend": backend, "backend_resolved": concrete,
        "compare": list(compare),
        "compare_unavailable": {n: r for n, r in unavailable.items() if r},
        "layout": "channels_last activations for stock and fused",
        "timing": ("triton.testing.do_bench median (L2 flushed) or CUDA events"
                   if dev.type == "cuda" else
                   "time.perf_counter median, stock and fused calls alternated"),
        "peak_tflops": peak_tflops, "peak_measured_as": peak_how,
        "total_macs": total_macs // batch,
        "total_macs_is": "multiply-adds per image (convs + fc, as torchvision's published "
                         "figures); the whole batch is total_macs_batch",
        "total_macs_batch": total_macs,
        "stock_ms_total": stock_total, "fused_ms_total": fused_total,
        "speedup_total": stock_total / fused_total if fused_total > 0 else None,
        "fused_tflops_total": 2 * total_macs / (fused_total * 1e-3) / 1e12
        if fused_total > 0 else None,
        "layers": rows,
    }


def format_table(report: Dict[str, Any]) -> str:
    def shape(s):
        return "x".join(map(str, s))

    peak = report["peak_tflops"]
    lines = [f"{report['arch']} batch {report['batch']} {report['dtype']} "
             f"{report['image_size']}x{report['image_size']} on {report['device']}: "
             f"{report['device_name']}; backend {report['backend']} -> "
             f"{report['backend_resolved']}; torch {report['versions']['torch']}",
             f"peak {peak:.2f} TFLOP/s measured ({report['peak_measured_as']})" if peak else
             "peak not measured",
             f"{'layer':22} {'in -> out':36} {'MACs (M)':>9} {'stock ms':>9} {'fused ms':>9} "
             f"{'speed-up':>8} {'TFLOP/s':>8} {'% peak':>7}"
             + "".join(f" {n + ' ms':>10}" for n in report.get("compare", []))]
    for r in report["layers"]:
        io = f"{shape(r['in_shape'])} -> {shape(r['out_shape'])}"
        pct = (f"{'-':>7}" if r["pct_of_peak"] is None else
               f"{'>100%':>7}" if r["pct_of_peak"] > 100 else f"{r['pct_of_peak']:6.1f}%")
        tf = f"{r['fused_tflops']:8.3f}" if r["macs"] else f"{'-':>8}"
        extra = "".join(f" {'-':>10}" if v is None else f" {v:10.3f}"
                        for v in r.get("compare_ms", {}).values())
        path = f"  cudnn: {r['cudnn_path']}" if "cudnn_path" in r else ""
        lines.append(f"{r['name']:22} {io[:36]:36} {r['macs'] / 1e6:9.1f} {r['stock_ms']:9.3f} "
                     f"{r['fused_ms']:9.3f} {r['speedup']:7.2f}x {tf} {pct}{extra}{path}")
    tot_tf = report["fused_tflops_total"]
    pct = (f"{'-':>7}" if not (peak and tot_tf) else
           f"{'>100%':>7}" if tot_tf > peak else f"{100 * tot_tf / peak:6.1f}%")
    lines.append(f"{'total':22} {'':36} {report['total_macs_batch'] / 1e6:9.1f} "
                 f"{report['stock_ms_total']:9.3f} {report['fused_ms_total']:9.3f} "
                 f"{report['speedup_total']:7.2f}x {tot_tf:8.3f} {pct}")
    lines.append(f"multiply-adds: {report['total_macs'] / 1e9:.3f} G per image, "
                 f"{report['total_macs_batch'] / 1e9:.3f} G for the batch (convs + fc); "
                 "times are per layer in isolation, summed")
    for name, why in report.get("compare_unavailable", {}).items():
        lines.append(f"{name}: not timed ({why})")
    return "\n".join(lines)


def _backend_list(value: str) -> List[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in backends.NAMES[1:]:
            raise argparse.ArgumentTypeError(f"unknown backend {n!r}; expected some of "
                                             f"{', '.join(backends.NAMES[1:])}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arch(p, default="resnet50")
    p.add_argument("--batch", type=cli.positive_int, default=1)
    p.add_argument("--dtype", choices=sorted(cli.DTYPES), default=None,
                   help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--device", type=cli.device, default=None)
    p.add_argument("--size", type=cli.positive_int, default=224)
    p.add_argument("--backend", default="auto", choices=backends.NAMES)
    p.add_argument("--compare", type=_backend_list, default=[],
                   metavar="NAMES", help="comma list of backends also timed per conv layer "
                   "(e.g. triton,cuda,cudnn on cuda); with cudnn, which path it runs per layer")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per layer and side (0.1 on cuda, 0.2 on cpu)")
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--no-peak", action="store_true", help="skip the peak matmul measurement")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if dev == "cuda" else "fp32")
    report = run_profile(args.arch, args.batch, dtype, dev, args.size, args.backend,
                         args.min_time, peak=not args.no_peak, progress=not args.quiet,
                         compare=args.compare)
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


__all__ = ["run_profile", "format_table"]
