"""Loading a BEiT pretraining checkpoint (ours, official, HuggingFace or timm) into a classifier.

What the official ``run_class_finetuning.py`` does with ``--finetune``, as functions:

* :func:`load_pretrained` - drop ``mask_token`` and ``lm_head``; copy the shared
  ``rel_pos_bias.relative_position_bias_table`` into every block's table (per-block bias); resize the
  tables and the absolute position embedding when the patch grid changes (e.g. 224 -> 384); drop the
  pretraining ``norm`` under mean pooling (``fc_norm`` starts fresh); drop a head of another shape.
  Unlike the official loader (``strict=False``, everything missing silently stays at its init) a missing
  backbone weight or a shape that cannot be adapted is an error.
* :func:`resize_rel_pos_bias_table` - one relative position bias table to another grid.
* :func:`classifier_config_from_checkpoint` - the architecture a checkpoint was trained with.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.checkpoint import CheckpointError, extract_model_state, load_checkpoint
from ..utils.limits import check_beit_config, check_tensors_hold_their_bytes
from ..model.beit import BeitConfig, VisionTransformerForClassification
from ..ops.rel_pos import relative_position_table_size, square_grid_for_table_size

__all__ = [
    "PretrainedLoadError",
    "resize_rel_pos_bias_table",
    "resize_pos_embed",
    "load_state_dict_any",
    "load_pretrained",
    "classifier_config_from_checkpoint",
]

_MIM_ONLY = ("mask_token", "lm_head.weight", "lm_head.bias")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


class PretrainedLoadError(ValueError):
    """A checkpoint that does not fit the classifier (missing backbone weights, shapes that cannot be adapted)."""


def resize_rel_pos_bias_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], method: str = "bicubic",
) -> torch.Tensor:
    """A relative position bias table ``[(2h-1)(2w-1)+3, heads]`` of patch grid ``src_grid`` resampled to
    ``dst_grid``. The last 3 rows ([CLS]->patch, patch->[CLS], [CLS]->[CLS]) are kept as they are.

    Equal grids: ``table`` itself is returned (no copy, exact). Otherwise the ``(2h-1) x (2w-1)`` map of
    each head is resampled:

    * ``"bicubic"`` (default): ``F.interpolate(mode="bicubic", align_corners=False)``, as timm's
      ``resize_rel_pos_bias_table_simple``; up or down, non-square grids too; a constant map stays constant.
    * ``"geometric"``: the official ``run_class_finetuning.py`` sampling - the source offsets are placed at
      geometrically growing distances so that the source range covers the destination range, then
      sampled at the integer destination offsets. The official code interpolates with scipy's
      ``interp2d(kind="cubic")`` (removed from SciPy); here it is bilinear on that non-uniform grid (in
      torch, as timm does without scipy). Upsampling of square grids only.
    """
    src_grid, dst_grid = tuple(int(g) for g in src_grid), tuple(int(g) for g in dst_grid)
    if table.ndim != 2:
        raise ValueError(f"a relative position bias table is 2-D [rows, heads], got shape {tuple(table.shape)}")
    if table.shape[0] != relative_position_table_size(src_grid):
        raise ValueError(f"the table has {table.shape[0]} rows, but a {src_grid[0]}x{src_grid[1]} grid needs "
                         f"{relative_position_table_size(src_grid)}")
    if src_grid == dst_grid:
        return table
    if method not in ("bicubic", "geometric"):
        raise ValueError(f"method must be 'bicubic' or 'geometric', got {method!r}")
    heads = table.shape[1]
    sh, sw = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dh, dw = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    body, extra = table[:-3], table[-3:]
    maps = body.float().t().reshape(1, heads, sh, sw)
    if method == "bicubic":
        out = F.interpolate(maps, size=(dh, dw), mode="bicubic", align_corners=False)[0]
    else:
        if sh != sw or dh != dw or dh <= sh:
            raise ValueError("the 'geometric' method resizes square grids to larger ones only; use 'bicubic'")
        out = _geometric_resize(maps[0], sh, dh)
    out = out.reshape(heads, dh * dw).t().to(table.dtype)
    return torch.cat((out, extra), dim=0)


def _geometric_resize(maps: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """Official offsets (geometric progression found by bisection), bilinear on the non-uniform grid."""
    def gp(r: float, n: int) -> float:
        return (1.0 - r**n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if gp(q, src // 2) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    coords = torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)
    t = dst // 2
    target = torch.arange(-t, t + 1, dtype=torch.float64)
    right_idx = torch.bucketize(target, coords).clamp(1, src - 1)
    left_idx = right_idx - 1
    w = ((target - coords[left_idx]) / (coords[right_idx] - coords[left_idx])).clamp(0, 1)
    # Interpolation matrix [dst, src]: rows sum to 1 (constant maps stay constant).
    m = torch.zeros(dst, src, dtype=torch.float64)
    m[torch.arange(dst), left_idx] += 1 - w
    m[torch.arange(dst), right_idx] += w
    m = m.to(maps.dtype)
    return m @ maps @ m.t()


def resize_pos_embed(pos_embed: torch.Tensor, dst_grid: tuple[int, int], num_extra_tokens: int = 1) -> torch.Tensor:
    """Absolute position embedding ``[1, extra + h*w, D]`` (square source grid) to ``dst_grid``: bicubic,
    ``align_corners=False``, the [CLS] row kept (official ``run_class_finetuning.py``)."""
    n = pos_embed.shape[1] - num_extra_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch positions: not a square grid")
    if (side, side) == tuple(dst_grid):
        return pos_embed
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    tokens = tokens.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=tuple(dst_grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, tokens), dim=1)


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict_any(
    source: str | os.PathLike | Mapping, *, trust_pickle: bool = False,
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state dict in official names, the checkpoint's model_config or None)`` from a path or a loaded
    checkpoint: ``{"model": sd}``, ``{"module": sd}``, ``{"state_dict": sd}`` or a plain state dict; our,
    official, timm or HuggingFace (``hf`` / ``hf_legacy``) key names (those are converted). A path is read
    by :func:`beit_fast.utils.checkpoint.load_checkpoint` (safe loading; ``trust_pickle=True`` reads files that
    pickle other objects, which can run code from the file: only for files you trust)."""
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            ckpt = load_checkpoint(source, trust_pickle=trust_pickle)
        except FileNotFoundError:
            raise
        except CheckpointError as e:  # truncated, corrupt, or pickled objects refused (names --trust-pickle)
            raise PretrainedLoadError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - anything else a foreign file can raise
            raise PretrainedLoadError(f"{where} cannot be loaded ({type(e).__name__}: {e})") from None
    elif isinstance(source, Mapping):
        ckpt, where = source, "the given checkpoint"
    else:
        raise TypeError(f"source must be a path or a checkpoint dict, got {type(source).__name__}")
    if not isinstance(ckpt, Mapping):
        raise PretrainedLoadError(f"{where} holds a {type(ckpt).__name__}, not a checkpoint dict")
    config = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), Mapping) else None
    sd = dict(ckpt) if _is_state_dict(ckpt) else dict(extract_model_state(dict(ckpt)))
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise PretrainedLoadError(f"{where} holds no model weights (keys: {list(ckpt)[:8]})")
    try:  # an architecture may be read off these shapes: each must be backed by its own bytes
        check_tensors_hold_their_bytes(sd, where)
    except ValueError as e:
        raise PretrainedLoadError(str(e)) from None
    from .checkpoints import detect_format, to_official

    try:
        fmt = detect_format(sd)
        if fmt in ("hf", "hf_legacy"):
            sd = to_official(sd, fmt, with_index=False)
    except ValueError as e:
        raise PretrainedLoadError(f"{where}: {e}") from None
    return sd, config


