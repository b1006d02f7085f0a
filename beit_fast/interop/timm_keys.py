"""Official <-> timm ``Beit`` key names (the same names, less the buffers and heads timm does not have)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .formats import StateDict, detect_format
from .official_keys import _add_index, _official_order

def official_to_timm(state_dict: Mapping[str, torch.Tensor], drop_mim_head: bool = False) -> StateDict:
    """Official names -> timm ``Beit`` (drops the ``relative_position_index`` buffers timm does not save).

    timm's ``Beit`` is a classifier/backbone: it has no ``mask_token`` and no ``lm_head``. A pretraining
    state dict raises unless ``drop_mim_head=True``, which removes both (lossy: the result is the
    pretrained backbone; build timm's model with ``use_shared_rel_pos_bias=True``, ``use_fc_norm=False``,
    ``num_classes=0``, see ``timm_kwargs_from_state_dict``).
    """
    src = detect_format(state_dict)
    if src not in ("official", "timm"):
        raise ValueError(f"official_to_timm expects official key names, got a {src!r} state dict")
    mim = [k for k in ("mask_token", "lm_head.weight", "lm_head.bias") if k in state_dict]
    if mim and not drop_mim_head:
        raise ValueError(
            f"timm's Beit has no mask token and no MIM head, so {mim} cannot be converted; pass "
            "drop_mim_head=True (CLI: --drop-mim-head) to keep only the backbone"
        )
    return {k: v for k, v in state_dict.items()
            if not k.endswith("relative_position_index") and k not in ("mask_token", "lm_head.weight", "lm_head.bias")}


def timm_to_official(
    state_dict: Mapping[str, torch.Tensor], with_index: bool = True, grid: tuple[int, int] | None = None
) -> StateDict:
    """timm ``Beit`` -> official names: the same names, plus the ``relative_position_index`` buffers the
    official fine-tuning model saves (``with_index``; the window is read off each table's row count,
    square grids only unless ``grid=(H, W)`` is given)."""
    src = detect_format(state_dict)
    if src not in ("timm", "official"):
        raise ValueError(f"timm_to_official expects timm key names, got a {src!r} state dict")
    out = dict(state_dict)
    return _add_index(out, grid) if with_index else _official_order(out)
