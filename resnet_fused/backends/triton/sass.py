"""What a compiled kernel is made of, read from its PTX and cubin without a GPU: registers, spills,
shared memory, MMA kind, TMA, cp.async widths, and the SASS instructions of its main loop.

The tools are CUDA's cuobjdump and nvdisasm: the copies Triton bundles (triton/backends/nvidia/bin),
else $CUDA_HOME/bin, else PATH. Used by the static kernel report (tools/kernels.py) and the AOT
compile tests.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, NamedTuple, Optional


@functools.lru_cache(maxsize=None)
def tool(name: str) -> Optional[str]:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm), or None."""
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    cand = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    if cand.exists():
        return str(cand)
    return shutil.which(name)


def _run_on_cubin(tool_name: str, flags, cubin: bytes) -> str:
    path = tool(tool_name)
    if path is None:
        raise FileNotFoundError(f"{tool_name} not found (Triton's bundled copy, $CUDA_HOME/bin or "
                                f"PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *flags, f.name], capture_output=True, text=True,
                              timeout=120, check=True).stdout


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / LOCAL / SHARED of the kernel (`cuobjdump -res-usage`)."""
    text = _run_on_cubin("cuobjdump", ["-res-usage"], cubin)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}


def spill_bytes(usage: Dict[str, int]) -> int:
    """Local + stack bytes per thread: register spills (and anything else put in local memory)."""
    return usage.get("LOCAL", 0) + usage.get("STACK", 0)


def mma_kind(ptx: str) -> str:
    """wgmma (Hopper warpgroup MMA), mma.sync (Ampere-style tensor cores) or fma (none)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


def uses_tma(ptx: str) -> bool:
    """Whether the kernel moves tiles with the Tensor Memory Accelerator (Hopper)."""
    return "cp.async.bulk.tensor" in ptx


def cp_async_widths(ptx: str) -> str:
    """global -> shared cp.async copies by width, e.g. '48x16B' ('-' for none)."""
    widths = Counter(int(w, 16) for w in re.findall(
        r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)? \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+)",
        ptx))
    return " ".join(f"{n}x{w}B" for w, n in sorted(widths.items(), reverse=True)) or "-"


class Loop(NamedTuple):
    instructions: int    # SASS instructions per K iteration (per warp)
    mma: int             # tensor-core instructions among them (HGMMA / HMMA)
    unrolled: bool       # the compiler unrolled the K loop completely (short constant trip count)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")


def main_loop(cubin: bytes, iterations: Optional[int] = None) -> Optional[Loop]:
    """The innermost loop that issues tensor-core MMAs (the K loop), from `nvdisasm` of the cubin:
    a loop is a backward branch to a label; its body is every instruction from the label to the
    branch, and one body executes per K iteration, so its length is the SASS instructions per warp
    per K iteration. Where the compiler unrolled a short K loop completely (no loop issues MMAs)
    and the kernel's K `iterations` are given: the instructions from the first MMA to the last,
    per iteration after the first (the same measure, spread over the unrolled copies). None when
    neither applies."""
    labels: Dict[str, int] = {}
    instrs = []                                   # (address, text)
    pending = []
    for line in _run_on_cubin("nvdisasm", ["-c"], cubin).splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    best: Optional[Loop] = None
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        start = labels[m.group(1)]
        body = [t for a, t in instrs if start <= a <= addr]
        n_mma = sum(1 for t in body if _MMA.search(t))
        if n_mma and (best is None or len(body) < best.instructions):
            best = Loop(len(body), n_mma, False)
    mma_at = [i for i, (_, t) in enumerate(instrs) if _MMA.search(t)]
    if best is None and iterations and iterations > 1 and mma_at:
        span = mma_at[-1] - mma_at[0]
        best = Loop(round(span / (iterations - 1)), round(len(mma_at) / iterations), True)
    return best
