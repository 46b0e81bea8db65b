"""Argument types shared by the command-line tools: a bad value is one clear argparse error
(exit status 2), never a traceback. DTYPES is the one name -> dtype map of the tools."""
from __future__ import annotations

import argparse
from typing import Dict, Iterable

import torch

from ..models import __all__ as _models

BUILDERS = tuple(name for name in _models if name[0].islower())  # resnet18 ... wide_resnet101_2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}


def dtype_names(dtypes: Iterable[torch.dtype]) -> Dict[str, torch.dtype]:
    """The part of DTYPES whose dtypes are among `dtypes` (in DTYPES' order)."""
    dtypes = tuple(dtypes)
    return {name: dtype for name, dtype in DTYPES.items() if dtype in dtypes}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def cuda_target(text: str) -> int:
    """sm_90 / sm90 / 90 -> 90 (compute capability x 10; the kernels need 8.0+)."""
    digits = text.lower().removeprefix("sm_").removeprefix("sm")
    if not digits.isdigit() or int(digits) < 80:
        raise argparse.ArgumentTypeError(f"expected a CUDA architecture such as sm_90 or sm_80 "
                                         f"(the kernels need 8.0+), got {text!r}")
    return int(digits)


def device(text: str) -> str:
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no CUDA device is visible on this machine")
    return text


def add_arch(p: argparse.ArgumentParser, **kwargs) -> None:
    p.add_argument("--arch", choices=BUILDERS, metavar="ARCH",
                   help=f"a ResNet builder: {', '.join(BUILDERS)}", **kwargs)
