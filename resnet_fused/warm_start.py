"""A cold start done ahead of time: `resnet_fused.warmup(model, input_shapes, dtypes)` (its
command line, `python -m resnet_fused warmup --arch resnet50 --batch 1 256 --dtype fp16`, is
tools/warmup.py).

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

import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import backends
from .walk import layers

Shape = Tuple[Union[int, range], int, int, int]
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernel runs


def covering_batches(lo: int, hi: int) -> List[int]:
    """Batch sizes whose buckets cover every batch size in [lo, hi], for every layer: the bucket
    of n * P is monotone in n and doubles with n, so for n between 2^k and 2^(k+1) it is the
    bucket of 2^k * P or of 2^(k+1) * P."""
    if not 1 <= lo <= hi:
        raise ValueError(f"warmup: expected a batch range 1 <= lo <= hi, got {lo}..{hi}")
    powers = {1 << k for k in range(hi.bit_length()) if lo <= 1 << k <= hi}
    return sorted(powers | {lo, hi})


def batch_sizes(first: Union[int, range]) -> List[int]:
    """The batch sizes to warm for one batch entry: itself, or a range's covering batches."""
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
    """(walk.Layer, dtype) for every distinct conv_bn_act problem of the fused forward."""
    seen: Dict[Tuple, Tuple[Any, torch.dtype]] = {}
    for shape in input_shapes:
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(f"warmup: expected input shapes (N, C, H, W), got {shape}")
        for n in batch_sizes(shape[0]):
            for layer in layers(model, (n, *shape[1:])):
                if layer.kind != "conv_bn_act":
                    continue
                for dtype in dtypes:
                    seen.setdefault((layer.problem, dtype), (layer, dtype))
    return list(seen.values())


def layer_kernel_args(layer, dtype: torch.dtype, make=_meta) -> Dict:
    """conv.kernel_args for a walk.Layer, on tensors made by `make(shape, dtype)` (default: meta,
    channels_last, as the fused model hands them to the kernel)."""
    from .backends.triton import conv
    x = make(layer.in_shape, dtype)
    weight = make(layer.weight_shape, dtype)
    scale = torch.empty(layer.out_shape[1], device=x.device)
    res = make(layer.out_shape, dtype) if layer.residual else None
    out = make(layer.out_shape, dtype)
    return conv.kernel_args(x, weight, scale, scale, res, out, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.relu, interpret=False)


def compile_jobs(found, capability: int, sms: Optional[int] = None) -> List:
    """aot.Job for every tuning candidate of every problem, for sm_`capability` with `sms`
    SMs (default: the family's reference GPU; split-K candidates depend on it)."""
    from .backends.triton import aot, conv
    family = conv.arch_family(divmod(capability, 10))
    sms = sms or conv.FAMILY_SMS[family]
    jobs = []
    for layer, dtype in found:
        args = layer_kernel_args(layer, dtype)
        for config in conv.candidates(family, dtype, args["M"], args["C_out"], sms, args):
            jobs += aot.jobs(args, config, capability)
    return jobs


def _random(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)


def _tune(found, device: torch.device, backend: str) -> None:
    """Run each problem once through `backend` (triton, or auto's per-layer triton-or-cuda):
    tile and per-layer decisions get made (measured per bucket) and persisted."""
    runner = backends.load(backend)
    for layer, dtype in found:
        x, weight = _random(layer.in_shape, dtype, device), _random(layer.weight_shape, dtype,
                                                                    device)
        scale = torch.rand(layer.out_shape[1], device=device) + 0.5
        shift = torch.randn(layer.out_shape[1], device=device)
        res = _random(layer.out_shape, dtype, device) if layer.residual else None
        runner.run(runner.prepare(weight, scale, shift), x, res, layer.stride, layer.padding,
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
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"warmup: expected dtypes among float16, bfloat16, float32 (the "
                             f"Triton kernel's), got {dtype}")
    device = param.device
    report: Dict[str, Any] = {"device": str(device), "dtypes": [str(d)[6:] for d in dtypes]}
    if device.type == "cuda":
        backend = backends.resolve(device)
        if backend not in ("triton", backends.PER_LAYER):
            report["skipped"] = f"the backend that runs on {device} is {backend!r}, not triton"
            return report
        major, minor = torch.cuda.get_device_capability(device)
        target = major * 10 + minor
    elif target is None:
        report["skipped"] = ("nothing to compile on a CPU model (the CPU backends need no "
                             "warm-up); pass target=90 to compile for sm_90 without a GPU")
        return report
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else None)
    start = time.perf_counter()
    found = problems(model, input_shapes, dtypes)
    jobs = compile_jobs(found, int(target), sms)
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
            _tune(found, device, backend)
        model.train(was_training)
        report["tune_seconds"] = time.perf_counter() - start
    return report
