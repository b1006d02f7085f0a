"""Mixed precision: the one autocast context every stage uses."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_or_null"]

def autocast_or_null(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)`` for a low-precision ``dtype``; float32: autocast off (fp32
    compute, which ``torch.autocast(dtype=float32)`` also falls back to, but only after a warning that it
    does not support that dtype); None: no context at all (whatever the caller set up applies)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)

