"""Merge the GPU suite's pieces into benchmarks/results/<date>-<gpu>.json and .md.

Called by benchmarks/gpu_suite.sh; it imports neither torch nor resnet_fused (fast, and it works
even where those broke). Every input is optional (a step that failed or timed out
leaves its file missing or partial, and the report says so). Only numbers found in the inputs are
written: nothing is estimated here.
"""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Tuple


def _load(path: Optional[str]) -> Optional[Any]:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _steps(path: Optional[str]) -> List[Dict[str, Any]]:
    out = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    name, rc, secs, cap = parts[:4]
                    rc_i = int(rc)
                    status = "ok" if rc_i == 0 else ("timed out" if rc_i in (124, 137) else
                                                     "skipped" if rc_i == -1 else
                                                     f"failed (rc {rc})")
                    out.append({"step": name, "rc": rc_i, "seconds": float(secs),
                                "limit_s": float(cap), "status": status})
    return out


def _tests(path: Optional[str]) -> Optional[Dict[str, Any]]:
    if not path or not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    return counts


def _bench_md(report: Dict[str, Any], title: str) -> List[str]:
    m = report["meta"]
    lines = [f"## {title}", "",
             f"{m['arch']} {m['image_size']}x{m['image_size']}, {m['device_name']}, "
             f"auto backend -> {m['auto_backend']}; {m['timing']}; wall {m.get('wall_s', 0):.0f} s",
             "", "| batch | dtype | provider | median ms | p20 ms | p80 ms | img/s | vs eager | "
                 "TFLOP/s | max rel diff vs eager | first call s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['dtype']} | {r['label']} | failed: "
                         f"{r['error'][:120].replace('|', '/')} | | | | | | | |")
            continue
        sp = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        rd = f"{r['max_rel_diff_vs_eager']:.1e}" if "max_rel_diff_vs_eager" in r else "-"
        lines.append(f"| {r['batch']} | {r['dtype']} | {r['label']} | {r['median_ms']:.3f} | "
                     f"{r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {r['images_per_s']:.1f} | {sp} | "
                     f"{r['tflops']:.2f} | {rd} | {r.get('first_call_s', 0):.1f} |")
    lines.append("")
    return lines


def _bench_title(report: Dict[str, Any]) -> str:
    providers = {r["provider"] for r in report["results"]}
    dtypes = {r["dtype"] for r in report["results"]}
    mode = report["meta"].get("mode", "")
    if mode == "train":
        return (f"Training step (AMP for fp16/bf16; BN policy here: "
                f"{report['meta'].get('train_bn', '?')})")
    if mode.startswith("eval with autograd"):
        return (f"Eval mode with autograd: {mode[len('eval with autograd'):].strip(' ()')} "
                f"(frozen-BN fine-tuning; AMP for fp16/bf16; bn_eval_act forced)")
    if "compile_max" in providers:
        return "End-to-end: torch.compile max-autotune"
    if "fp16" in dtypes:
        return "End-to-end: eager vs fused"
    return "End-to-end: " + ", ".join(sorted(dtypes))