def load_pretrained(
    model: VisionTransformerForClassification, source: str | os.PathLike | Mapping, *, strict_backbone: bool = True,
    rel_pos_resize: str = "bicubic", trust_pickle: bool = False, optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load pretrained weights into ``model`` the way the official fine-tuning does; returns
    ``{"missing": [...], "unexpected": [...], "notes": [...]}`` (keys of the model left at their init,
    checkpoint keys not used, and what was adapted).

    ``source``: a path or a checkpoint dict (see :func:`load_state_dict_any`, also for ``trust_pickle``).
    Adaptations, each noted:
    ``mask_token`` / ``lm_head`` dropped; the checkpoints' ``relative_position_index`` buffers dropped
    (the model's own are kept); the shared ``rel_pos_bias`` table copied into every block (per-block
    model); tables resized to the model's patch grid (``rel_pos_resize``: see
    :func:`resize_rel_pos_bias_table`); ``pos_embed`` interpolated to the grid; ``norm.*`` dropped under
    mean pooling; ``head.*`` dropped when its shape differs. ``fc_norm`` and ``head`` of a fine-tuned
    checkpoint load when their shapes fit.

    ``optional``: more key prefixes that may stay at their init (the segmenter's neck: ``fpn1.``, ``fpn2.``).

    Raises :class:`PretrainedLoadError` (a ValueError) before touching the model when a backbone weight
    (anything but ``head``, ``fc_norm``, ``optional``, index buffers) is missing and ``strict_backbone``, or when a shape
    differs in a way not handled above.
    """
    sd, _ = load_state_dict_any(source, trust_pickle=trust_pickle)
    notes: list[str] = []
    own = model.state_dict()
    grid = tuple(model.patch_embed.patch_shape)
    _drop_pretraining_only(sd, notes)
    _share_out_rel_pos_table(model, sd, notes)
    _resize_rel_pos_tables(sd, own, grid, rel_pos_resize, notes)
    _fit_pos_embed(sd, own, grid, notes)
    _drop_unfit_norm_and_head(model, sd, own, notes)
    missing, unexpected = _check_fit(sd, own, strict_backbone, optional)
    if unexpected:
        notes.append(f"{len(unexpected)} checkpoint keys not used: {unexpected[:8]}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return {"missing": missing, "unexpected": unexpected, "notes": notes}


# The steps of ``load_pretrained``, in order: each adapts the checkpoint's state dict ``sd`` in place to the
# model (``own``: its state dict; ``grid``: its patch grid), notes what it changed, and raises
# PretrainedLoadError for what cannot be adapted.
def _drop_pretraining_only(sd: dict[str, torch.Tensor], notes: list[str]) -> None:
    """``mask_token`` / ``lm_head`` and the checkpoint's ``relative_position_index`` buffers."""
    dropped = [k for k in _MIM_ONLY if k in sd]
    for k in dropped:
        sd.pop(k)
    if dropped:
        notes.append(f"dropped the pretraining-only {dropped}")
    index_keys = [k for k in sd if k.endswith("relative_position_index")]
    for k in index_keys:
        sd.pop(k)


def _share_out_rel_pos_table(model: VisionTransformerForClassification, sd: dict[str, torch.Tensor],
                             notes: list[str]) -> None:
    """The shared table copied into every block of a per-block model; per-block tables for a shared-table
    model are refused."""
    per_block = len(model.blocks) > 0 and getattr(model.blocks[0].attn, "relative_position_bias_table", None) is not None
    if per_block and _SHARED_TABLE in sd and model.rel_pos_bias is None:
        table = sd.pop(_SHARED_TABLE)
        for i in range(len(model.blocks)):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table.clone())
        notes.append(f"copied the shared relative position bias table into each of the {len(model.blocks)} blocks")
    elif model.rel_pos_bias is not None and _SHARED_TABLE not in sd and \
            any(k.endswith("attn.relative_position_bias_table") for k in sd) and not per_block:
        raise PretrainedLoadError("the checkpoint has per-block relative position bias tables, the model one shared "
                                  "table: build the classifier with use_rel_pos_bias=True, "
                                  "use_shared_rel_pos_bias=False")


