"""Work-arounds for the Triton versions we support (3.6-3.8), each behind a self-check.

Each one probes the behaviour it fixes and patches only where the probe fails, so a Triton that
fixed the bug (or renamed the private function) is left untouched.
"""
from __future__ import annotations

import contextlib
import functools
import os


@contextlib.contextmanager
def interpreter_mode(interpret: bool):
    """Make triton.jit/autotune build an interpreted (or a compiled) kernel regardless of the
    environment at this moment, then restore it."""
    import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime") and hasattr(knobs.runtime, "scope"):
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            yield
        return
    old = os.environ.get("TRITON_INTERPRET")  # older Triton reads the variable directly
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _runtime_range_probe() -> bool:
    """True when an interpreted kernel can loop to a runtime bound (`range(0, n, 2)`)."""
    import torch
    import triton
    import triton.language as tl

    def probe(out_ptr, n):
        s = 0
        for _ in range(0, n, 2):
            s += 1
        tl.store(out_ptr, s)

    with interpreter_mode(True):
        kernel = triton.jit(probe)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        with interpreter_mode(True):
            kernel[(1,)](out, 5)
    except Exception as e:  # InterpreterError wrapping numpy's TypeError
        if "0-dimensional" in str(e) or isinstance(e.__cause__, TypeError):
            return False
        raise
    return int(out.item()) == 3


@functools.lru_cache(maxsize=None)
def fix_interpreter_scalar_index() -> bool:
    """triton 3.6's interpreter turns a scalar into an int with `int(array)` on a 1-element array,
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"),
    so every loop with a runtime bound fails. Triton 3.8 squeezes the array first; do the same.
    Returns whether runtime loop bounds work now."""
    if _runtime_range_probe():
        return True
    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return False  # another layout of the private module: nothing we know how to fix

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    return _runtime_range_probe()
