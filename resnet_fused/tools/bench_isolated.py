"""`python -m resnet_fused bench --isolate N`: every provider timed in processes of its own.

Providers interleaved in one process share its heap, and glibc's allocator faults pages in for
one provider that another freed (benchmarks/RESULTS.md, "Page faults"): a process that runs one
model, as a user's does, can fault quite differently. Here each provider runs in N fresh
processes (`bench` again, that provider alone), one provider after the other, round by round,
so that load from other processes on a shared machine still hits every provider alike; each
process times --min-reps calls after its first call and warm-up, and a row merges the calls of
its N processes. Outputs are not compared across processes (no `max_rel_diff_vs_eager`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence

from .timing import quantile, set_speedup, summarize


def child_argv(args, batches: Sequence[int], dtypes: Sequence[str], provider: str,
               path: str) -> List[str]:
    """The command that times `provider` alone, with the options of this run, into `path`."""
    argv = [sys.executable, "-m", "resnet_fused", "bench", "--device", "cpu", "--arch",
            args.arch, "--batch", *map(str, batches), "--dtype", *dtypes, "--size",
            str(args.size), "--warmup", str(args.warmup), "--min-reps", str(args.min_reps),
            "--max-reps", str(args.min_reps), "--min-time", "0", "--quiet",
            "--providers", provider, "--json", path]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.train:
        argv.append("--train")
    if args.eval_grad:
        argv += ["--eval-grad", args.eval_grad]
    if args.autocast:
        argv.append("--autocast")
    if args.keep_heap:
        argv.append("--keep-heap")
    return argv


def merge(reports: Sequence[Dict[str, Any]], rounds: int, min_reps: int) -> Dict[str, Any]:
    """One report from the processes' reports: each (batch, dtype, provider) row with the calls
    of all its processes, speed-ups against the merged eager row."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for report in reports:
        for r in report["results"]:
            key = (r["batch"], r["dtype"], r["provider"])
            row = rows.get(key)
            if row is None:  # the first process of this row
                rows[key] = {k: v for k, v in r.items()
                             if k not in ("max_rel_diff_vs_eager", "speedup_vs_eager")}
                rows[key]["processes"] = 1
            elif "error" in r:
                row["error"] = r["error"]
            elif "error" not in row:
                row["times_ms"] = row["times_ms"] + r["times_ms"]
                row["page_faults"] = row.get("page_faults", []) + r.get("page_faults", [])
                row["processes"] += 1
    for row in rows.values():
        if "error" in row or "times_ms" not in row:
            continue
        work_per_ms = row["tflops"] * row["median_ms"]  # the same work in every process
        row.update(summarize(row["times_ms"]))
        row["images_per_s"] = row["batch"] / row["median_ms"] * 1e3
        row["tflops"] = work_per_ms / row["median_ms"]
        if row.get("page_faults"):
            row["page_faults_per_call"] = quantile(row["page_faults"], 0.5)
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for (batch, dtype, _), row in rows.items():
        groups.setdefault((batch, dtype), []).append(row)
    for group in groups.values():
        set_speedup(group)
    meta = dict(reports[0]["meta"])
    meta["timing"] = (f"each provider alone in {rounds} processes of its own, alternating "
                      f"round by round; {min_reps} calls timed (time.perf_counter) per process "
                      f"after its first call and warm-up")
    return {"meta": meta, "results": list(rows.values())}


def run(args, batches: Sequence[int], dtypes: Sequence[str], providers: Sequence[str],
        progress: bool = True) -> Dict[str, Any]:
    """Time `providers` in args.isolate processes each (CPU); returns the merged report."""
    reports: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="resnet_fused_bench_") as tmp:
        for rnd in range(args.isolate):
            for k in range(len(providers)):
                provider = providers[(k + rnd) % len(providers)]
                path = os.path.join(tmp, f"{rnd}_{k}.json")
                if progress:
                    print(f"round {rnd + 1}/{args.isolate}: {provider} in a process of its own",
                          file=sys.stderr, flush=True)
                done = subprocess.run(child_argv(args, batches, dtypes, provider, path),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
                if not os.path.exists(path):
                    raise SystemExit(f"bench --isolate: the process timing {provider} ended "
                                     f"with status {done.returncode} and no report:\n"
                                     f"{done.stderr[-2000:]}")
                with open(path) as f:
                    reports.append(json.load(f))
    return merge(reports, args.isolate, args.min_reps)