def _resize_rel_pos_tables(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], grid: tuple[int, int],
                           rel_pos_resize: str, notes: list[str]) -> None:
    """Tables of another (square) patch grid resized to the model's (:func:`resize_rel_pos_bias_table`)."""
    for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
        if key not in own:
            continue
        src, dst = sd[key], own[key]
        if src.shape == dst.shape:
            continue
        if src.shape[1] != dst.shape[1]:
            raise PretrainedLoadError(f"{key}: {src.shape[1]} heads in the checkpoint, {dst.shape[1]} in the model")
        side = square_grid_for_table_size(src.shape[0])
        if side is None:
            raise PretrainedLoadError(f"{key}: {src.shape[0]} rows is not the table of a square patch grid")
        src_grid = (side, side)
        sd[key] = resize_rel_pos_bias_table(src, src_grid, grid, method=rel_pos_resize)
        if not notes or not notes[-1].startswith("resized relative position bias"):
            notes.append(f"resized relative position bias tables from a {src_grid[0]}x{src_grid[1]} to a "
                         f"{grid[0]}x{grid[1]} patch grid ({rel_pos_resize})")


def _fit_pos_embed(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], grid: tuple[int, int],
                   notes: list[str]) -> None:
    """``pos_embed`` of another patch grid interpolated to the model's (bicubic)."""
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        if sd["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
            raise PretrainedLoadError(f"pos_embed: width {sd['pos_embed'].shape[-1]} in the checkpoint, "
                                      f"{own['pos_embed'].shape[-1]} in the model")
        try:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid)
        except ValueError as e:
            raise PretrainedLoadError(f"pos_embed: {e}") from None
        notes.append(f"interpolated pos_embed to a {grid[0]}x{grid[1]} patch grid (bicubic)")


