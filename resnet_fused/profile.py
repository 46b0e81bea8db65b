"""`python -m resnet_fused profile`: where the time goes, layer by layer, stock vs fused.

Layers are the units the fused model runs: every conv -> BN (-> + residual) (-> ReLU) chain (one
`conv_bn_act` call), plus maxpool, avgpool and fc. For each layer it reports the input/output
shape, multiply-adds, the stock time (torchvision's own modules: conv, BN, add, ReLU as separate
ops), the fused time (one conv_bn_act on the folded weights, selected backend), the speed-up, the
achieved TFLOP/s of the fused op (2 FLOP per multiply-add) and its share of the device's peak,
measured here as a large matrix product in the same dtype.

Both sides get channels_last activations (what the fused model uses), so the difference is the
fusion, not the layout. Layers are timed one by one on random inputs of the right shape; on CUDA
with triton.testing.do_bench (L2 flushed between calls) when triton is importable, else CUDA
events; on CPU with time.perf_counter, stock and fused calls alternated.

Multiply-adds count convolutions and the fc layer only, like torchvision's published figures
(resnet50: 4.089 G per 224x224 image); BN, ReLU, residual adds and pooling are not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, cli
from .ops import out_hw

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


@dataclass
class Layer:
    """One unit of the fused model's eval forward. Shapes are per batch (N first)."""
    name: str
    kind: str                                  # conv_bn_act | maxpool | avgpool | linear
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    macs: int                                  # multiply-adds for the whole batch
    weight_shape: Tuple[int, ...] = ()
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    relu: bool = False
    residual: bool = False
    modules: Tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)

    def min_bytes(self, element_size: int) -> int:
        """Fewest bytes a kernel must move: each input read once, the output written once."""
        n = math.prod(self.in_shape) + math.prod(self.out_shape) + math.prod(self.weight_shape)
        if self.residual:
            n += math.prod(self.out_shape)
        extra = 0
        if self.kind == "conv_bn_act":
            extra = 2 * self.out_shape[1] * 4  # fp32 scale and shift
        return n * element_size + extra


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_out(shape, conv: nn.Conv2d) -> Tuple[int, ...]:
    n, _, h, w = shape
    return (n, conv.out_channels, *out_hw(h, w, _pair(conv.kernel_size), _pair(conv.stride),
                                          _pair(conv.padding), _pair(conv.dilation)))


def _conv_layer(name, conv: nn.Conv2d, bn: nn.Module, shape, relu: bool,
                residual: bool) -> Layer:
    out = _conv_out(shape, conv)
    kh, kw = _pair(conv.kernel_size)
    macs = math.prod(out) * (conv.in_channels // conv.groups) * kh * kw
    return Layer(name, "conv_bn_act", tuple(shape), out, macs, tuple(conv.weight.shape),
                 _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), conv.groups,
                 relu, residual, (conv, bn))


def _pool_out(shape, pool: nn.MaxPool2d) -> Tuple[int, ...]:
    n, c, h, w = shape
    k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    d = _pair(pool.dilation)
    dims = []
    for size, kk, ss, pp, dd in zip((h, w), k, s, p, d):
        num = size + 2 * pp - dd * (kk - 1) - 1
        o = (num + (ss - 1 if pool.ceil_mode else 0)) // ss + 1
        if pool.ceil_mode and (o - 1) * ss >= size + pp:
            o -= 1
        dims.append(o)
    return (n, c, *dims)


def layers(model: nn.Module, input_shape: Tuple[int, int, int, int]) -> List[Layer]:
    """The fused-forward layers of a torchvision-structured ResNet, shapes propagated analytically
    (no forward is run, so `model` may live on the meta device)."""
    shape = tuple(input_shape)
    out: List[Layer] = []
    stem = _conv_layer("conv1", model.conv1, model.bn1, shape, relu=True, residual=False)
    out.append(stem)
    shape = _pool_out(stem.out_shape, model.maxpool)
    out.append(Layer("maxpool", "maxpool", stem.out_shape, shape, 0, modules=(model.maxpool,)))
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, lname)):
            prefix = f"{lname}.{i}"
            block_in = shape
            convs = [("conv1", "bn1"), ("conv2", "bn2")]
            if hasattr(block, "conv3"):
                convs.append(("conv3", "bn3"))
            if block.downsample is not None:
                ds = block.downsample
                out.append(_conv_layer(f"{prefix}.downsample", ds[0], ds[1], block_in,
                                       relu=False, residual=False))
            for j, (c, b) in enumerate(convs):
                last = j == len(convs) - 1
                layer = _conv_layer(f"{prefix}.{c}", getattr(block, c), getattr(block, b), shape,
                                    relu=True, residual=last)
                out.append(layer)
                shape = layer.out_shape
    n, c = shape[:2]
    out.append(Layer("avgpool", "avgpool", shape, (n, c, 1, 1), 0, modules=(model.avgpool,)))
    fc = model.fc
    out.append(Layer("fc", "linear", (n, fc.in_features), (n, fc.out_features),
                     n * fc.in_features * fc.out_features, tuple(fc.weight.shape),
                     modules=(fc,)))
    return out


