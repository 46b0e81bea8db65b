"""`python -m resnet_fused bench`: fused vs stock PyTorch, side by side, on this machine.

For each (batch, dtype) it times every provider on the same weights and the same input:

  eager          torchvision, NCHW (what a user gets by default)           -- the speed-up baseline
  eager_cl       torchvision, channels_last model and input (input converted outside the timing)
  compile        torch.compile(eager_cl model), default mode
  compile_max    torch.compile(eager_cl model, max-autotune + inductor freezing [+ CUDA graphs])
  fused+compile  torch.compile(resnet_fused model), channels_last input as `compile` (opt-in)
  jit_ofi        torch.jit.optimize_for_inference(torch.jit.script(model)) (opt-in; deprecated API)
  openvino       OpenVINO: openvino.convert_model(model) compiled for CPU with torch's thread count
                 and the row's precision as INFERENCE_PRECISION_HINT (opt-in; CPU only; needs the
                 `openvino` package, a test-time extra, not a dependency)
  fused:<name>   resnet_fused with backend <name>, for each backend available here
  fused+graphs   resnet_fused (auto backend) through resnet_fused.cuda_graphs in its lowest-latency
                 form: check_weights="fast", clone_output=False (CUDA only)
  fused+graphs_safe  the same with the wrapper's defaults: every weight checked, output cloned

Timing: a first call (fold cache, autotuning, compilation; reported apart), warm-up calls, then
repeated calls. On CUDA, one provider at a time, each call timed with CUDA events (device time
between two events on the stream). On CPU, time.perf_counter around each (synchronous) call, with
the providers interleaved round by round, so that load from other processes on a shared machine
hits every provider alike instead of whichever ran at the wrong moment. Reported: median,
20th/80th percentiles, images/s = batch / median, speed-up = eager median / provider median,
TFLOP/s = 2 * multiply-adds / median. Each provider's output is compared with eager's
(max |diff| / max |eager|) as a sanity check.

With --autocast, fp16/bf16 rows keep fp32 models and inputs and run every call under
torch.autocast(device, dtype) (mixed-precision inference); without it they convert the model.
With --train, each call is one training step instead (forward, cross-entropy, backward; AMP for
fp16/bf16) and the providers are bench_train's; TFLOP/s counts 3x the forward's work.
With --eval-grad, the models stay in eval mode but autograd records (parameters require grad):
`forward` times an eval forward run outside torch.no_grad(), `backward` a frozen-BatchNorm
fine-tuning step (gradients cleared, forward, sum, backward; TFLOP/s counts 3x the forward's).
On CPU each row reports the median minor page faults of a call: glibc hands freed memory back to
the system and faults it in again, ~1-2 us a page, differently for each model's allocation order;
--keep-heap turns that off for the process (every provider alike) to compare the compute alone;
--isolate N times each provider alone in N processes of its own instead (bench_isolated).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import backends, training
from ..walk import count_macs
from . import bench_isolated, bench_train, cli
from .timing import (device_name, interleaved, keep_heap_memory, measure, quantile, selected,
                     set_speedup, summarize, synchronize, versions)

BASE_PROVIDERS = ("eager", "eager_cl", "compile", "compile_max", "jit_ofi", "openvino")
OPT_IN = ("jit_ofi", "openvino")  # left out of `all`
LABELS = {"eager": "eager (torchvision, NCHW)", "eager_cl": "eager (channels_last)",
          "compile": "torch.compile (default)",
          "compile_max": "torch.compile (max-autotune, freezing)",
          "jit_ofi": "torch.jit.optimize_for_inference",
          "openvino": "OpenVINO (CPU)",
          "fused+graphs": "fused + CUDA graphs"}
GRAPHS = ("fused+graphs", "fused+graphs_safe")  # providers that need CUDA


# ----------------------------------------------------------------------------- providers ---
def available_fused_backends(device: torch.device) -> List[str]:
    return [n for n in backends.NAMES if n != "auto"
            and backends.unavailable_reason(n, device) is None]


def default_providers(device: torch.device) -> List[str]:
    fused = [f"fused:{n}" for n in available_fused_backends(device)]
    if device.type == "cuda":
        return ["eager", "eager_cl", "compile", *fused, *GRAPHS]
    # torch.compile on CPU needs a C++ compiler and ~1 min per shape: opt in with --providers.
    return ["eager", "eager_cl", *fused]


def expand_providers(spec: Optional[str], device: torch.device) -> List[str]:
    if not spec:
        return default_providers(device)
    out: List[str] = []
    for p in (s.strip() for s in spec.split(",")):
        if not p:
            continue
        if p == "all":
            out += [*(b for b in BASE_PROVIDERS if b not in OPT_IN),
                    *(f"fused:{n}" for n in available_fused_backends(device)),
                    *(GRAPHS if device.type == "cuda" else [])]
        elif p == "default":
            out += default_providers(device)
        elif p in ("fused", "fused:*"):
            out += [f"fused:{n}" for n in available_fused_backends(device)]
        elif p in BASE_PROVIDERS or p in (*GRAPHS, "fused+compile"):
            out.append(p)
        elif p.startswith("fused:") and p[6:] in backends.NAMES:
            out.append(p)
        else:
            names = (*BASE_PROVIDERS, "fused", "fused:<backend>", *GRAPHS, "fused+compile",
                     "all")
            raise SystemExit(f"bench: unknown provider {p!r}; expected one of "
                             f"{', '.join(names)} (backends: {', '.join(backends.NAMES)})")
    seen = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def label(provider: str, device: torch.device) -> str:
    if provider.startswith("fused:"):
        name = provider[6:]
        if name == "auto":
            return f"fused (auto -> {backends.device_choice(device)})"
        auto = " (auto)" if backends.device_choice(device) == name else ""
        return f"fused [{name}]{auto}"
    if provider in GRAPHS:
        safe = ", every weight checked" if provider == "fused+graphs_safe" else ""
        return f"fused + CUDA graphs{safe} (auto -> {backends.device_choice(device)})"
    if provider == "fused+compile":
        return f"torch.compile(fused) (auto -> {backends.device_choice(device)})"
    return LABELS.get(provider, provider)


def _compile(model, max_autotune: bool, device: torch.device):
    if not max_autotune:
        return torch.compile(model)
    options = {"max_autotune": True, "freezing": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True  # what mode="max-autotune" adds on CUDA
    return torch.compile(model, options=options)


_OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _openvino(stock, x: torch.Tensor, device: torch.device,
              dtype: Optional[torch.dtype]) -> Callable[[], Any]:
    """OpenVINO's CPU runtime on the stock model: fp32 in and out, `dtype` (default x's) as the
    inference precision, torch's intra-op thread count."""
    if device.type != "cpu":
        raise RuntimeError("the openvino provider runs on CPU only")
    try:
        import openvino
    except ImportError as e:
        raise RuntimeError(f"the openvino provider needs the openvino package ({e})") from None
    dtype = dtype or x.dtype
    if dtype not in _OPENVINO_PRECISION:
        raise RuntimeError(f"the openvino provider has no {dtype} precision")
    model = copy.deepcopy(stock).float()
    example = x.float()
    with torch.no_grad():
        converted = openvino.convert_model(model, example_input=example)
    compiled = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[dtype]})
    request = compiled.create_infer_request()
    array = example.numpy()
    return lambda: torch.from_numpy(request.infer([array])[0].copy())


