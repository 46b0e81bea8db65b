"""resnet_fused: a drop-in torchvision ResNet whose conv->BN(->add)->ReLU chains run as fused
kernels. Its logger, "resnet_fused", reports backend fallbacks, tuning and per-layer choices and
fold-cache rebuilds (debug/info; a NullHandler keeps it silent until the application configures
logging)."""
import logging as _logging

from . import ops
from .backends import BackendUnavailableError, backend, get_backend, set_backend
from .cuda_graphs import cuda_graphs
from .fold import clear_cache as clear_fold_cache
from .fuse import fuse
from .models import *  # noqa: F401,F403
from .models import __all__ as _models
from .warm_start import warmup

_logging.getLogger("resnet_fused").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["ops", "fuse", "backend", "set_backend", "get_backend", "BackendUnavailableError",
           "clear_fold_cache", "cuda_graphs", "warmup", *_models]
