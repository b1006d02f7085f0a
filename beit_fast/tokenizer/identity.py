"""The identity of a tokenizer's weights: what a pretraining checkpoint records, so that resuming with other
weights (a retrained file at the same path, another file) is noticed instead of silently changing the targets."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["weights_sha256"]


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: each entry's name, dtype, shape and bytes, in name order. The
    same weights give the same hash whatever file format (or device) they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        shape = tuple(t.shape)
        t = t.detach().to("cpu").contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{shape}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