def make_runner(provider: str, stock, x: torch.Tensor, device: torch.device,
                autocast: Optional[torch.dtype] = None) -> Callable[[], Any]:
    """A zero-argument callable running one forward of `provider` (built from `stock`);
    `autocast`: the dtype the call will run under autocast (the openvino provider's precision)."""
    import resnet_fused

    if provider == "eager":
        return _calling(stock, x)
    if provider == "openvino":
        return _openvino(stock, x, device, autocast)
    if provider == "jit_ofi":  # deprecated in recent torch, still the CPU reference point
        import warnings
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = torch.jit.optimize_for_inference(torch.jit.script(copy.deepcopy(stock)))
        return lambda: model(x)
    if provider in ("eager_cl", "compile", "compile_max"):
        model = copy.deepcopy(stock).to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        if provider != "eager_cl":
            model = _compile(model, provider == "compile_max", device)
        return _calling(model, xcl)
    fused = resnet_fused.fuse(stock)  # shares stock's tensors
    if provider == "fused+compile":  # the same channels_last input as `compile` gets
        model = _compile(fused, False, device)
        xcl = x.contiguous(memory_format=torch.channels_last)
        return _calling(model, xcl)
    if provider in GRAPHS:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        graphed = (resnet_fused.cuda_graphs(fused) if provider == "fused+graphs_safe" else
                   resnet_fused.cuda_graphs(fused, check_weights="fast", clone_output=False))
        return lambda: graphed(x)
    name = provider[6:]
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} unavailable: {reason}")

    run = _calling(fused, x)
    run.backend = name  # run_bench selects it around the timing, not inside each call
    return run


