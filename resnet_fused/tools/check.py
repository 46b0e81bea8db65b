"""`python -m resnet_fused check`: every Triton kernel config on every distinct conv, vs float64.

Tuning only ever checks the config it picks, on the shapes it meets; a config that miscompiles
(Triton has a known class of miscompiles for flattened K loops with 8 warps) would surface as a
wrong answer in some user's model. This sweep runs every config of the candidate list that tuning
could pick for each problem (the same pruning), on every distinct
conv -> BN (-> + residual) (-> ReLU) problem of the given ResNets and batch sizes, each against a
float64 reference under the accuracy rule (resnet_fused/numerics.py), with a NaN planted in the
input (its spread must match stock PyTorch's exactly).

One job is one (dtype, config): its kernels compile once and run on every problem. Jobs run in
worker processes (`--workers`, default one per core, capped by GPU memory): Triton compilation
is CPU-bound, so a 16-core machine compiles the whole candidate set in parallel, and the compiled
kernels land in Triton's on-disk cache, where tuning and the benchmarks find them later.
A worker that crashes (a CUDA error poisons its context) fails its own job only.

On CPU, under TRITON_INTERPRET=1, the same sweep runs in Triton's interpreter (slow: use a small
subset, e.g. `--arch resnet18 --batch 1 --size 32`); CI runs it that way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..walk import layers, meta_model
from ..warm_start import KERNEL_DTYPES
from . import cli

DTYPES = cli.dtype_names(KERNEL_DTYPES)  # the kernel's dtypes: fp16, bf16, fp32
ARCHS = ("resnet18", "resnet50", "resnext50_32x4d")
FAMILIES = ("hopper", "ampere", "interpreter")
# Peak per worker on batch-256 problems: x, its fp64 copy, the fp64 reference chain, stock,
# output (~8-10 GiB; 12 workers without emptying the cache between problems hit 16.5 GiB each
# and ran out of an H200's 140 GiB).
_GPU_BYTES_PER_WORKER = 12 << 30


@dataclasses.dataclass(frozen=True)
class Problem:
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    relu: bool
    residual: bool

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        from ..ops import out_hw
        oh, ow = out_hw(self.h, self.w, (self.kh, self.kw), self.stride, self.padding,
                        self.dilation)
        return (self.n, self.c_out, oh, ow)

    @property
    def m(self) -> int:
        n, _, oh, ow = self.out_shape
        return n * oh * ow

    def __str__(self) -> str:
        s = (f"{self.n}x{self.c_in}x{self.h}x{self.w} -> {self.c_out} {self.kh}x{self.kw}"
             f"/{self.stride[0]}")
        if self.groups > 1:
            s += f" g{self.groups}"
        return s + ("" if self.relu else " no-relu") + (" +res" if self.residual else "")


def problems(archs: Sequence[str], batches: Sequence[int], size: int) -> List[Problem]:
    """The distinct conv_bn_act problems of the fused forward of `archs`, in first-seen order."""
    seen: Dict[Problem, None] = {}
    for arch in archs:
        model = meta_model(arch)
        for batch in batches:
            for layer in layers(model, (batch, 3, size, size)):
                if layer.kind != "conv_bn_act":
                    continue
                n, c_in, h, w = layer.in_shape
                c_out, _, kh, kw = layer.weight_shape
                seen.setdefault(Problem(n, c_in, h, w, c_out, kh, kw, layer.stride,
                                        layer.padding, layer.dilation, layer.groups,
                                        layer.relu, layer.residual))
    return list(seen)


def candidate_configs(family: str, dtype: torch.dtype):
    """The family's base config list for `dtype` (conv.Config); a job is one of them."""
    from ..backends.triton import conv
    return conv.config_tuples(family, dtype)


def config_name(cfg) -> str:
    from ..backends.triton import conv
    return conv.Config(*cfg).label


def kernel_args_for(problem: Problem, dtype: torch.dtype, family: str) -> Dict[str, Any]:
    """conv.kernel_args of the problem on meta tensors, laid out as make_inputs lays them out
    (channels_last)."""
    from ..backends.triton import conv
    cl = dict(device="meta", dtype=dtype, memory_format=torch.channels_last)
    out = torch.empty(problem.out_shape, **cl)
    x = torch.empty(problem.n, problem.c_in, problem.h, problem.w, **cl)
    weight = torch.empty(problem.c_out, problem.c_in // problem.groups, problem.kh, problem.kw,
                         **cl)
    scale = torch.empty(problem.c_out, device="meta")
    return conv.kernel_args(x, weight, scale, scale, out if problem.residual else None, out,
                            problem.stride, problem.padding, problem.dilation, problem.groups,
                            problem.relu, interpret=family == "interpreter")


