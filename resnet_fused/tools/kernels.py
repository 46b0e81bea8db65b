"""`python -m resnet_fused kernels --target sm_90 --arch resnet50 --batch 1 256 --dtype fp16
--json PATH`: the static report of the Triton conv kernel, no GPU needed.

For every conv layer of the model at each batch size and every tuning candidate of it, the kernel
is compiled for the target (in parallel, through Triton's cache: backends/triton/aot.py) and read
back (backends/triton/sass.py). One row per (layer problem, batch, candidate): config (tile,
warps, stages, split-K), registers, spill bytes, shared memory, MMA kind, TMA, SASS instructions
per main-loop (K) iteration per warp, CTAs launched, CTAs per SM (registers, shared memory and
warps allow) and waves on the target's SMs, and the layer's roofline time at the target's peak
(bytes each tensor must move once vs tensor-core FLOPs; the peaks are in TARGETS). Layers with
the same problem (shapes, geometry, epilogue) share a row and list every name.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Dict, List, NamedTuple, Sequence

import torch

from ..warm_start import KERNEL_DTYPES, layer_kernel_args
from . import cli

DTYPES = cli.dtype_names(KERNEL_DTYPES)


class Target(NamedTuple):
    name: str
    smem_per_sm: int           # bytes of shared memory per SM usable by CTAs
    regs_per_sm: int
    max_warps_per_sm: int
    hbm_bytes_per_s: float     # the datasheet's memory bandwidth
    tflops: Dict[str, float]   # sustained tensor-core rate per operand dtype


# H100 SXM and A100 SXM 80 GB. Tensor rates are what a well-tuned dense GEMM sustains (about 80%
# of the datasheet's dense figure: 989 / 312 TFLOP/s fp16), fp32 as 3xTF32 (three TF32 MMAs).
TARGETS = {
    90: Target("sm_90", 233472, 65536, 64, 3.35e12,
               {"fp16": 790.0, "bf16": 790.0, "fp32": 395.0 / 3}),
    80: Target("sm_80", 167936, 65536, 64, 2.039e12,
               {"fp16": 250.0, "bf16": 250.0, "fp32": 125.0 / 3}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arch(p, default="resnet50")
    p.add_argument("--target", type=cli.cuda_target, default=90, help="sm_90 (default) or sm_80")
    p.add_argument("--batch", nargs="+", type=cli.positive_int, default=[1, 256])
    p.add_argument("--size", type=cli.positive_int, default=224)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="compile processes (default: cores)")
    p.add_argument("--layers", nargs="+", default=(), metavar="PREFIX",
                   help="only the layers whose names start so (conv1 layer4.0)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--markdown", default=None, help="write the table here")


def ctas_per_sm(target: Target, regs: int, warps: int, shared: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (plus
    the 1 KiB the driver reserves per CTA) and warp slots, whichever binds first."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = target.regs_per_sm // (regs_per_warp * warps)
    by_smem = target.smem_per_sm // (shared + 1024)
    return max(0, min(by_regs, by_smem, target.max_warps_per_sm // warps, 32))


def roofline_us(layer, dtype_name: str, target: Target) -> float:
    """The layer's lower bound on the target: each tensor moved once, or its MMAs at the
    sustained tensor-core rate, whichever takes longer."""
    element = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    memory = layer.min_bytes(element) / target.hbm_bytes_per_s
    math_s = 2 * layer.macs / (target.tflops[dtype_name] * 1e12)
    return max(memory, math_s) * 1e6


def _problems(arch: str, batches: Sequence[int], size: int, only: Sequence[str] = ()):
    """[(batch, [layer names], layer)] for every distinct conv problem of each batch (of the
    layers whose names start with one of `only`, if given)."""
    from ..walk import layers, meta_model
    model = meta_model(arch)
    found = []
    for batch in batches:
        names: Dict[tuple, List[str]] = {}   # problem -> the names of its layers
        for layer in layers(model, (batch, 3, size, size)):
            if layer.kind != "conv_bn_act" or (only and not layer.name.startswith(tuple(only))):
                continue
            if layer.problem not in names:
                names[layer.problem] = []
                found.append((batch, names[layer.problem], layer))
            names[layer.problem].append(layer.name)
    return found


def report(arch: str, batches: Sequence[int], dtype_name: str, capability: int,
           size: int = 224, workers=None, only: Sequence[str] = ()) -> Dict[str, Any]:
    from ..backends.triton import aot, conv, sass
    target = TARGETS[capability]
    dtype = DTYPES[dtype_name]
    family = conv.arch_family(divmod(capability, 10))
    sms = conv.FAMILY_SMS[family]
    plan = []
    for batch, names, layer in _problems(arch, batches, size, only):
        args = layer_kernel_args(layer, dtype)
        for config in conv.candidates(family, dtype, args["M"], args["C_out"], sms, args):
            plan.append((batch, names, layer, args, config, aot.jobs(args, config, capability)))
    start = time.perf_counter()
    compiled = aot.compile_all([j for *_, js in plan for j in js], workers)
    rows: List[Dict[str, Any]] = []
    for batch, names, layer, args, config, jobs in plan:
        kernels = [aot.compile_job(j) for j in jobs]     # cache hits now
        main = kernels[0]
        usages = [sass.resource_usage(k.asm["cubin"]) for k in kernels]
        usage = usages[0]
        loop = sass.main_loop(main.asm["cubin"],
                              conv.ceil_div(conv.k_iterations(args, config), config.split_k))
        shared = int(main.metadata.shared)
        ctas = conv.programs(args, config)
        per_sm = ctas_per_sm(target, usage.get("REG", 0), config.warps, shared)
        c_out, cin_g, kh, kw = layer.weight_shape
        rows.append(dict(
            layer=names[0], layers=names, batch=batch,
            M=args["M"], N=c_out, K=cin_g * kh * kw,
            config=config.label, split_k=config.split_k, warps=config.warps, stages=config.stages,
            kernels=len(kernels),
            regs=usage.get("REG"),
            spill_bytes=max(sass.spill_bytes(u) for u in usages),
            shared_bytes=shared, mma=sass.mma_kind(main.asm["ptx"]),
            tma=sass.uses_tma(main.asm["ptx"]),
            loop_instructions=loop.instructions if loop else None,
            loop_mma=loop.mma if loop else None,
            loop_unrolled=loop.unrolled if loop else None,
            ctas=ctas, ctas_per_sm=per_sm,
            waves=round(ctas / (sms * per_sm), 3) if per_sm else None,
            roofline_us=round(roofline_us(layer, dtype_name, target), 2)))
    first = min(batches)
    filled = {r["layer"] for r in rows if r["batch"] == first and r["ctas"] >= sms}
    below = sorted({name for r in rows if r["batch"] == first and r["layer"] not in filled
                    for name in r["layers"]})
    return {
        "target": target.name, "sms": sms, "arch": arch, "dtype": dtype_name,
        "batches": list(batches),
        "size": size, "triton": _triton_version(), "torch": torch.__version__,
        "compile": {"kernels": compiled["jobs"], "workers": compiled["workers"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "errors": compiled["errors"]},
        "rows": rows,
        "summary": {
            "max_spill_bytes": max((r["spill_bytes"] for r in rows), default=0),
            "layers": len({(r["batch"], name) for r in rows for name in r["layers"]}),
            "bs1_layers_below_one_wave": len(below) if first == 1 else None,
            "below_one_wave": below,
            "tma_rows": sum(r["tma"] for r in rows),
            "mma": sorted({r["mma"] for r in rows}),
        },
    }


def _triton_version() -> str:
    import triton
    return triton.__version__


def markdown(rep: Dict[str, Any]) -> str:
    t = TARGETS[int(rep["target"][3:])]
    s = rep["summary"]
    lines = [
        f"# Triton conv kernel: static report, {rep['arch']} {rep['dtype']} for {rep['target']}",
        "",
        f"`python -m resnet_fused kernels --target {rep['target']} --arch {rep['arch']} --batch "
        f"{' '.join(map(str, rep['batches']))} --dtype {rep['dtype']}` (no GPU): triton "
        f"{rep['triton']}, torch {rep['torch']}; {rep['compile']['kernels']} kernels.",
        f"Every candidate config of every conv layer. CTAs/SM from registers, shared memory and "
        f"warps; waves = CTAs / ({rep['sms']} SMs x CTAs/SM); loop = SASS instructions per "
        f"warp per K iteration (MMA instructions among them; u: the compiler unrolled the K "
        f"loop, counted from the first MMA to the last per iteration); roofline = max(bytes / "
        f"{t.hbm_bytes_per_s / 1e12:.2f} TB/s, FLOPs / {t.tflops[rep['dtype']]:.0f} TFLOP/s).",
        "",
        f"Summary: max spill {s['max_spill_bytes']} B; {s['layers']} conv layers per batch size "
        f"summed over the batches; batch-{min(rep['batches'])} layers with no candidate filling "
        f"one wave: {s['bs1_layers_below_one_wave']} {s['below_one_wave'] or ''}; rows with TMA: "
        f"{s['tma_rows']}; MMA kinds: {', '.join(s['mma'])}.",
        "",
        "| batch | layer (x same problem) | M x N x K | config | regs | spill B | shared KiB | "
        "MMA | TMA | loop instr (MMA) | CTAs | CTAs/SM | waves | roofline us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        extra = f" x{len(r['layers'])}" if len(r["layers"]) > 1 else ""
        loop = (f"{r['loop_instructions']} ({r['loop_mma']}){' u' if r['loop_unrolled'] else ''}"
                if r["loop_instructions"] else "-")
        lines.append(
            f"| {r['batch']} | {r['layer']}{extra} | {r['M']}x{r['N']}x{r['K']} | {r['config']} "
            f"| {r['regs']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['mma']} | "
            f"{'yes' if r['tma'] else 'no'} | {loop} | {r['ctas']} | {r['ctas_per_sm']} | "
            f"{r['waves']} | {r['roofline_us']} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    rep = report(args.arch, args.batch, args.dtype, args.target, args.size, args.workers,
                 args.layers)
    text = markdown(rep)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if rep["compile"]["errors"]:
        print("compile errors:\n" + "\n".join(rep["compile"]["errors"]))
        return 1
    return 0