def _calling(model, x: torch.Tensor) -> Callable[[], Any]:
    """model(x) as a runner that knows its model (for --eval-grad's gradient clearing)."""
    def run():
        return model(x)
    run.model = model
    return run


EVAL_GRAD = ("forward", "backward")


def _with_autograd(run: Callable[[], Any], backward: bool) -> Callable[[], Any]:
    """An eval-mode runner with autograd recording: the forward alone, or a frozen-statistics
    fine-tuning step (gradients cleared, forward, sum, backward), returning the output."""
    model = getattr(run, "model", None)
    if model is None:
        raise RuntimeError("this provider has no autograd (--eval-grad)")
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = run()
        if backward:
            out.float().sum().backward()
        return out.detach()
    step.backend = getattr(run, "backend", None)
    return step


# ---------------------------------------------------------------------------------- run ----
def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def run_bench(arch: str = "resnet50", batches: Sequence[int] = (8,),
              dtypes: Sequence[str] = ("fp32",),
              providers: Optional[Sequence[str]] = None, device: Optional[str] = None,
              size: int = 224, warmup: int = 1, min_reps: int = 5, max_reps: int = 100,
              min_time_s: Optional[float] = None, progress: bool = True, seed: int = 0,
              on_row: Optional[Callable[[Dict[str, Any]], None]] = None,
              train: bool = False, autocast: bool = False,
              eval_grad: Optional[str] = None, keep_heap: bool = False) -> Dict[str, Any]:
    """Run the side-by-side benchmark; returns {"meta": ..., "results": [...]} (see module doc).
    train=True: training steps with bench_train's providers. autocast=True: fp16/bf16 inference
    rows run fp32 models under torch.autocast. eval_grad='forward'|'backward': eval mode with
    autograd recording (the forward alone, or forward + backward). keep_heap=True: CPU timing
    with freed memory kept in the heap (timing.keep_heap_memory: no page faults from the
    allocator, for the whole process).

    `on_row(report_so_far)` is called after every row (the CLI rewrites --json with it, so a run
    cut short by a timeout keeps the rows it finished)."""
    import torchvision

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but no CUDA device is visible")
    providers = list(providers) if providers else (
        bench_train.default_providers(dev) if train else default_providers(dev))
    if min_time_s is None:
        min_time_s = 1.0 if dev.type == "cuda" else 6.0
    heap = keep_heap_memory() if keep_heap else "the allocator as configured"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    macs_per_image = count_macs(arch, size)
    if eval_grad not in (None, *EVAL_GRAD) or (eval_grad and train):
        raise ValueError(f"bench: eval_grad must be one of {EVAL_GRAD} (not with train), got "
                         f"{eval_grad!r}")
    grad = train or eval_grad is not None
    meta = {"arch": arch, "image_size": size,
            "mode": ("train" if train else f"eval with autograd ({eval_grad})" if eval_grad
                     else "inference"),
            "autocast": bool(autocast and not train),
            "device": dev.type, "device_name": device_name(dev),
            "threads": torch.get_num_threads(), "versions": versions(),
            "auto_backend": backends.device_choice(dev),
            "train_bn": training.train_bn_choice(dev),
            "available_backends": available_fused_backends(dev),
            "macs_per_image": macs_per_image,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if dev.type == "cuda" else None,
            "heap": heap if dev.type == "cpu" else None,
            "timing": ("CUDA events per call, one provider at a time" if dev.type == "cuda" else
                       "time.perf_counter per call, providers interleaved round by round") +
                      f", warm-up {warmup}, >= {min_reps} reps and >= {min_time_s:g} s per "
                      f"provider, <= {max_reps} reps",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node()}
    results: List[Dict[str, Any]] = []
    total = len(batches) * len(dtypes) * len(providers)
    step, t_start = 0, time.perf_counter()

    def emit(row: Dict[str, Any]) -> None:
        results.append(row)
        if on_row is not None:
            meta["wall_s"] = time.perf_counter() - t_start
            on_row({"meta": meta, "results": results})

    def finish(row: Dict[str, Any], times: List[float], batch: int) -> None:
        row.update(summarize(times))
        row["times_ms"] = [round(t, 4) for t in times]
        row["images_per_s"] = batch / row["median_ms"] * 1e3
        # a training step: forward + two backward GEMMs per layer
        work = 3 if train or eval_grad == "backward" else 1
        row["tflops"] = 2 * work * macs_per_image * batch / (row["median_ms"] * 1e-3) / 1e12
        _progress(progress, f"      {row['label']}: median {row['median_ms']:.3f} ms "
                            f"({row['images_per_s']:.1f} img/s, {row['reps']} reps)")

    for dtype_name in dtypes:
        dtype = cli.DTYPES[dtype_name]
        torch.manual_seed(seed)
        stock = getattr(torchvision.models, arch)()
        # training, and inference with --autocast: fp32 weights, fp16/bf16 as autocast (AMP)
        amp = dtype if (train or autocast) and dtype != torch.float32 else None
        weights = torch.float32 if amp is not None else dtype
        stock = (stock.train().to(dev) if train else stock.eval().to(device=dev, dtype=weights))
        for batch in batches:
            gen = torch.Generator(device="cpu").manual_seed(seed + batch)
            x = torch.randn(batch, 3, size, size, generator=gen).to(
                device=dev, dtype=torch.float32 if train else weights)
            target = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
            eager_out = None
            rows: List[Dict[str, Any]] = []
            ready: List[tuple] = []  # (row, run, backend) kept for interleaved CPU timing
            for provider in providers:
                step += 1
                row: Dict[str, Any] = {"arch": arch, "batch": batch, "dtype": dtype_name,
                                       "provider": provider,
                                       "label": (bench_train.label(provider, dev) if train
                                                 else label(provider, dev))}
                rows.append(row)
                _progress(progress, f"[{step}/{total}] {arch} batch {batch} {dtype_name} "
                                    f"{row['label']} ... ({time.perf_counter() - t_start:.0f} s)")
                run = out = None
                try:
                    if provider in GRAPHS and dev.type != "cuda":
                        raise RuntimeError("CUDA graphs need a CUDA device")
                    run = (bench_train.make_runner(provider, stock, x, target, amp) if train
                           else _under_autocast(make_runner(provider, stock, x, dev, amp), dev,
                                                amp))
                    if eval_grad:
                        run = _with_autograd(run, eval_grad == "backward")
                    name = getattr(run, "backend", None)
                    mode = contextlib.nullcontext() if grad else torch.inference_mode()
                    with mode, selected(name):
                        t0 = time.perf_counter()
                        out = run()  # first call: compile / autotune / fold, timed apart
                        synchronize(dev)
                        row["first_call_s"] = time.perf_counter() - t0
                        out = out.float()
                        if eager_out is None and provider == "eager":
                            eager_out = out
                        if eager_out is not None:
                            row["max_rel_diff_vs_eager"] = (
                                (out - eager_out).abs().max() / eager_out.abs().max()).item()
                        if dev.type == "cuda":  # one provider at a time, event-timed
                            finish(row, measure(run, dev, warmup=warmup, min_reps=min_reps,
                                                max_reps=max_reps, min_time_s=min_time_s), batch)
                        else:
                            ready.append((row, run, name))
                except Exception as e:  # one provider failing must not lose the others' rows
                    row["error"] = (f"{type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}")[:300]
                    _progress(progress, f"      failed: {row['error']}")
                finally:
                    out = None
                    if dev.type == "cuda":
                        run = None
                        gc.collect()
                        torch.cuda.empty_cache()
                if dev.type == "cuda":
                    set_speedup(rows)
                    emit(row)
            if ready:  # CPU: all providers interleaved, round by round
                _progress(progress, f"      timing {len(ready)} providers interleaved ...")
                faults: List[List[int]] = []
                times = interleaved([(r, n) for _, r, n in ready], warmup, min_reps, max_reps,
                                     min_time_s, inference=not grad, faults=faults)
                for (row, _, _), t, f in zip(ready, times, faults):
                    finish(row, t, batch)
                    if f:  # the allocator's share of the time (timing module doc)
                        row["page_faults"] = f
                        row["page_faults_per_call"] = quantile(f, 0.5)
                set_speedup(rows)
                for row in rows:
                    emit(row)
            elif dev.type != "cuda":
                for row in rows:
                    emit(row)
            ready = []
            gc.collect()
        del stock
        gc.collect()
    meta["wall_s"] = time.perf_counter() - t_start
    return {"meta": meta, "results": results}


