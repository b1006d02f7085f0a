"""Official key names: their order, the ``relative_position_index`` buffers the official code saves, and
what the official fine-tuning keeps of a pretraining checkpoint."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ops.rel_pos import relative_position_index, relative_position_table_size, square_grid_for_table_size
from .formats import _BLOCK, StateDict, _num_blocks, detect_format, detect_layout

_GLOBAL_ORDER = ("cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index")
_TAIL_ORDER = ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias",
               "lm_head.weight", "lm_head.bias")
_BLOCK_ORDER = ("gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                "attn.relative_position_bias_table", "attn.relative_position_index", "attn.qkv.weight",
                "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def _official_order(sd: StateDict) -> StateDict:
    """Keys in the order of the official modules' ``state_dict()`` (cosmetic; loading does not care)."""
    def rank(key: str):
        m = _BLOCK.match(key)
        if m is not None:
            rest = m.group(2)
            return (1, int(m.group(1)), _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else 99, rest)
        if key in _GLOBAL_ORDER:
            return (0, 0, _GLOBAL_ORDER.index(key), key)
        return (2, 0, _TAIL_ORDER.index(key) if key in _TAIL_ORDER else 99, key)

    return {k: sd[k] for k in sorted(sd, key=rank)}


def _window_from_table(rows: int, key: str, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        gh, gw = grid
        if relative_position_table_size((gh, gw)) != rows:
            raise ValueError(f"{key} has {rows} rows, which does not match grid {grid}")
        return gh, gw
    g = square_grid_for_table_size(rows)
    if g is None:
        raise ValueError(f"{key} has {rows} rows: not (2G-1)^2 + 3 for a square grid; pass grid=(H, W)")
    return g, g


def _add_index(sd: StateDict, grid: tuple[int, int] | None = None) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        out[key] = value
        if key.endswith("relative_position_bias_table"):
            index_key = key[: -len("relative_position_bias_table")] + "relative_position_index"
            if index_key not in sd:
                out[index_key] = relative_position_index(_window_from_table(value.shape[0], key, grid))
    return _official_order(out)


def official_pretrain_to_finetune(
    state_dict: Mapping[str, torch.Tensor], rel_pos: str = "per_block", use_mean_pooling: bool = True
) -> StateDict:
    """What the official ``run_class_finetuning.py`` keeps of a pretraining checkpoint, in fine-tuning names.

    Drops ``mask_token`` and ``lm_head``; ``rel_pos="per_block"`` copies the shared
    ``rel_pos_bias.relative_position_bias_table`` into every ``blocks.{i}.attn.relative_position_bias_table``
    (the official ``--rel_pos_bias`` fine-tuning; "shared" keeps it shared). With ``use_mean_pooling`` the
    fine-tuning model's ``norm`` is an identity, so the pretrained ``norm`` is dropped (the official loader
    ignores it too). ``fc_norm`` and ``head`` are new in fine-tuning: load the result with ``strict=False``.
    """
    if detect_format(state_dict) != "official" or detect_layout(state_dict) != "pretrain":
        raise ValueError("official_pretrain_to_finetune expects an official pretraining state dict (with lm_head)")
    if rel_pos not in ("per_block", "shared"):
        raise ValueError(f"rel_pos must be 'per_block' or 'shared', got {rel_pos!r}")
    drop = {"mask_token", "lm_head.weight", "lm_head.bias"}
    if use_mean_pooling:
        drop |= {"norm.weight", "norm.bias"}
    out = {k: v for k, v in state_dict.items() if k not in drop}
    table = out.get("rel_pos_bias.relative_position_bias_table")
    if rel_pos == "per_block" and table is not None:
        out.pop("rel_pos_bias.relative_position_bias_table")
        index = out.pop("rel_pos_bias.relative_position_index", None)
        for i in range(_num_blocks(out)):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
            if index is not None:
                out[f"blocks.{i}.attn.relative_position_index"] = index.clone()
    return _official_order(out)
