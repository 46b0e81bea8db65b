"""`python -m resnet_fused info`: versions, device, and which backends run here (and why not)."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from .. import backends
from . import cli


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [f"python       {platform.python_version()}",
             f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
             f"torchvision  {_version('torchvision')}",
             f"triton       {_version('triton')}"]
    if torch.cuda.is_available():
        devices = [torch.device("cuda"), torch.device("cpu")]
        cap = torch.cuda.get_device_capability()
        lines.append(f"device       cuda: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        devices = [torch.device("cpu")]
        lines.append("device       cpu only (no CUDA device visible)")
    from .. import extension
    lines.append(f"extension    {extension.status()}")
    try:
        selected = backends.get_backend()
    except ValueError as e:  # a bad $RESNET_FUSED_BACKEND: report it, as everything else here
        selected = f"invalid: {e}"
    lines.append(f"selected     {selected}  (set_backend(), backend(), ${backends.ENV_VAR})")
    from .. import tuning
    try:
        mode = tuning.mode()
    except ValueError as e:
        mode = f"invalid: {e}"
    lines.append(f"tuning       {mode} (${tuning.MODE_ENV}); decisions on disk in "
                 f"{tuning.cache_dir()} (${tuning.DIR_ENV})")
    from .. import training
    for device in devices:
        try:
            train = training.train_bn_report(device)
        except ValueError as e:
            train = f"invalid: {e}"
        lines.append(f"training on {device.type}: {train}")
        try:
            frozen = training.eval_grad_report(device)
        except ValueError as e:
            frozen = f"invalid: {e}"
        lines.append(f"eval with autograd on {device.type}: {frozen}")
    from .. import stage_recompute
    try:
        memory = stage_recompute.memory_report()
    except ValueError as e:
        memory = f"invalid: {e}"
    lines.append(f"training memory: {memory}")
    for device in devices:
        choice = backends.device_choice(device)
        fused = [n for n, d in cli.DTYPES.items()
                 if backends.auto_choice(device, d) != backends.MODULES]
        stock = [n for n in cli.DTYPES if n not in fused]
        lines.append(f"backends on {device.type}: auto -> {choice} for "
                     f"{', '.join(fused) or 'no dtype'}"
                     + (f"; stock modules for {', '.join(stock)}" if stock else ""))
        if device.type == "cpu" and choice == "onednn":
            from ..backends import onednn
            bf16 = onednn.bf16_unavailable_reason()
            lines.append("  onednn bf16: " + ("fused (native bf16)" if bf16 is None
                                              else f"stock ({bf16})"))
        for name in backends.NAMES[1:]:
            reason = backends.unavailable_reason(name, device)
            lines.append(f"  {name:7s} "
                         f"{'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