def _under_autocast(run: Callable[[], Any], device: torch.device,
                    dtype: Optional[torch.dtype]) -> Callable[[], Any]:
    """`run` with every call under torch.autocast(device, dtype) (dtype None: `run` itself)."""
    if dtype is None:
        return run

    def autocast_run():
        with torch.autocast(device.type, dtype=dtype):
            return run()
    autocast_run.backend = getattr(run, "backend", None)
    autocast_run.model = getattr(run, "model", None)
    return autocast_run


# ------------------------------------------------------------------------------ output -----
def format_table(report: Dict[str, Any]) -> str:
    m = report["meta"]
    v = m["versions"]
    mode = m["mode"] + (" under autocast" if m.get("autocast") else "")
    lines = [f"{m['arch']} {m['image_size']}x{m['image_size']} {mode} on {m['device']}: "
             f"{m['device_name']}; "
             f"torch {v['torch']}, triton {v['triton']}; auto backend -> {m['auto_backend']}",
             f"timing: {m['timing']}",
             f"{'batch':>5} {'dtype':5} {'provider':34} {'median ms':>10} {'p20 ms':>10} "
             f"{'p80 ms':>10} {'img/s':>9} {'vs eager':>8} {'TFLOP/s':>8} {'rel diff':>8}"
             f"{' faults':>8}"]
    if m.get("heap"):
        lines.insert(2, f"heap: {m['heap']}; faults: the median minor page faults of a call")
    for r in report["results"]:
        head = f"{r['batch']:>5} {r['dtype']:5} {r['label'][:34]:34}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]}")
            continue
        speed = f"{r['speedup_vs_eager']:7.2f}x" if "speedup_vs_eager" in r else f"{'-':>8}"
        diff = (f"{r['max_rel_diff_vs_eager']:8.1e}" if "max_rel_diff_vs_eager" in r
                else f"{'-':>8}")
        faults = (f"{r['page_faults_per_call']:8.0f}" if "page_faults_per_call" in r
                  else f"{'-':>8}")
        lines.append(f"{head} {r['median_ms']:10.3f} {r['p20_ms']:10.3f} {r['p80_ms']:10.3f} "
                     f"{r['images_per_s']:9.1f} {speed} {r['tflops']:8.3f} {diff}{faults}")
    return "\n".join(lines)


