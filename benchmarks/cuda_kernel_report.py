"""Static report of the extension's CUDA kernels (csrc/cuda/), read from the built library with
cuobjdump, no GPU needed: per kernel and arch, registers, shared and local memory (local > 0
means spills), theoretical occupancy at the 256-thread blocks every kernel launches with, and the
widest global load and store in its SASS (128-bit = 16-byte vector access).

    python benchmarks/cuda_kernel_report.py [--out PATH.md]      (make cuda-report)

Achieved bandwidth needs a GPU: benchmarks/bench_train_ops.py's CUDA rows (GB/s of the bytes each
op must move) and the GPU suite's training step.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 256  # csrc/cuda/bn_act.cu: kThreads, and kTileC * kTileRows for the NHWC reductions
# Per SM: registers, threads, resident blocks, shared memory (bytes) -- sm_80 (A100), sm_90 (H100).
SM_LIMITS = {"sm_80": (65536, 2048, 32, 164 * 1024), "sm_90": (65536, 2048, 32, 228 * 1024)}


def find_cuobjdump() -> Optional[str]:
    """$CUDA_HOME/bin, PATH, or the copy triton ships."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for path in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if path and os.path.isfile(path):
            return path
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        return path if os.path.isfile(path) else None
    except ImportError:
        return None


def library() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "resnet_fused",
                                          f"_C.cpython-{sys.version_info[0]}"
                                          f"{sys.version_info[1]}-*.so")))
    if not found:
        raise SystemExit("no built extension for this Python in resnet_fused/ (run make)")
    return found[0]


def _demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def _short(name: str) -> str:
    """`partial_nhwc_kernel<GradSumOp<Half>>`-style names without namespaces and arguments."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\([^()]*\)$", "", name)  # the argument list
    name = re.sub(r"\b(resnet_fused|c10|at)::", "", name)
    return re.sub(r"^void ", "", name)


def occupancy(arch: str, regs: int, shared: int) -> float:
    """Theoretical occupancy (resident warps / max warps) of THREADS-thread blocks."""
    max_regs, max_threads, max_blocks, max_shared = SM_LIMITS[arch]
    per_block_regs = ((regs * 32 + 255) // 256 * 256) * (THREADS // 32)  # 256-register units
    blocks = min(max_blocks, max_threads // THREADS,
                 max_regs // per_block_regs if per_block_regs else max_blocks,
                 max_shared // shared if shared else max_blocks)
    return blocks * THREADS / max_threads


def collect(lib: str, cuobjdump: str) -> List[Dict]:
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True,
                          check=True).stdout
    rows, arch, fn = [], None, None
    for line in usage.splitlines():
        m = re.match(r"arch = (sm_\d+)", line.strip())
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn and arch in SM_LIMITS:
            regs, stack, shared, local = map(int, m.groups())
            rows.append({"arch": arch, "mangled": fn, "regs": regs, "stack": stack,
                         "shared": shared, "local": local,
                         "occupancy": occupancy(arch, regs, shared)})
    # widest global load/store per (arch, function) from the SASS
    widths: Dict[tuple, Dict[str, int]] = {}
    arch = fn = None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
        for kind, width in re.findall(r"\b(LDG|STG)\.E(?:\.(128|64|U16|U8|S16|S8))?", line):
            bits = int(width) if width in ("128", "64") else 16 if width in ("U16", "S16") \
                else 8 if width in ("U8", "S8") else 32
            w = widths.setdefault((arch, fn), {})
            w[kind] = max(w.get(kind, 0), bits)
    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        w = widths.get((r["arch"], r["mangled"]), {})
        r["name"] = _short(names[r["mangled"]])
        r["load_bits"], r["store_bits"] = w.get("LDG", 0), w.get("STG", 0)
    rows.sort(key=lambda r: (r["arch"], r["name"]))
    return rows


def markdown(rows: List[Dict], lib: str) -> str:
    lines = ["# CUDA kernels of the extension: static report", "",
             f"`python benchmarks/cuda_kernel_report.py` on `{os.path.basename(lib)}` "
             f"({THREADS}-thread blocks; occupancy is theoretical: resident warps / 64).", "",
             "| arch | kernel | regs | shared B | local B | stack B | occupancy | widest load | "
             "widest store |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | `{r['name']}` | {r['regs']} | {r['shared']} | "
                     f"{r['local']} | {r['stack']} | {r['occupancy']:.0%} | {r['load_bits']} bit | "
                     f"{r['store_bits']} bit |")
    spills = [r["name"] for r in rows if r["local"]]
    stack = [r["name"] for r in rows if r["stack"]]
    lines += ["", f"{len(rows)} kernels; local memory (register spills) in {len(spills)}"
              f"{': ' + ', '.join(spills) if spills else ''}; a stack frame in {len(stack)}"
              f"{': ' + ', '.join(stack) if stack else ''}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown report here (default: print it)")
    args = p.parse_args(argv)
    tool = find_cuobjdump()
    if tool is None:
        raise SystemExit("no cuobjdump ($CUDA_HOME/bin, PATH or triton's)")
    lib = library()
    report = markdown(collect(lib, tool), lib)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        print(f"wrote {args.out}")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
