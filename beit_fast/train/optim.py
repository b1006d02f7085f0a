"""Optimizer parameter groups and per-step schedules, as the official BEiT code builds them."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..config.base import adamw_first_step  # noqa: F401 (the formula, where the configs validate lrs)

__all__ = [
    "param_groups_weight_decay", "cosine_scheduler", "warmup_cosine_schedule", "build_optimizer", "layer_id_for_vit",
    "param_groups_layer_decay", "apply_schedule", "adamw_first_step",
]

# timm-style exemption list: names whose parameters never decay under ``decay_mask_and_bias_table=False``.
_TIMM_EXTRA_NO_DECAY = ("mask_token", "relative_position_bias_table")


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, decay_mask_and_bias_table: bool = True, lr_scale: float = 1.0
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    The official rule: no decay for 1-D parameters, biases, and ``model.no_weight_decay()`` names
    (``pos_embed``, ``cls_token``). That rule decays ``mask_token`` ([1, 1, D]) and the relative position
    bias table (2-D); ``decay_mask_and_bias_table=False`` exempts them too, as timm does.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim == 1 or name.endswith(".bias") or name in skip
        if not decay_mask_and_bias_table and name.split(".")[-1] in _TIMM_EXTRA_NO_DECAY:
            exempt = True
        (no_decay if exempt else decay).append(param)
        (no_decay_names if exempt else decay_names).append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale, "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale, "param_names": no_decay_names},
    ]


def cosine_scheduler(
    base_value: float, final_value: float, epochs: int, niter_per_ep: int,
    warmup_epochs: int = 0, start_warmup_value: float = 0.0, warmup_steps: int = -1,
) -> np.ndarray:
    """Per-step values: linear warmup from ``start_warmup_value`` then cosine from ``base_value`` to
    ``final_value``; ``float64[epochs * niter_per_ep]``. ``warmup_steps > 0`` overrides ``warmup_epochs``."""
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    n = total - warmup_iters
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(n, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def warmup_cosine_schedule(
    base_value: float, total_steps: int, warmup_steps: int, final_ratio: float = 0.1,
) -> np.ndarray:
    """Per-step values ``float64[total_steps]`` of the dVAE tokenizer's schedule: a linear warm-up
    ``base_value * (t + 1) / warmup_steps`` that reaches ``base_value`` at its last step, then a cosine from
    ``base_value`` towards ``final_ratio * base_value`` (reached one step after the end).

    :func:`cosine_scheduler` with ``start_warmup_value = base_value / warmup_steps`` has the same shape but
    evaluates it in another order (``np.linspace``, numpy's cosine), which differs in the last bits; this
    evaluates each step in Python floats, in the order the tokenizer trainer always has, so its runs keep
    their exact learning rates (and weights)."""
    values = []
    for step in range(total_steps):
        if step < warmup_steps:
            values.append(base_value * (step + 1) / warmup_steps)
        else:
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            values.append(base_value * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))))
    return np.array(values, dtype=np.float64)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, decay_mask_and_bias_table: bool = True, fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the official parameter groups; ``fused`` defaults to True when the model is on CUDA."""
    groups = param_groups_weight_decay(model, weight_decay, decay_mask_and_bias_table)
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer of a parameter for layer-wise lr decay (official ``get_num_layer_for_vit``).

    ``cls_token``, ``mask_token``, ``pos_embed`` and ``patch_embed.*``: 0; ``blocks.{i}.*``: i + 1;
    ``rel_pos_bias.*`` (the shared table) and everything else (``norm``, ``fc_norm``, ``head``):
    ``num_layers + 1``. (The official code returns ``num_max_layer - 1`` for both, with
    ``num_max_layer = num_layers + 2``.)
    """
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers + 1
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float, no_weight_decay=(), *, layer_id=None,
) -> list[dict]:
    """Parameter groups for fine-tuning with layer-wise lr decay (official ``get_parameter_groups``).

    One group per (layer, decay / no_decay), in order of first appearance, each
    ``{"params", "weight_decay", "lr_scale", "layer_id", "param_names"}`` with
    ``lr_scale = layer_decay ** (L + 1 - layer_id)`` (L = ``model.get_num_layers()``, else the number of
    ``blocks``) and ``layer_id`` from :func:`layer_id_for_vit`. Weight decay 0 for 1-D parameters, names
    ending in ``.bias``, ``model.no_weight_decay()`` and the names in ``no_weight_decay`` (exact names, as
    officially); everything else, including the relative position bias tables, decays (official default).
    Apply a schedule with :func:`apply_schedule`, which multiplies the lr by ``lr_scale``.
    ``layer_id``: ``(name, num_layers) -> layer`` in place of :func:`layer_id_for_vit` (a model whose trunk
    is under a prefix, e.g. the segmenter's ``backbone.``).
    """
    layer_id_fn = layer_id or layer_id_for_vit
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if hasattr(model, "get_num_layers"):
        num_layers = int(model.get_num_layers())
    else:
        num_layers = len(getattr(model, "blocks", ()))
    skip = set(no_weight_decay)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    groups: dict[tuple[int, str], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim == 1 or name.endswith(".bias") or name in skip
        layer = layer_id_fn(name, num_layers)
        key = (layer, "no_decay" if exempt else "decay")
        if key not in groups:
            groups[key] = {
                "params": [], "param_names": [], "weight_decay": 0.0 if exempt else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - layer), "layer_id": layer,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float | None = None) -> None:
    """Set the step's values on every group: ``lr * group["lr_scale"]`` (1 when absent) and, for the groups
    that decay (weight decay > 0 when first seen here), weight decay ``wd`` (None: unchanged)."""
    for group in optimizer.param_groups:
        if "_decays" not in group:
            group["_decays"] = group["weight_decay"] > 0
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if wd is not None and group["_decays"]:
            group["weight_decay"] = float(wd)