def plot(report: Dict[str, Any], path: str) -> None:
    """A PNG bar chart: images/s per provider, one panel per (batch, dtype)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in report["results"]:
        groups.setdefault((r["batch"], r["dtype"]), []).append(r)
    n = max(1, len(groups))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, ((batch, dtype), rs) in zip(axes.flat, groups.items()):
        names = [r["label"] for r in rs]
        vals = [r.get("images_per_s", 0.0) for r in rs]
        colors = ["#4c72b0" if r["provider"].startswith("eager") else
                  "#dd8452" if r["provider"].startswith("fused") else "#8172b2" for r in rs]
        bars = ax.barh(range(len(rs)), vals, color=colors)
        ax.set_yticks(range(len(rs)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("images/s (higher is better)")
        ax.set_xlim(0, max(vals + [1e-9]) * 1.2)  # room for the speed-up labels
        ax.set_title(f"batch {batch}, {dtype}")
        for bar, r in zip(bars, rs):
            text = "failed" if "error" in r else (f"{r['speedup_vs_eager']:.2f}x"
                                                  if "speedup_vs_eager" in r else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text,
                    va="center", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = report["meta"]
    fig.suptitle(f"{m['arch']} on {m['device_name']} (torch {m['versions']['torch']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- CLI -----
def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arch(p, default="resnet50")
    p.add_argument("--batch", type=cli.positive_int, nargs="+", default=None,
                   help="batch sizes (default: 8 on cpu, 1 and 256 on cuda)")
    p.add_argument("--dtype", nargs="+", choices=sorted(cli.DTYPES), default=None,
                   help="dtypes (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--providers", default=None,
                   help="comma list of: eager, eager_cl, compile, compile_max, jit_ofi, "
                        "openvino, fused "
                        "(every available backend), fused:<backend>, fused+graphs, "
                        "fused+graphs_safe, default, all. Default: eager, eager_cl, fused:* "
                        "(+ compile, fused+graphs, fused+graphs_safe on cuda)")
    p.add_argument("--device", type=cli.device, default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--size", type=cli.positive_int, default=224,
                   help="image height and width (224)")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="CPU threads (torch default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (1)")
    p.add_argument("--min-reps", type=cli.positive_int, default=5,
                   help="timed calls at least (5)")
    p.add_argument("--max-reps", type=cli.positive_int, default=100,
                   help="timed calls at most (100)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed calls per provider at least (6 on cpu, 1 on cuda)")
    p.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--autocast", action="store_true",
                   help="fp16/bf16 inference as fp32 models under torch.autocast (default: the "
                        "model converted to the dtype)")
    p.add_argument("--eval-grad", choices=EVAL_GRAD, default=None,
                   help="eval mode with autograd recording: 'forward' (an eval forward outside "
                        "torch.no_grad()) or 'backward' (frozen-BatchNorm fine-tuning: forward "
                        "+ backward)")
    p.add_argument("--train", action="store_true",
                   help="time training steps (forward + loss + backward; AMP for fp16/bf16) "
                        "with the providers " + ", ".join(bench_train.PROVIDERS) +
                        " (default: " + ", ".join(bench_train.default_providers(
                            torch.device("cpu"))) + " on cpu)")
    p.add_argument("--isolate", type=cli.positive_int, metavar="N", default=None,
                   help="CPU: time each provider alone in N processes of its own (alternating, "
                        "--min-reps calls each), as a user's process runs one model, instead of "
                        "interleaved in this one (which shares its heap between them)")
    p.add_argument("--keep-heap", action="store_true",
                   help="CPU: keep freed memory in the process's heap (glibc mallopt: no mmap, "
                        "no trimming), so that no provider's time includes page faults from the "
                        "allocator (each row reports its faults per call either way)")


def main(args: argparse.Namespace) -> int:
    if args.train and args.eval_grad:
        raise SystemExit("bench: --train and --eval-grad exclude each other (a training step "
                         "runs in train mode)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        batches = args.batch or ([64, 256] if args.train else [1, 256])
        dtypes = args.dtype or (["bf16"] if args.train else ["fp16"])
    else:
        batches, dtypes = args.batch or [8], args.dtype or ["fp32"]

    def write_json(report: Dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)

    providers = (([p.strip() for p in args.providers.split(",") if p.strip()]
                  if args.providers else None) if args.train
                 else expand_providers(args.providers, dev))
    if args.keep_heap:
        try:
            keep_heap_memory()  # (here: a clear error before any timing; idempotent)
        except RuntimeError as e:
            raise SystemExit(f"bench: {e}") from None
    if args.isolate:
        if dev.type != "cpu":
            raise SystemExit(f"bench: --isolate times CPU processes, got --device {dev.type}")
        providers = providers or (bench_train.default_providers(dev) if args.train
                                  else default_providers(dev))
        report = bench_isolated.run(args, batches, dtypes, providers, progress=not args.quiet)
    else:
        report = run_bench(args.arch, batches, dtypes, providers,
                           str(dev), args.size, args.warmup, args.min_reps, args.max_reps,
                           args.min_time, progress=not args.quiet,
                           on_row=write_json if args.json else None, train=args.train,
                           autocast=args.autocast, eval_grad=args.eval_grad,
                           keep_heap=args.keep_heap)
    print(format_table(report))
    if args.json:
        write_json(report)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0 if not any("error" in r and r["provider"] == "eager"
                        for r in report["results"]) else 1