def _profile_md(p: Dict[str, Any]) -> List[str]:
    def shape(v):
        return "x".join(map(str, v))

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    peak = p.get("peak_tflops")
    lines = [f"## Per-layer profile: {p['arch']} batch {p['batch']} {p['dtype']}", "",
             f"{p['device_name']}; backend {p['backend']} -> {p['backend_resolved']}; "
             f"{p['timing']}; {p['layout']}; peak "
             + (f"{peak:.1f} TFLOP/s ({p['peak_measured_as']})" if peak else "not measured"),
             "", "| layer | in -> out | MACs (M) | stock ms | fused ms | speed-up | TFLOP/s | "
                 "% peak |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in p["layers"]:
        lines.append(f"| {r['name']} | {shape(r['in_shape'])} -> {shape(r['out_shape'])} | "
                     f"{r['macs'] / 1e6:.1f} | {r['stock_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{num(r.get('speedup'), '.2f')}x | {num(r.get('fused_tflops'), '.2f')} | "
                     f"{num(r.get('pct_of_peak'), '.1f')} |")
    lines += [f"| total | | {p['total_macs_batch'] / 1e6:.1f} | {p['stock_ms_total']:.3f} | "
              f"{p['fused_ms_total']:.3f} | {num(p.get('speedup_total'), '.2f')}x | "
              f"{num(p.get('fused_tflops_total'), '.2f')} | |", "",
              f"Multiply-adds: {p['total_macs'] / 1e9:.3f} G per image (convs + fc); layers timed "
              "one by one, times summed.", ""]
    return lines


def _check_md(c: Dict[str, Any]) -> List[str]:
    m = c["meta"]
    lines = ["## Correctness sweep: every Triton config on every conv vs float64", "",
             f"{m['device_name']}, {m['family']} configs; {', '.join(m['archs'])} "
             f"(the first dtype; the others on a subset) at batch "
             f"{', '.join(map(str, m['batches']))}, {m['size']}x"
             f"{m['size']}; one NaN planted per input; {m['workers']} workers, {m['wall_s']} s", "",
             "| dtype | config | problems | wrong | errors | not run | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for s in c["summary"]:
        total = s["ok"] + s["wrong"] + s["error"] + s["not run"]
        lines.append(f"| {s['dtype']} | {s['config']} | {total} | {s['wrong']} | {s['error']} | "
                     f"{s['not run']} | {s['verdict']} |")
    lines.append("")
    for s in c["summary"]:
        for f in s["failures"][:5]:
            lines.append(f"- {s['dtype']} {s['config']}: {f[:200].replace('|', '/')}")
    lines.append("")
    return lines


def _warmup_md(runs: List[Tuple[str, Dict[str, Any]]]) -> List[str]:
    """Cold start: `python -m resnet_fused warmup` from empty caches, then again (warm)."""
    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["## Cold start: `python -m resnet_fused warmup` (parallel compile, tuning per bucket)",
             "", "| run | problems | compile jobs | workers | compile s | tune s | command s | "
             "first forward ms | unseen batch: first / steady ms |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in runs:
        firsts = ", ".join(f"b{b}: {ms:.0f}" for b, ms in r.get("first_forward_ms", {}).items())
        probe = r.get("probe")
        probe_s = "-" if not probe else (f"b{probe['batch']}: {probe['first_ms']:.1f} / "
                                         f"{probe['steady_ms']:.1f} ({probe['ratio']:.2f}x)")
        lines.append(f"| {name} | {r.get('problems', '-')} | {r.get('jobs', '-')} | "
                     f"{r.get('workers', '-')} | {num(r.get('compile_seconds'))} | "
                     f"{num(r.get('tune_seconds'))} | {num(r.get('wall_seconds'))} | "
                     f"{firsts or '-'} | {probe_s} |")
        if r.get("errors"):
            lines += [f"- {name} compile error: {e[:200]}" for e in r["errors"][:5]]
    return lines + [""]


def _train_ops_md(report: Dict[str, Any]) -> List[str]:
    """benchmarks/bench_train_ops.py's pytest-benchmark JSON: per BN shape and layout, stock vs
    fused bn_act_train (ms) and the fused op's bandwidth on the bytes it must move against what
    x.clone() reaches on the same tensor."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for b in report.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "shape" not in e:
            continue
        key = (e.get("dtype"), "x".join(map(str, e["shape"])), e.get("layout"))
        rows.setdefault(key, {})[(e["provider"], e.get("backward"))] = e
    lines = ["## Training BatchNorm op: bn_act_train vs stock BN + add + ReLU", "",
             "| dtype | shape | layout | stock fwd ms | fused fwd ms | stock fwd+bwd ms | "
             "fused fwd+bwd ms | fused fwd GB/s | fused fwd+bwd GB/s | copy GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r, key):
        v = r.get(key, {}).get("device_median_ms")
        return "-" if v is None else f"{v:.3f}"

    def gbps(r, key):
        v = r.get(key, {}).get("gbps_min_traffic")
        return "-" if v is None else f"{v:.0f}"
    for (dtype, shape, layout), r in rows.items():
        fwd, both = ("fused", False), ("fused", True)
        lines.append(f"| {dtype} | {shape} | {layout} | {ms(r, ('stock', False))} | {ms(r, fwd)} | "
                     f"{ms(r, ('stock', True))} | {ms(r, both)} | {gbps(r, fwd)} | "
                     f"{gbps(r, both)} | {gbps(r, ('copy', False))} |")
    return lines + [""] if rows else []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--env")
    ap.add_argument("--steps")
    ap.add_argument("--tests")
    ap.add_argument("--bench", nargs="*", default=[])
    ap.add_argument("--profile", nargs="*", default=[])
    ap.add_argument("--check")
    ap.add_argument("--train-ops", help="benchmarks/bench_train_ops.py --benchmark-json output")
    ap.add_argument("--warmup", nargs="*", default=[], help="NAME=PATH of warmup --json reports")
    ap.add_argument("--train-memory", help="the folder benchmarks/train_memory.py wrote to")
    args = ap.parse_args()

    env = _load(args.env) or {}
    steps = _steps(args.steps)
    tests = _tests(args.tests)
    benches = [b for b in (_load(p) for p in args.bench) if b]
    profiles = [p for p in (_load(p) for p in args.profile) if p]
    check = _load(args.check)
    train_ops = _load(args.train_ops)
    memory_dir = args.train_memory or ""
    train_memory = _load(os.path.join(memory_dir, "train_memory.json")) if memory_dir else None
    warmups = [(name, r) for name, r in ((a.split("=", 1)[0], _load(a.split("=", 1)[1]))
                                         for a in args.warmup if "=" in a) if r]
    merged = {"env": env, "steps": steps, "tests": tests, "bench": benches,
              "warmup": dict(warmups),
              "profiles": profiles, "train_ops": train_ops, "train_memory": train_memory,
              "check": None if check is None else {"meta": check["meta"],
                                                   "summary": check["summary"]}}
    with open(args.out + ".json", "w") as f:
        json.dump(merged, f, indent=1)

    md = [f"# GPU suite: {env.get('gpu', '?')}, {env.get('date', '?')}", "",
          f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA "
          f"{env.get('cuda', '?')}, driver {env.get('driver', '?')}, python "
          f"{env.get('python', '?')}; git {env.get('git', '?')}", "",
          "All numbers below were measured in this run by benchmarks/gpu_suite.sh.", "",
          "## Steps", "", "| step | status | seconds | limit s |", "|---|---|---:|---:|"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} |"
           for s in steps]
    md.append("")
    if tests:
        md += ["## Tests", "", f"{tests['passed']} passed, {tests['failures']} failed, "
               f"{tests['errors']} errors, {tests['skipped']} skipped", ""]
        md += [f"- FAILED {t}" for t in tests["failed_tests"]]
        md.append("")
    if warmups:
        md += _warmup_md(warmups)
    if check:
        md += _check_md(check)
    for b in benches:
        md += _bench_md(b, _bench_title(b))
    for p in profiles:
        md += _profile_md(p)
    if train_ops:
        md += _train_ops_md(train_ops)
    if train_memory:  # train_memory.py's own table, one heading level down
        with open(os.path.join(memory_dir, "train_memory.md")) as f:
            md += ["#" + f.read().rstrip("\n"), ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
