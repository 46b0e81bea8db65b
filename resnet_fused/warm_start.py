"""A cold start done ahead of time: `resnet_fused.warmup(model, input_shapes, dtypes)` and
`python -m resnet_fused warmup --arch resnet50 --batch 1 256 --dtype fp16`.

1. The conv problems of the model's fused forward for those input shapes, found by walking the
   model (no forward runs).
2. Every tuning candidate of every problem compiled in parallel worker processes, one per core
   (compilation is CPU-bound); the kernels land in Triton's on-disk cache under the key the JIT
   looks up (backends/triton/aot.py).
3. On a GPU, each problem run once through the backend: that times the candidates and, under
   `auto`, Triton against cuDNN, once per shape bucket, and persists the decisions
   (resnet_fused/tuning.py), so the next process starts warm.

A batch entry may be a range: `range(1, 65)` (CLI: `1-64`) warms the batch sizes that cover
every bucket of every layer in it (the powers of two inside, and both ends), so no batch size in
the range is ever timed or compiled at run time. Without a GPU, `target` (CLI `--target sm_90`)
does steps 1-2 only, for that architecture.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import backends

Shape = Tuple[Union[int, range], int, int, int]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def covering_batches(lo: int, hi: int) -> List[int]:
    """Batch sizes whose buckets cover every batch size in [lo, hi], for every layer: the bucket
    of n * P is monotone in n and doubles with n, so for n between 2^k and 2^(k+1) it is the
    bucket of 2^k * P or of 2^(k+1) * P."""
    if not 1 <= lo <= hi:
        raise ValueError(f"warmup: expected a batch range 1 <= lo <= hi, got {lo}..{hi}")
    powers = {1 << k for k in range(hi.bit_length()) if lo <= 1 << k <= hi}
    return sorted(powers | {lo, hi})


def _batches(first: Union[int, range]) -> List[int]:
    if isinstance(first, range):
        if len(first) == 0 or first.step != 1:
            raise ValueError(f"warmup: expected a non-empty range of batch sizes with step 1, got "
                             f"{first}")
        return covering_batches(first[0], first[-1])
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"warmup: expected a batch size >= 1 or a range, got {first!r}")
    return [first]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not all(
            hasattr(model, name) for name in ("conv1", "bn1", "maxpool", "layer1", "layer2",
                                              "layer3", "layer4", "fc")):
        raise TypeError(f"warmup: expected a ResNet with torchvision's structure (conv1, bn1, "
                        f"layer1..layer4, fc), e.g. resnet_fused.resnet50(), got "
                        f"{type(model).__name__}")


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(
        memory_format=torch.channels_last)


def problems(model: nn.Module, input_shapes: Iterable[Shape],
             dtypes: Sequence[torch.dtype]) -> List[Tuple[Any, torch.dtype]]:
    """(profile.Layer, dtype) for every distinct conv_bn_act problem of the fused forward."""
    from .profile import layers
    seen: Dict[Tuple, Tuple[Any, torch.dtype]] = {}
    for shape in input_shapes:
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(f"warmup: expected input shapes (N, C, H, W), got {shape}")
        for n in _batches(shape[0]):
            for layer in layers(model, (n, *shape[1:])):
                if layer.kind != "conv_bn_act":
                    continue
                for dtype in dtypes:
                    key = (layer.in_shape, layer.weight_shape, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.relu, layer.residual, dtype)
                    seen.setdefault(key, (layer, dtype))
    return list(seen.values())


def _kernel_args(layer, dtype: torch.dtype, make) -> Dict:
    from .backends.triton import conv
    x = make(layer.in_shape, dtype)
    weight = make(layer.weight_shape, dtype)
    scale = torch.empty(layer.out_shape[1], device=x.device)
    res = make(layer.out_shape, dtype) if layer.residual else None
    out = make(layer.out_shape, dtype)
    return conv.kernel_args(x, weight, scale, scale, res, out, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.relu, interpret=False)


def compile_jobs(found, capability: int) -> List:
    """aot.Job for every tuning candidate of every problem, for sm_`capability`."""
    from .backends.triton import aot, conv
    family = conv.arch_family(divmod(capability, 10))
    jobs = []
    for layer, dtype in found:
        args = _kernel_args(layer, dtype, _meta)
        for config in conv.candidates(family, dtype, args["M"], args["C_out"]):
            jobs += aot.jobs(args, config, capability)
    return jobs


def _random(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)


def _tune(found, device: torch.device) -> None:
    """Run each problem once through the triton backend: tile and per-layer decisions get made
    (measured per bucket) and persisted."""
    triton_backend = backends.load("triton")
    for layer, dtype in found:
        x, weight = _random(layer.in_shape, dtype, device), _random(layer.weight_shape, dtype,
                                                                    device)
        scale = torch.rand(layer.out_shape[1], device=device) + 0.5
        shift = torch.randn(layer.out_shape[1], device=device)
        res = _random(layer.out_shape, dtype, device) if layer.residual else None
        triton_backend.conv_bn_act(x, weight, scale, shift, res, layer.stride, layer.padding,
                                   layer.dilation, layer.groups, layer.relu)
        del x, weight, res
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup(model: nn.Module, input_shapes: Iterable[Shape],
           dtypes: Optional[Sequence[torch.dtype]] = None, *, workers: Optional[int] = None,
           target: Optional[int] = None) -> Dict[str, Any]:
    """Compile and tune ahead of time everything the fused forward of `model` needs for
    `input_shapes` (batch entry: an int or a range) in `dtypes` (default: the model's dtype; give
    the autocast dtype for autocast). `workers`: compile processes (default one per core).
    `target`: compute capability to compile for without a GPU (e.g. 90); on a CUDA model the
    model's GPU. Returns a report (problems, jobs, seconds per phase, errors)."""
    _check_model(model)
    param = model.conv1.weight
    dtypes = list(dtypes) if dtypes is not None else [param.dtype]
    for dtype in dtypes:
        if dtype not in _DTYPES.values():
            raise ValueError(f"warmup: expected dtypes among float16, bfloat16, float32 (the "
                             f"Triton kernel's), got {dtype}")
    device = param.device
    report: Dict[str, Any] = {"device": str(device), "dtypes": [str(d)[6:] for d in dtypes]}
    if device.type == "cuda":
        backend = backends.resolve(device)
        if backend != "triton":
            report["skipped"] = f"the backend that runs on {device} is {backend!r}, not triton"
            return report
        major, minor = torch.cuda.get_device_capability(device)
        target = major * 10 + minor
    elif target is None:
        report["skipped"] = ("nothing to compile on a CPU model (the CPU backends need no "
                             "warm-up); pass target=90 to compile for sm_90 without a GPU")
        return report
    start = time.perf_counter()
    found = problems(model, input_shapes, dtypes)
    jobs = compile_jobs(found, int(target))
    report.update(problems=len(found), target=f"sm_{target}",
                  plan_seconds=time.perf_counter() - start)
    from .backends.triton import aot
    compiled = aot.compile_all(jobs, workers)
    report.update(jobs=compiled["jobs"], workers=compiled["workers"],
                  in_process=compiled["in_process"], compile_seconds=compiled["seconds"],
                  errors=compiled["errors"])
    if device.type == "cuda":
        start = time.perf_counter()
        was_training = model.training
        with torch.no_grad(), torch.cuda.device(device):
            _tune(found, device)
        model.train(was_training)
        report["tune_seconds"] = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------ CLI -----
def _batch_arg(text: str) -> Union[int, range]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return range(lo, hi + 1)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size (8) or a range (1-64), got "
                                         f"{text!r}") from None


def _target_arg(text: str) -> int:
    digits = text.lower().removeprefix("sm_").removeprefix("sm")
    if not digits.isdigit() or int(digits) < 80:
        raise argparse.ArgumentTypeError(f"expected a CUDA architecture such as sm_90 or sm_80 "
                                         f"(the kernels need 8.0+), got {text!r}")
    return int(digits)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import cli
    cli.add_arch(p, default="resnet50")
    p.add_argument("--batch", nargs="+", type=_batch_arg, default=[1],
                   help="batch sizes and ranges (1 256, or 1-64)")
    p.add_argument("--size", type=cli.positive_int, default=224,
                   help="image height and width (default 224)")
    p.add_argument("--dtype", nargs="+", choices=list(_DTYPES), default=["fp16"])
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="compile processes (default: cores)")
    p.add_argument("--target", type=_target_arg, default=None,
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
    dtypes = [_DTYPES[d] for d in args.dtype]
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
                for n in _batches(b):
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
