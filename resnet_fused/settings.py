"""The package's switches in the environment ($RESNET_FUSED_*): one reader, one error message."""
from __future__ import annotations

import os
from typing import Sequence


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """$name, lower-cased, one of `choices` (unset or empty: `default`); anything else raises a
    ValueError naming the variable, what it holds and what it may hold. Read on every call, so a
    change takes effect at once."""
    setting = os.environ.get(name, "").strip().lower() or default
    if setting not in choices:
        raise ValueError(f"${name}={setting!r}: expected one of {', '.join(choices)}")
    return setting
