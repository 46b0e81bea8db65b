"""What the builders' `weights=` accepts: a torchvision weights enum or its name (downloading is
torchvision's job), a state_dict, or a path to a saved state_dict."""
from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch


def _torchvision_weights(weights: Any, builder: str):
    """The torchvision enum member for `weights` (a member or its name), or None if it is
    not one."""
    try:
        from torchvision.models import get_model_weights
    except ImportError:
        return None
    enum_cls = get_model_weights(builder)
    if isinstance(weights, enum.Enum):
        if not isinstance(weights, enum_cls):
            raise ValueError(f"{builder}: expected weights of {enum_cls.__name__}, got "
                             f"{type(weights).__name__}.{weights.name}")
        return weights
    name = weights.split(".", 1)[1] if weights.startswith(enum_cls.__name__ + ".") else weights
    if name == "DEFAULT" or name in enum_cls.__members__:
        return enum_cls.verify(name)
    return None


def _unwrap(state: Any, where: str) -> Mapping:
    # Accept checkpoints that wrap the state_dict, as torch.save({"state_dict": ...}) often does.
    if (isinstance(state, Mapping) and "state_dict" in state
            and isinstance(state["state_dict"], Mapping)):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ValueError(f"{where} does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_weights(weights: Any, builder: str, progress: bool) -> Tuple[Mapping, Optional[int]]:
    """(state_dict, num_classes it implies or None) for a builder's `weights` argument."""
    num_classes = None
    if isinstance(weights, Mapping):
        state = _unwrap(weights, "weights")
    elif isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        state = _unwrap(torch.load(weights, map_location="cpu", weights_only=True),
                        f"file {os.fspath(weights)!r}")
    elif isinstance(weights, (str, enum.Enum)) and \
            (member := _torchvision_weights(weights, builder)) is not None:
        state = member.get_state_dict(progress=progress, check_hash=True)
        num_classes = len(member.meta["categories"])
    else:
        raise ValueError(f"{builder}: expected weights=None, a torchvision weights enum or its "
                         f"name, a state_dict or the path of a saved one; got {weights!r}")
    if num_classes is None and isinstance(state.get("fc.weight"), torch.Tensor):
        num_classes = state["fc.weight"].shape[0]
    return state, num_classes
