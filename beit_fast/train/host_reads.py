"""The one place where the training loop reads device values on the host.

Reading a CUDA tensor on the host (``.item()``, ``.tolist()``, ``bool(t)``) waits for every kernel queued
before it: the GPU's queue drains and any stall of the host (a late batch, a log write) then idles the GPU.
The engine, the meters and the loop read device values only through :func:`values` and :func:`tensor`, so a
run's host reads can be counted (:func:`count`): a ``"device"`` engine makes none between logging
intervals (a test counts them per step).
"""
from __future__ import annotations

import torch

__all__ = ["values", "tensor", "count"]

_reads = 0


def values(t: torch.Tensor):
    """``t.tolist()`` (a Python number for a 0-dim tensor, nested lists otherwise): one host read."""
    global _reads
    _reads += 1
    return t.tolist()


def tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to host memory: one host read."""
    global _reads
    _reads += 1
    return t.cpu()


def count() -> int:
    """Host reads made through this module so far (in this process)."""
    return _reads
