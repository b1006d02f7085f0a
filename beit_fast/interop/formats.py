"""Which key-name family (``FORMATS``) and which layout (``LAYOUTS``) a BEiT state dict is in.

The formats are described in :mod:`beit_fast.interop.checkpoints`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

FORMATS = ("official", "timm", "hf", "hf_legacy")
LAYOUTS = ("pretrain", "classification", "backbone")
StateDict = dict[str, torch.Tensor]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

def _sample(keys, n: int = 6) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} keys)" if len(keys) > n else ""
    return ", ".join(map(repr, keys[:n])) + more


def _hf_prefix(sd: Mapping[str, Any]) -> str | None:
    """"beit." (task models), "" (a bare BeitModel) or None (not an HF BEiT state dict)."""
    for prefix in ("beit.", ""):
        if f"{prefix}embeddings.patch_embeddings.projection.weight" in sd:
            return prefix
    return None


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """The key-name family of a BEiT state dict: "official", "timm", "hf" or "hf_legacy".

    A dict in official names without any ``relative_position_index``, ``mask_token`` or ``lm_head`` but
    with a relative position bias table is reported as "timm" (the official code always saves the index);
    one with no relative position bias at all is the same in both and is reported as "official".
    Raises ValueError for anything else (naming some of its keys).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    keys = list(state_dict)
    prefix = _hf_prefix(state_dict)
    if prefix is not None:
        if any(re.match(rf"^{re.escape(prefix)}layers\.\d+\.", k) for k in keys):
            return "hf"
        if any(re.match(rf"^{re.escape(prefix)}encoder\.layer\.\d+\.", k) for k in keys):
            return "hf_legacy"
        raise ValueError(f"an HF BEiT state dict without encoder layers? keys: {_sample(keys)}")
    if "patch_embed.proj.weight" in state_dict and any(_BLOCK.match(k) for k in keys):
        if not any(k.endswith(".qkv.weight") for k in keys):
            raise ValueError(
                "a ViT-style state dict (blocks.*, patch_embed.*) without BEiT's attn.qkv.weight: not a BEiT "
                f"checkpoint this converter knows; keys: {_sample(keys)}"
            )
        if any(k.endswith("relative_position_index") for k in keys) or "mask_token" in state_dict \
                or "lm_head.weight" in state_dict:
            return "official"
        if any(k.endswith("relative_position_bias_table") for k in keys):
            return "timm"
        return "official"
    if any(k.startswith("backbone.") for k in keys):
        raise ValueError(
            "an official semantic-segmentation checkpoint (backbone.*, decode_head.*): not supported; convert "
            f"the backbone by stripping the 'backbone.' prefix first. keys: {_sample(keys)}"
        )
    raise ValueError(
        "unrecognised state dict: not an official/ours, timm or HuggingFace BEiT checkpoint (supported formats: "
        f"{', '.join(FORMATS)}); first keys: {_sample(keys)}"
    )


def detect_layout(state_dict: Mapping[str, Any], fmt: str | None = None) -> str:
    """"pretrain" (a masked-image-modeling head), "classification" (a classifier) or "backbone"."""
    fmt = fmt or detect_format(state_dict)
    if fmt in ("hf", "hf_legacy"):
        if "lm_head.weight" in state_dict:
            return "pretrain"
        return "classification" if "classifier.weight" in state_dict else "backbone"
    if "lm_head.weight" in state_dict:
        return "pretrain"
    return "classification" if "head.weight" in state_dict else "backbone"


def _num_blocks(sd: Mapping[str, Any]) -> int:
    ids = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"blocks are not numbered 0..{len(ids) - 1}: found {sorted(ids)}")
    return len(ids)