def _meta_model(arch: str) -> nn.Module:
    import torchvision
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def count_macs(arch_or_model: Union[str, nn.Module], image_size: Union[int, Tuple[int, int]] = 224
               ) -> int:
    """Multiply-adds for ONE image (convs + fc, as torchvision's published figures)."""
    model = _meta_model(arch_or_model) if isinstance(arch_or_model, str) else arch_or_model
    h, w = _pair(image_size)
    return sum(layer.macs for layer in layers(model, (1, 3, h, w)))


# ------------------------------------------------------------------------------ timing -----
def time_ms(fn: Callable[[], Any], device: torch.device, min_time_s: float,
            min_reps: int = 3) -> float:
    """Median ms of fn(): do_bench on CUDA if triton imports, else CUDA events / perf_counter."""
    from .bench import measure, quantile
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:  # triton missing or broken: CUDA events below
            do_bench = None
        if do_bench is not None:
            warmup, rep = max(5, int(min_time_s * 250)), max(20, int(min_time_s * 1000))
            try:
                return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
            except TypeError:  # an older triton without return_mode
                return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])
    times = measure(fn, device, warmup=1, min_reps=min_reps, max_reps=1000,
                    min_time_s=min_time_s)
    return quantile(times, 0.5)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> Tuple[float, str]:
    """The device's peak as measured here: one large square matmul in `dtype` (on CUDA the
    do_bench median; on CPU the fastest of several calls, less sensitive to other load)."""
    n = 8192 if device.type == "cuda" else 2048
    if dtype == torch.float64 and device.type == "cuda":
        n = 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    note = ""
    if device.type == "cuda" and dtype == torch.float32:
        # cuDNN convs use TF32 when torch.backends.cudnn.allow_tf32 (default True): match it.
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        note = ", TF32" if torch.backends.cudnn.allow_tf32 else ", no TF32"
        try:
            ms = time_ms(lambda: a @ b, device, 0.3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    elif device.type == "cuda":
        ms = time_ms(lambda: a @ b, device, 0.3)
    else:
        from .bench import measure
        ms = min(measure(lambda: a @ b, device, warmup=1, min_reps=5, max_reps=20,
                         min_time_s=1.0))
    how = "median" if device.type == "cuda" else "fastest of >= 5"
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, f"{n}x{n}x{n} matmul, {str(dtype)[6:]}{note}, {how}"


def _layer_fns(layer: Layer, x: torch.Tensor, res: Optional[torch.Tensor],
               backend: str) -> Tuple[Callable[[], Any], Callable[[], Any]]:
    """(stock, fused) zero-argument callables for one layer."""
    from .fold import fold
    from .ops import conv_bn_act

    if layer.kind == "conv_bn_act":
        conv, bn = layer.modules

        def stock():
            y = bn(conv(x))
            if res is not None:
                y = y + res
            return F.relu(y) if layer.relu else y

        weight, scale, shift = fold(conv, bn, x.dtype, backend)

        def fused():  # the caller has selected `backend`
            return conv_bn_act(x, weight, scale, shift, residual=res, stride=layer.stride,
                               padding=layer.padding, dilation=layer.dilation,
                               groups=layer.groups, relu=layer.relu)
        return stock, fused
    module = layer.modules[0]
    if layer.kind == "linear":
        flat = x.flatten(1)
        return (lambda: module(flat)), (lambda: module(flat))
    return (lambda: module(x)), (lambda: module(x))


def run_profile(arch: str = "resnet50", batch: int = 1, dtype: str = "fp16",
                device: Optional[str] = None, size: int = 224, backend: str = "auto",
                min_time_s: Optional[float] = None, peak: bool = True,
                progress: bool = False, seed: int = 0) -> Dict[str, Any]:
    import torchvision

    from .bench import device_name, versions

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = DTYPES[dtype]
    if min_time_s is None:
        min_time_s = 0.1 if dev.type == "cuda" else 0.2
    concrete = backends.resolve(dev, backend)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)().eval().to(device=dev, dtype=dt)
    specs = layers(model, (batch, 3, size, size))
    peak_tflops, peak_how = measured_peak_tflops(dev, dt) if peak else (None, "not measured")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    with torch.inference_mode(), backends.backend(concrete):
        for i, layer in enumerate(specs):
            x = torch.randn(layer.in_shape, generator=gen).to(device=dev, dtype=dt)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            res = None
            if layer.residual:
                res = torch.randn(layer.out_shape, generator=gen).to(device=dev, dtype=dt)
                res = res.contiguous(memory_format=torch.channels_last)
            stock, fused = _layer_fns(layer, x, res, concrete)
            if dev.type == "cuda":
                stock_ms = time_ms(stock, dev, min_time_s)
                fused_ms = time_ms(fused, dev, min_time_s)
            else:  # alternate the two, so that load from other processes hits both alike
                from .bench import _interleaved, quantile
                ts, tf = _interleaved([(stock, None), (fused, None)], 1, 3, 1000, min_time_s)
                stock_ms, fused_ms = quantile(ts, 0.5), quantile(tf, 0.5)
            flops = 2 * layer.macs
            row = {"name": layer.name, "kind": layer.kind, "in_shape": list(layer.in_shape),
                   "out_shape": list(layer.out_shape),
                   "weight_shape": list(layer.weight_shape), "stride": list(layer.stride),
                   "groups": layer.groups, "relu": layer.relu, "residual": layer.residual,
                   "macs": layer.macs, "macs_per_image": layer.macs // batch,
                   "min_bytes": layer.min_bytes(x.element_size()),
                   "stock_ms": stock_ms, "fused_ms": fused_ms,
                   "speedup": stock_ms / fused_ms if fused_ms > 0 else None,
                   "fused_tflops": flops / (fused_ms * 1e-3) / 1e12 if fused_ms > 0 else None,
                   "fused_gbps": layer.min_bytes(x.element_size()) / (fused_ms * 1e-3) / 1e9
                   if fused_ms > 0 else None}
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
             f"{'speed-up':>8} {'TFLOP/s':>8} {'% peak':>7}"]
    for r in report["layers"]:
        io = f"{shape(r['in_shape'])} -> {shape(r['out_shape'])}"
        pct = f"{r['pct_of_peak']:6.1f}%" if r["pct_of_peak"] is not None else f"{'-':>7}"
        tf = f"{r['fused_tflops']:8.3f}" if r["macs"] else f"{'-':>8}"
        lines.append(f"{r['name']:22} {io[:36]:36} {r['macs'] / 1e6:9.1f} {r['stock_ms']:9.3f} "
                     f"{r['fused_ms']:9.3f} {r['speedup']:7.2f}x {tf} {pct}")
    tot_tf = report["fused_tflops_total"]
    pct = f"{100 * tot_tf / peak:6.1f}%" if peak and tot_tf else f"{'-':>7}"
    lines.append(f"{'total':22} {'':36} {report['total_macs_batch'] / 1e6:9.1f} "
                 f"{report['stock_ms_total']:9.3f} {report['fused_ms_total']:9.3f} "
                 f"{report['speedup_total']:7.2f}x {tot_tf:8.3f} {pct}")
    lines.append(f"multiply-adds: {report['total_macs'] / 1e9:.3f} G per image, "
                 f"{report['total_macs_batch'] / 1e9:.3f} G for the batch (convs + fc); "
                 "times are per layer in isolation, summed")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arch(p, default="resnet50")
    p.add_argument("--batch", type=cli.positive_int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--device", type=cli.device, default=None)
    p.add_argument("--size", type=cli.positive_int, default=224)
    p.add_argument("--backend", default="auto", choices=backends.NAMES)
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
                         args.min_time, peak=not args.no_peak, progress=not args.quiet)
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


__all__ = ["Layer", "layers", "count_macs", "run_profile", "format_table",
           "measured_peak_tflops"]
