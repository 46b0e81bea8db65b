"""Ahead-of-time compilation of the conv kernel, with no GPU and in parallel.

`triton.compile(ASTSource(...), target=GPUTarget(...))` runs the whole compiler (TTIR -> PTX ->
cubin) on the CPU. The source built here carries exactly the signature and specialisation that
triton.jit derives at a launch with the same arguments (taken from the JIT's own binder; a
derivation from public facts is the fallback; tests/test_triton_compile.py checks both), so a
kernel compiled here lands in Triton's on-disk cache under the key the JIT looks up later: the
launch then loads a cubin instead of compiling. Compilation is CPU-bound, so `compile_all` spreads
jobs over worker processes (`spawn`: safe after CUDA was initialised).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import conv

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
        torch.int32: "*i32"}


class Job(NamedTuple):
    """One kernel to compile: plain data, so it pickles to a worker process."""
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[Tuple[int, ...], List]
    capability: int      # 90 for sm_90
    num_warps: int
    num_stages: int


def jobs(args: Dict, config: Sequence[int], capability: int) -> List[Job]:
    """Every kernel the launches of `config` on `args` compile (conv.launches: the main one, and
    split-K's reduction and the NaN/Inf fix-up where the config needs them)."""
    return [_job(kwargs, capability) for _, kwargs in conv.launches(args, config)]


def job(args: Dict, config: Sequence[int], capability: int) -> Job:
    """The compile job of the first launch of `config` on kernel arguments `args`
    (conv.kernel_args; tensors may be on the meta device), specialised exactly as triton.jit
    specialises that launch."""
    return jobs(args, config, capability)[0]


def _job(kwargs: Dict, capability: int) -> Job:
    values = dict(kwargs)
    warps, stages = values.pop("num_warps"), values.pop("num_stages")
    try:
        spec = _jit_specialisation(values, capability, warps, stages)
    except Exception:  # Triton's internals moved: same code, but possibly another cache key
        spec = _derived_specialisation(values)
    return Job(*spec, capability, warps, stages)


def _jit_specialisation(values: Dict, capability: int, warps: int, stages: int):
    """(signature, constexprs, attrs) from triton.jit's own binder and argument packing, the
    steps of JITFunction.run before it compiles (private API: the cache key must match what the
    JIT computes bit for bit, and the attribute lists differ between Triton versions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as triton_jit
    kernel = conv.jit_kernel(False)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    options = {"num_warps": warps, "num_stages": stages}
    bound, specialization, parsed = binder(**values, **options)
    _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization,
                                                        parsed)
    return dict(signature), dict(constexprs), dict(attrs)


def _derived_specialisation(values: Dict):
    """The same specialisation from public facts: 16-byte aligned pointers, ints divisible by 16,
    ints equal to 1 as constants, NOT_SPECIALISED left alone."""
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[Tuple[int, ...], List] = {}
    for i, param in enumerate(conv.jit_kernel(False).params):
        name, value = param.name, values[param.name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif type(value).__name__ == "TensorDescriptor":
            block = ", ".join(map(str, value.block_shape))
            signature[name] = f"tensordesc<{_PTR[value.base.dtype][1:]}[{block}]>"
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: unexpected kernel argument {value!r}")
        elif name in conv.NOT_SPECIALISED:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def source(j: Job):
    from triton.compiler import ASTSource
    return ASTSource(conv.jit_kernel(False), j.signature, j.constexprs, j.attrs)


def compile_job(j: Job):
    """Compile one job (lands in Triton's cache); returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    return triton.compile(source(j), target=GPUTarget("cuda", j.capability, 32),
                          options={"num_warps": j.num_warps, "num_stages": j.num_stages})


def _compile_in_worker(j: Job) -> Optional[str]:
    try:
        compile_job(j)
    except Exception as e:  # reported by the parent; the JIT would raise the same at launch
        return f"{type(e).__name__}: {e}"
    return None


def _key(j: Job) -> str:
    return repr((sorted(j.signature.items()), sorted(j.constexprs.items()),
                 sorted(j.attrs.items()), j.capability, j.num_warps, j.num_stages))


# A job that takes less than this in-process was a cache hit: a warm cache needs no workers.
_HIT_SECONDS = 0.2


def compile_all(jobs: Sequence[Job], workers: Optional[int] = None) -> Dict[str, Any]:
    """Compile every distinct job, `workers` processes at a time (default: one per core).
    Jobs run in this process while they are cache hits (a warm start spawns nothing); from the
    first miss on, the rest go to the worker pool. Returns {"jobs": distinct jobs, "workers",
    "in_process": jobs done here, "seconds", "errors": [messages]}."""
    distinct = list({_key(j): j for j in jobs}.values())
    workers = max(1, min(workers or os.cpu_count() or 1, len(distinct) or 1))
    start = time.perf_counter()
    errors: List[Optional[str]] = []
    done = 0
    for j in distinct:
        t0 = time.perf_counter()
        errors.append(_compile_in_worker(j))
        done += 1
        # (the first job also pays for setting up Triton's compiler: judge from the second)
        if workers > 1 and done > 1 and time.perf_counter() - t0 > _HIT_SECONDS:
            break  # a miss: the cache is cold, compile the rest in parallel
    rest = distinct[done:]
    if rest and workers == 1:
        errors += [_compile_in_worker(j) for j in rest]
    elif rest:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            errors += list(pool.map(_compile_in_worker, rest))
    return {"jobs": len(distinct), "workers": workers, "in_process": done,
            "seconds": time.perf_counter() - start, "errors": [e for e in errors if e]}
