"""Tuning decisions: measured once per problem bucket, kept in memory and on disk.

Two kinds of decision share this store, both made on CUDA only:
  which Triton tile config runs a conv problem        (backends/triton/conv.py)
  which backend per-layer `auto` runs it on, triton or cuda (backends/triton/__init__.py)

Keys hold shape *buckets*: the GEMM row count M = N*OH*OW rounded up to a power of two. A batch
size never seen before but inside a tuned bucket runs at once: nothing is timed, and nothing is
compiled either (M is not a specialised kernel argument). Caches grow with buckets, not shapes.

$RESNET_FUSED_TUNING:
  measure  (default) time the candidates the first time a bucket is seen; remember, persist.
  cached   never time at run time: a remembered decision, else a heuristic (not remembered).
           For latency-critical serving after `python -m resnet_fused warmup`.

On disk: $RESNET_FUSED_CACHE_DIR (default $XDG_CACHE_HOME/resnet_fused, else ~/.cache/resnet_fused),
one JSON file per fingerprint (GPU name and capability, torch/CUDA/cuDNN/triton/package versions,
a hash of the kernel source and its config lists). A file that does not parse, or whose
fingerprint is not this process's, is ignored with a warning, never trusted; a remembered value
the caller no longer offers as a candidate is measured again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, TypeVar

import torch

from .settings import env_choice

logger = logging.getLogger("resnet_fused")

T = TypeVar("T", bound=Hashable)
MODE_ENV = "RESNET_FUSED_TUNING"
DIR_ENV = "RESNET_FUSED_CACHE_DIR"
MODES = ("measure", "cached")
_KERNEL_SOURCE = Path(__file__).resolve().parent / "backends" / "triton" / "conv.py"


def bucket(m: int) -> int:
    """M rounded up to a power of two (the unit of every tuning decision)."""
    return 1 << max(0, int(m) - 1).bit_length()


def mode() -> str:
    return env_choice(MODE_ENV, MODES, "measure")


def cache_dir() -> Path:
    explicit = os.environ.get(DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "resnet_fused"


def fingerprint(device: torch.device) -> Dict[str, Any]:
    """Everything a measured decision depends on besides the problem itself."""
    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # no triton: only backend decisions could exist, keyed without it
        triton_version = None
    on_gpu = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if on_gpu else device.type,
        "capability": list(torch.cuda.get_device_capability(device)) if on_gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "triton": triton_version,
        "resnet_fused": __version__,
        "kernel": hashlib.sha256(_KERNEL_SOURCE.read_bytes()).hexdigest()[:16],
    }


def _to_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class Store:
    """The decisions for one device fingerprint, backed by one JSON file."""

    def __init__(self, fp: Dict[str, Any], directory: Path):
        self.fingerprint = fp
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        self.path = directory / f"tuning-{digest}.json"
        self.decisions: Dict[str, Any] = self._read()

    def _read(self) -> Dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"resnet_fused: cannot read tuning cache {self.path} ({e}); ignoring it")
            return {}
        try:
            data = json.loads(text)
            fp, decisions = data["fingerprint"], data["decisions"]
            if not isinstance(decisions, dict):
                raise TypeError("decisions is not an object")
        except Exception as e:
            warnings.warn(f"resnet_fused: ignoring corrupt tuning cache {self.path} "
                          f"({type(e).__name__}: {e})")
            return {}
        if fp != self.fingerprint:
            warnings.warn(f"resnet_fused: ignoring tuning cache {self.path}: made for {fp}, this "
                          f"process is {self.fingerprint}")
            return {}
        return {k: _from_json(v) for k, v in decisions.items()}

    def get(self, key: str) -> Any:
        return self.decisions.get(key)

    def put(self, key: str, value: Any) -> None:
        """Remember, and write the file (merged with what other processes wrote meanwhile)."""
        self.decisions[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            on_disk = {}
            if self.path.exists():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    on_disk = self._read()
            merged = {**on_disk, **self.decisions}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint,
                                       "decisions": {k: _to_json(v) for k, v in merged.items()}},
                                      indent=0, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except OSError as e:  # read-only home, full disk: keep tuning in memory only
            warnings.warn(f"resnet_fused: cannot write tuning cache {self.path} ({e}); decisions "
                          f"stay in this process")


_stores: Dict[Any, Store] = {}
_lock = threading.RLock()  # one measurement at a time; nested decisions (backend -> config) too


def store(device: torch.device) -> Store:
    """The store for `device` (a CUDA device; CPU tensors under the Triton interpreter get one
    too, for tests)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, str(cache_dir()))
    found = _stores.get(key)
    if found is None:
        with _lock:
            found = _stores.get(key)
            if found is None:
                found = _stores[key] = Store(fingerprint(device), cache_dir())
    return found


def clear() -> None:
    """Forget the in-memory decisions (the files stay; the next decision reads them again)."""
    with _lock:
        _stores.clear()


def decide(device: torch.device, key: str, candidates: Sequence[T],
           measure: Callable[[T], float], heuristic: Callable[[], T]) -> T:
    """The remembered choice for `key` among `candidates`; on a miss, time each with `measure`
    (milliseconds) and remember the fastest, unless tuning is off (mode `cached`) or a CUDA
    graph is being captured (nothing can be timed then): the heuristic, not remembered."""
    if len(candidates) == 1:
        return candidates[0]
    s = store(device)
    value = s.get(key)
    if value is not None and value in candidates:
        return value
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    if mode() == "cached" or capturing:
        return heuristic()
    with _lock:
        value = s.get(key)
        if value is not None and value in candidates:
            return value  # another thread measured it meanwhile
        times = {c: measure(c) for c in candidates}
        best = min(candidates, key=lambda c: times[c])
        s.put(key, best)
        logger.info("tuned %s: %s (%s)", key, best,
                    ", ".join(f"{c}: {t:.3f} ms" for c, t in times.items()))
    return best


def decisions(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """What has been decided so far on `device` (default: the current CUDA device)."""
    return dict(store(torch.device("cuda") if device is None else device).decisions)