def variants(problem: Problem, family: str, dtype: torch.dtype, index: int) -> List[Any]:
    """The candidates tuning times for `problem` that derive from base config `index` (itself,
    with fewer stages on short K, the stem's K block, split along K on batch-1 shapes, TMA): the
    same tile and warps."""
    from ..backends.triton import conv
    base = candidate_configs(family, dtype)[index]
    kept = conv.candidates(family, dtype, problem.m, problem.c_out,
                           conv.FAMILY_SMS.get(family), kernel_args_for(problem, dtype, family))
    tile = (base.block_m, base.block_n, base.warps)
    return [c for c in kept if (c.block_m, c.block_n, c.warps) == tile]


def tunable(problem: Problem, family: str, dtype: torch.dtype) -> List[int]:
    """Indices (in the family's config list) of the base configs of the candidates tuning times
    for `problem`."""
    return [i for i in range(len(candidate_configs(family, dtype)))
            if variants(problem, family, dtype, i)]


def make_inputs(p: Problem, dtype: torch.dtype, device: torch.device, seed: int):
    """Random operands of the problem's size (fresh per problem), x channels_last with one NaN."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cin_g = p.c_in // p.groups
    x = torch.randn(p.n, p.c_in, p.h, p.w, generator=g)
    x[0, 0, p.h // 2, p.w // 2] = float("nan")
    weight = torch.randn(p.c_out, cin_g, p.kh, p.kw, generator=g) / (cin_g * p.kh * p.kw) ** 0.5
    scale = torch.rand(p.c_out, generator=g) * 1.5 + 0.25
    shift = torch.randn(p.c_out, generator=g) * 0.5
    res = torch.randn(*p.out_shape, generator=g) if p.residual else None
    cl = torch.channels_last
    to = dict(device=device, dtype=dtype)
    return (x.to(**to).contiguous(memory_format=cl), weight.to(**to).contiguous(memory_format=cl),
            scale.to(device), shift.to(device),
            None if res is None else res.to(**to).contiguous(memory_format=cl))


def stock_and_reference(p: Problem, x, weight, scale, shift, res):
    """(stock result in x's dtype, float64 reference). Stock is what torchvision's op sequence
    computes: the conv rounded to x's dtype, BN/add/ReLU on top."""
    conv_args = (None, p.stride, p.padding, p.dilation, p.groups)

    def chain(y, dtype):
        y = y.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
        if res is not None:
            y = y + res.to(dtype)
        return torch.relu(y) if p.relu else y

    stock = chain(F.conv2d(x, weight, *conv_args), torch.float32).to(x.dtype)
    d = torch.float64
    ref = chain(F.conv2d(x.to(d), weight.to(d), *conv_args), d)
    return stock, ref


def run_job(dtype_name: str, family: str, index: int, todo: Sequence[Problem],
            device: torch.device, emit) -> None:
    """Run config `index` of `family` on each problem of `todo`; emit(row) per problem."""
    from ..backends.triton import conv
    from ..numerics import rule_violation
    dtype = DTYPES[dtype_name]
    for k, (p, cfg) in enumerate((p, c) for p in todo for c in variants(p, family, dtype, index)):
        row: Dict[str, Any] = {"dtype": dtype_name, "family": family, "config": config_name(cfg),
                               "config_index": index, "problem": str(p),
                               "key": repr(dataclasses.astuple(p))}
        t0 = time.perf_counter()
        try:
            x, weight, scale, shift, res = make_inputs(p, dtype, device, seed=k)
            stock, ref = stock_and_reference(p, x, weight, scale, shift, res)
            out = conv.conv_bn_act(x, weight, scale, shift, res, p.stride, p.padding, p.dilation,
                                   p.groups, p.relu, config=cfg.launch_dict())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            problem = rule_violation(out, stock, ref, dtype)
            row["status"] = "ok" if problem is None else "wrong"
            if problem is not None:
                row["detail"] = problem
        except Exception as e:  # record and go on: one failure must not hide the others
            row["status"] = "error"
            row["detail"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
        row["seconds"] = round(time.perf_counter() - t0, 3)
        emit(row)
        x = weight = scale = shift = res = stock = ref = out = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # workers share the GPU: hand back each problem's peak


# ----------------------------------------------------------------------------------- driver --
def plan(args) -> List[Tuple[str, int, List[Problem]]]:
    """Jobs (dtype, config index, problems); the first dtype runs on every arch, the others on
    --subset-arch only."""
    from ..backends.triton import conv
    jobs = []
    for d, dtype_name in enumerate(args.dtype):
        archs = args.arch if d == 0 else (
            [a for a in args.arch if a in args.subset_arch] or args.arch[:1])
        dtype = DTYPES[dtype_name]
        todo: List[List[Problem]] = [[] for _ in conv.config_tuples(args.family, dtype)]
        for p in problems(archs, args.batch, args.size):
            for index in tunable(p, args.family, dtype):
                todo[index].append(p)
        jobs += [(dtype_name, index, probs) for index, probs in enumerate(todo) if probs]
    return jobs


def default_workers(device: torch.device) -> int:
    n = os.cpu_count() or 1
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, max(1, free // _GPU_BYTES_PER_WORKER))
    return max(1, n)


def _worker_cmd(args, dtype_name: str, index: int, out_path: str) -> List[str]:
    cmd = [sys.executable, "-m", "resnet_fused", "check", "--device", args.device, "--family",
           args.family, "--size", str(args.size), "--arch", *args.arch, "--subset-arch",
           *args.subset_arch, "--batch", *map(str, args.batch), "--dtype", *args.dtype,
           "--only", f"{dtype_name}:{index}", "--rows", out_path, "--workers", "1"]
    return cmd


def _run_parallel(args, jobs, workers: int, deadline: float) -> List[Dict[str, Any]]:
    """Each job in its own process, `workers` at a time; rows read back from JSON-lines files."""
    tmp = tempfile.mkdtemp(prefix="resnet_fused_check_")
    pending = list(enumerate(jobs))
    running: Dict[int, Tuple[subprocess.Popen, str, Any]] = {}
    done: Dict[int, Tuple[int, str]] = {}
    while pending or running:
        while pending and len(running) < workers and time.time() < deadline:
            j, (dtype_name, index, _) = pending.pop(0)
            path = os.path.join(tmp, f"job{j}.jsonl")
            log = open(os.path.join(tmp, f"job{j}.log"), "w")
            running[j] = (subprocess.Popen(_worker_cmd(args, dtype_name, index, path),
                                           stdout=log, stderr=subprocess.STDOUT), path, log)
        if not running:
            break  # deadline reached with jobs left: they are reported as not run
        time.sleep(0.2)
        for j in list(running):
            proc, path, log = running[j]
            if proc.poll() is None and time.time() < deadline:
                continue
            killed = proc.poll() is None
            if killed:  # the time limit, not a failure: its unreported problems count as not run
                proc.kill()
                proc.wait()
            log.close()
            done[j] = (None if killed else proc.returncode, path)
            del running[j]
            if args.progress:
                configs = candidate_configs(args.family, DTYPES[jobs[j][0]])
                print(f"  job {j + 1}/{len(jobs)} {jobs[j][0]} "
                      f"{config_name(configs[jobs[j][1]])}"
                      f": rc {proc.returncode}", file=sys.stderr, flush=True)
    rows: List[Dict[str, Any]] = []
    for j, (dtype_name, index, todo) in enumerate(jobs):
        got: List[Dict[str, Any]] = []
        rc, path = done.get(j, (None, None))  # rc None: never started, or stopped at the limit
        if path and os.path.exists(path):
            with open(path) as f:
                got = [json.loads(line) for line in f if line.strip()]
        seen = {r["key"] for r in got}
        cfg = config_name(candidate_configs(args.family, DTYPES[dtype_name])[index])
        why = ("not run: time limit" if rc is None else
               f"worker died (rc {rc}): " + _tail(path.replace(".jsonl", ".log")) if rc != 0 else
               "not reported")
        for p in todo:
            if repr(dataclasses.astuple(p)) not in seen:
                got.append({"dtype": dtype_name, "family": args.family, "config": cfg,
                            "config_index": index, "problem": str(p),
                            "key": repr(dataclasses.astuple(p)),
                            "status": "not run" if rc is None else "error", "detail": why})
        rows += got
    return rows


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return ""
    return text[-n:].replace("\n", " | ")


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One verdict per (dtype, config)."""
    by: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in rows:
        s = by.setdefault((r["dtype"], r["config"]), {"dtype": r["dtype"], "config": r["config"],
                                                      "ok": 0, "wrong": 0, "error": 0,
                                                      "not run": 0, "failures": []})
        s[r["status"]] += 1
        if r["status"] in ("wrong", "error"):
            s["failures"].append(f"{r['problem']}: {r.get('detail', '')}")
    for s in by.values():
        s["verdict"] = ("FAIL" if s["wrong"] or s["error"] else
                        "incomplete" if s["not run"] else "pass")
    return list(by.values())


def format_table(summary: List[Dict[str, Any]]) -> str:
    lines = [f"{'dtype':5} {'config':28} {'problems':>8} {'wrong':>5} {'error':>5} "
             f"{'not run':>7}  verdict"]
    for s in summary:
        total = s["ok"] + s["wrong"] + s["error"] + s["not run"]
        lines.append(f"{s['dtype']:5} {s['config']:28} {total:8d} {s['wrong']:5d} "
                     f"{s['error']:5d} {s['not run']:7d}  {s['verdict']}")
        for f in s["failures"][:3]:
            lines.append(f"      {f[:150]}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=cli.device, default=None,
                   help="cuda (default when present); cpu needs TRITON_INTERPRET=1")
    p.add_argument("--arch", nargs="+", choices=cli.BUILDERS, default=list(ARCHS),
                   metavar="ARCH", help=f"ResNets ({' '.join(ARCHS)})")
    p.add_argument("--subset-arch", nargs="+", default=["resnet50"],
                   help="archs for the dtypes after the first (resnet50)")
    p.add_argument("--batch", type=cli.positive_int, nargs="+", default=[1, 256],
                   help="batch sizes (1 256)")
    p.add_argument("--size", type=cli.positive_int, default=224, help="image size (224)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"],
                   help="dtypes; the first on every arch (fp16 bf16 fp32)")
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="candidate list (default: the GPU's; hopper under the interpreter)")
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="worker processes (default: one per core, capped by GPU memory)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; jobs not started by then are reported as not run")
    p.add_argument("--json", metavar="PATH", help="write every row and the verdicts as JSON")
    p.add_argument("--only", help=argparse.SUPPRESS)   # worker: one job, DTYPE:INDEX
    p.add_argument("--rows", help=argparse.SUPPRESS)   # worker: JSON-lines output
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines")


def main(args: argparse.Namespace) -> int:
    from ..backends.triton import conv
    interpret = conv.interpreting()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu" and not interpret:
        raise SystemExit("check: on CPU the Triton kernels run only in the interpreter: set "
                         "TRITON_INTERPRET=1 (and use a small subset: --arch resnet18 --batch 1 "
                         "--size 32)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("check: --device cuda, but no CUDA device is visible")
    if args.family is None:
        args.family = ("hopper" if device.type == "cpu" else
                       conv.arch_family(torch.cuda.get_device_capability(device)))
    if args.only:  # worker: one job, rows appended as JSON lines
        dtype_name, index = args.only.split(":")
        job = next((j for j in plan(args) if j[0] == dtype_name and j[1] == int(index)), None)
        with open(args.rows, "a") as f:
            def emit(row):
                f.write(json.dumps(row) + "\n")
                f.flush()
            if job is not None:
                run_job(dtype_name, args.family, int(index), job[2], device, emit)
        return 0

    t0 = time.time()
    jobs = plan(args)
    workers = args.workers or default_workers(device)
    n_runs = sum(len(j[2]) for j in jobs)
    print(f"check: {len(jobs)} jobs (dtype x config), {n_runs} kernel runs on {device} "
          f"({args.family} configs), {workers} workers", flush=True)
    deadline = t0 + args.time_limit if args.time_limit else float("inf")
    if workers <= 1:
        rows: List[Dict[str, Any]] = []
        for dtype_name, index, todo in jobs:
            if time.time() >= deadline:
                break
            run_job(dtype_name, args.family, index, todo, device, rows.append)
    else:
        rows = _run_parallel(args, jobs, workers, deadline)
    summary = summarize(rows)
    report = {"meta": {"device": str(device), "family": args.family, "archs": args.arch,
                       "batches": args.batch, "size": args.size, "dtypes": args.dtype,
                       "workers": workers, "wall_s": round(time.time() - t0, 1),
                       "torch": torch.__version__,
                       "device_name": (torch.cuda.get_device_name(device)
                                       if device.type == "cuda" else "cpu (interpreter)")},
              "summary": summary, "rows": rows}
    print(format_table(summary))
    print(f"check: {sum(s['ok'] for s in summary)} ok, {sum(s['wrong'] for s in summary)} wrong, "
          f"{sum(s['error'] for s in summary)} errors, {sum(s['not run'] for s in summary)} not "
          f"run, in {report['meta']['wall_s']} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if any(s["verdict"] == "FAIL" for s in summary) else 0
