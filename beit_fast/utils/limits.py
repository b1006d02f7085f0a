"""What a file may claim: checks run before anything is allocated from a file's shapes or configs.

A file is a few bytes that *describe* tensors and models; the package allocates from those descriptions. So
every reader checks the description against two bounds before it allocates:

* **what the file holds** - :func:`check_tensors_hold_their_bytes`: every tensor is backed by its own bytes
  (no stride-0 / overlapping views that claim gigabytes on a few bytes of storage) and all of them together
  fit in the file; :func:`check_parameter_budget`: a model built from the file's config has no more
  parameters than the file's weights (times a small factor, plus :data:`PARAMETER_ALLOWANCE` for heads the
  file does not carry);
* **sane limits** - :func:`check_config_limits`: each architecture field of a config read from a file
  (:data:`BEIT_LIMITS`, :data:`DVAE_LIMITS`, :data:`DALLE_LIMITS`) within a documented maximum.

Errors are ``ValueError`` naming the file and the field.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

__all__ = ["BEIT_LIMITS", "DVAE_LIMITS", "DALLE_LIMITS", "PARAMETER_ALLOWANCE", "check_config_limits",
           "check_tensors_hold_their_bytes", "check_parameter_budget", "check_beit_config", "tensor_layout_problem", "beit_parameter_count"]

#: Largest value of each BEiT architecture field read from a file (a checkpoint's ``model_config``).
BEIT_LIMITS: dict[str, float] = {"img_size": 4096, "patch_size": 256, "in_chans": 16, "vocab_size": 2**20,
                                 "embed_dim": 8192, "depth": 256, "num_heads": 256, "mlp_ratio": 16}
#: Largest value of each dVAE config field read from a tokenizer file.
DVAE_LIMITS: dict[str, float] = {"vocab_size": 2**20, "code_dim": 8192, "hidden": 4096, "num_res_blocks": 64,
                                 "input_size": 4096}
#: Largest DALL-E encoder dimensions read off a state dict's shapes (the released encoder: 4, 256, 2, 8192).
DALLE_LIMITS: dict[str, float] = {"group_count": 8, "n_hid": 4096, "n_blk_per_group": 16, "input_channels": 16,
                                  "vocab_size": 2**20}
#: Parameters a model built from a file may have beyond twice the file's own (a new classification head).
PARAMETER_ALLOWANCE = 2**24


def check_config_limits(config: Mapping[str, Any], limits: Mapping[str, float], where: str) -> None:
    """``ValueError`` naming ``where`` and the field if a field of ``config`` in ``limits`` is not a finite
    positive number within its limit (fields that ``config`` lacks are not checked)."""
    for name, limit in limits.items():
        if name not in config:
            continue
        value = config[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok or value > limit:
            raise ValueError(f"{where}: {name} {value!r} is {'beyond the limit ' + format(limit, 'g') if ok else 'not a positive number'}"
                             f" (a file that claims more than any model this package builds; refused before "
                             "allocating it)")


def tensor_layout_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` claims more elements than its storage holds (stride 0, overlapping strides, or a view past
    its storage's end), or None. Dense, permuted and sliced tensors pass."""
    if t.numel() == 0:
        return None
    dims = sorted(((st, n) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda d: d[0])
    reach = 1  # elements spanned by the dimensions so far
    for st, n in dims:
        if st < reach:
            return "stride 0" if st == 0 else "overlapping strides"
        reach = st * (n - 1) + reach
    end = (t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    if end > t.untyped_storage().nbytes():
        return "a view past the end of its storage"
    return None


def check_tensors_hold_their_bytes(tensors: Mapping[str, Any], where: str, file_bytes: int | None = None) -> int:
    """Every tensor of ``tensors`` is backed by its own bytes (:func:`tensor_layout_problem`), and their
    bytes together are at most ``file_bytes`` (when given). Returns that total; ``ValueError`` naming
    ``where`` and the tensor otherwise."""
    total = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        problem = tensor_layout_problem(t)
        if problem is not None:
            raise ValueError(f"{where}: tensor {name} of shape {tuple(t.shape)} has {problem}: it claims more "
                             "elements than its storage holds (refused before building anything from it)")
        total += t.numel() * t.element_size()
    if file_bytes is not None and total > file_bytes:
        raise ValueError(f"{where}: its tensors claim {total} bytes but the file holds {file_bytes}")
    return total


def check_parameter_budget(claimed: int, tensors: Iterable[Any], where: str) -> None:
    """``ValueError`` if a model of ``claimed`` parameters, built from a file's config, would be larger than
    twice the elements of the file's tensors plus :data:`PARAMETER_ALLOWANCE`."""
    held = sum(int(t.numel()) for t in tensors if isinstance(t, torch.Tensor))
    if claimed > 2 * held + PARAMETER_ALLOWANCE:
        raise ValueError(f"{where}: its config describes a model of {claimed:,} parameters but the file holds "
                         f"{held:,} weights (refused before allocating the model)")


def check_beit_config(config: Mapping[str, Any], weights: Iterable[Any], where: str) -> None:
    """A BEiT ``model_config`` read from a file: fields within :data:`BEIT_LIMITS` and a model not much
    larger than the file's ``weights`` (:func:`check_parameter_budget`); ``ValueError`` naming ``where``."""
    check_config_limits(config, BEIT_LIMITS, f"{where}: model_config")
    check_parameter_budget(beit_parameter_count(config), weights, where)


def beit_parameter_count(config: Mapping[str, Any]) -> int:
    """About how many parameters a BEiT backbone of ``config`` has (blocks, embeddings, LM head)."""
    d, depth = int(config.get("embed_dim", 768)), int(config.get("depth", 12))
    ratio = float(config.get("mlp_ratio", 4.0))
    patch, chans = int(config.get("patch_size", 16)), int(config.get("in_chans", 3))
    grid = int(config.get("img_size", 224)) // max(patch, 1)
    return int(depth * (4 + 2 * ratio) * d * d + patch * patch * chans * d + (grid * grid + 1) * d
               + int(config.get("vocab_size", 0)) * d)