def _drop_unfit_norm_and_head(model: VisionTransformerForClassification, sd: dict[str, torch.Tensor],
                              own: dict[str, torch.Tensor], notes: list[str]) -> None:
    """The pretraining ``norm`` under mean pooling; a ``head`` whose shape differs from the model's."""
    if model.fc_norm is not None:
        norm = [k for k in ("norm.weight", "norm.bias") if k in sd]
        for k in norm:
            sd.pop(k)
        if norm:
            notes.append("dropped the pretraining norm (mean pooling: fc_norm starts fresh)")

    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            shape = tuple(sd.pop(k).shape)
            notes.append(f"dropped {k} {shape} (the model's is {tuple(own[k].shape) if k in own else 'absent'})")


def _check_fit(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
               strict_backbone: bool, optional: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys of the adapted state dict; raises for a shape that still differs and,
    with ``strict_backbone``, for a missing backbone weight."""
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise PretrainedLoadError("shapes differ between the checkpoint and the model (another architecture? "
                                  "check --model / embed_dim / depth / patch_size):\n  " + "\n  ".join(mismatched))
    missing = [k for k in own if k not in sd and not k.endswith("relative_position_index")]
    unexpected = [k for k in sd if k not in own]
    optional = ("head.", "fc_norm.") + tuple(optional)
    backbone_missing = [k for k in missing if not k.startswith(optional)]
    if backbone_missing and strict_backbone:
        raise PretrainedLoadError(
            f"the checkpoint lacks {len(backbone_missing)} backbone weights of the model: {backbone_missing[:8]}"
            + (" ..." if len(backbone_missing) > 8 else "")
            + " (another architecture, or a model built with other options: abs pos emb, rel pos bias, "
            "LayerScale? pass strict_backbone=False to keep their init)"
        )
    return missing, unexpected


def classifier_config_from_checkpoint(source: str | os.PathLike | Mapping, **overrides) -> BeitConfig:
    """The architecture of a checkpoint as a :class:`BeitConfig` (then ``overrides``): from our
    ``model_config`` when present, else read off the weights (``beit_fast.interop.infer_architecture``;
    LayerNorm eps is then the official 1e-6). Image size: the checkpoint's unless overridden."""
    sd, config = load_state_dict_any(source)
    if config is not None:
        try:
            check_beit_config(config, sd.values(), str(source) if isinstance(source, (str, os.PathLike)) else
                              "the checkpoint")
        except ValueError as e:
            raise PretrainedLoadError(str(e)) from None
        known = {f.name for f in fields(BeitConfig)}
        cfg = BeitConfig(**{k: v for k, v in config.items() if k in known})
    else:
        from .checkpoints import infer_architecture

        arch = infer_architecture(sd)
        heads = arch["num_heads"] or overrides.get("num_heads")
        if heads is None:
            raise PretrainedLoadError("the number of heads cannot be read off this checkpoint (no relative position "
                                      "bias table): pass num_heads (CLI: name the architecture with --model)")
        grid = arch["grid"]
        img = overrides.get("img_size") or (grid[0] * arch["patch_size"] if grid and grid[0] == grid[1] else None)
        if img is None:
            raise PretrainedLoadError("the image size cannot be read off this checkpoint: pass img_size (CLI: "
                                      "--input_size)")
        cfg = BeitConfig(
            img_size=img, patch_size=arch["patch_size"], in_chans=arch["in_chans"], embed_dim=arch["embed_dim"],
            depth=arch["depth"], num_heads=heads, mlp_ratio=arch["mlp_hidden"] / arch["embed_dim"],
            qkv_bias=arch["qkv_bias"], init_values=0.1 if arch["layer_scale"] else 0.0,
            use_abs_pos_emb=arch["use_abs_pos_emb"], use_shared_rel_pos_bias=arch["use_shared_rel_pos_bias"],
        )
    return replace(cfg, **overrides)
