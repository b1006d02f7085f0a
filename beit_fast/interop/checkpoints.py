"""BEiT checkpoints across layouts: official (= ours), HuggingFace transformers, timm; torch and safetensors.

Formats (``detect_format`` names; ``FORMATS``):

``"official"``   the official ``microsoft/unilm`` key names, which are ours: ``blocks.{i}.attn.qkv.weight``,
                 ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``, ``rel_pos_bias.*`` (pretraining, shared) or
                 ``blocks.{i}.attn.relative_position_bias_table`` (fine-tuned), with the persistent
                 ``relative_position_index`` buffers the official code saves.
``"timm"``       timm's ``Beit``: the official fine-tuning names without ``relative_position_index`` (timm
                 keeps it non-persistent), no ``mask_token``, no ``lm_head``.
``"hf"``         transformers >= 5 in-memory names (``beit.layers.{i}.attention.q_proj.weight``,
                 ``beit.shared_position_bias.*``): what ``model.state_dict()`` gives and ``load_state_dict``
                 takes with the installed transformers.
``"hf_legacy"``  the names in files on the Hub and written by ``save_pretrained`` (every transformers version
                 reads them with ``from_pretrained``): ``beit.encoder.layer.{i}.attention.attention.query.weight``,
                 ``beit.encoder.relative_position_bias.*``.

Layouts (``detect_layout``): ``"pretrain"`` (masked image modeling: ``lm_head``), ``"classification"``
(``head`` / ``classifier``), ``"backbone"`` (neither).

Every converter goes through the official names, maps one tensor to one tensor except the attention
input projection (official ``qkv.weight [3D, D]`` <-> HF ``query/key/value`` ``[D, D]`` each, a split and a
concatenation, exact), and never changes a value or a dtype: official -> HF -> official is bitwise
identical. What cannot be represented is refused with a ``ValueError`` rather than dropped silently; see
the individual functions and INTEROP.md.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..model import BeitConfig
from ..rel_pos import relative_position_index, relative_position_table_size, square_grid_for_table_size

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "detect_format",
    "detect_layout",
    "convert_state_dict",
    "to_official",
    "TARGETS",
    "official_to_hf",
    "hf_to_official",
    "official_to_timm",
    "timm_to_official",
    "official_pretrain_to_finetune",
    "infer_architecture",
    "official_config_from_state_dict",
    "official_config_from_hf",
    "hf_config_from_state_dict",
    "timm_kwargs_from_state_dict",
    "load_state_dict",
    "save_state_dict",
    "installed_hf_naming",
]

FORMATS = ("official", "timm", "hf", "hf_legacy")
LAYOUTS = ("pretrain", "classification", "backbone")
StateDict = dict[str, torch.Tensor]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# HF names
# --------------------------------------------------------------------------------------------------
def installed_hf_naming() -> str:
    """"hf" when the installed transformers names BEiT's modules the >= 5 way, else "hf_legacy" (also when
    transformers is not installed: the Hub file names, which every version's ``from_pretrained`` reads)."""
    try:
        from transformers.models.beit import modeling_beit as mb
    except Exception:
        return "hf_legacy"
    # transformers < 5 has BeitSelfAttention (attention.attention.query) and BeitEncoder (encoder.layer)
    return "hf_legacy" if hasattr(mb, "BeitSelfAttention") or hasattr(mb, "BeitEncoder") else "hf"


# official block suffix -> (modern HF suffix, legacy HF suffix); qkv handled separately
_BLOCK_MAP = {
    "norm1.weight": ("layernorm_before.weight", "layernorm_before.weight"),
    "norm1.bias": ("layernorm_before.bias", "layernorm_before.bias"),
    "norm2.weight": ("layernorm_after.weight", "layernorm_after.weight"),
    "norm2.bias": ("layernorm_after.bias", "layernorm_after.bias"),
    "attn.q_bias": ("attention.q_proj.bias", "attention.attention.query.bias"),
    "attn.v_bias": ("attention.v_proj.bias", "attention.attention.value.bias"),
    "attn.proj.weight": ("attention.o_proj.weight", "attention.output.dense.weight"),
    "attn.proj.bias": ("attention.o_proj.bias", "attention.output.dense.bias"),
    "attn.relative_position_bias_table": (
        "relative_position_bias.relative_position_bias_table",
        "attention.attention.relative_position_bias.relative_position_bias_table",
    ),
    "mlp.fc1.weight": ("mlp.fc1.weight", "intermediate.dense.weight"),
    "mlp.fc1.bias": ("mlp.fc1.bias", "intermediate.dense.bias"),
    "mlp.fc2.weight": ("mlp.fc2.weight", "output.dense.weight"),
    "mlp.fc2.bias": ("mlp.fc2.bias", "output.dense.bias"),
    "gamma_1": ("lambda_1", "lambda_1"),
    "gamma_2": ("lambda_2", "lambda_2"),
}
_QKV = {"hf": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
        "hf_legacy": ("attention.attention.query.weight", "attention.attention.key.weight",
                      "attention.attention.value.weight")}
_K_BIAS = {"hf": "attention.k_proj.bias", "hf_legacy": "attention.attention.key.bias"}
_SHARED = {"hf": "shared_position_bias.relative_position_bias_table",
           "hf_legacy": "encoder.relative_position_bias.relative_position_bias_table"}
_LAYER = {"hf": "layers.{}.", "hf_legacy": "encoder.layer.{}."}


def _global_map(layout: str, prefix: str, naming: str) -> dict[str, str]:
    """official non-block key -> HF key."""
    m = {
        "cls_token": f"{prefix}embeddings.cls_token",
        "mask_token": f"{prefix}embeddings.mask_token",
        "pos_embed": f"{prefix}embeddings.position_embeddings",
        "patch_embed.proj.weight": f"{prefix}embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": f"{prefix}embeddings.patch_embeddings.projection.bias",
        "rel_pos_bias.relative_position_bias_table": prefix + _SHARED[naming],
        "fc_norm.weight": f"{prefix}pooler.layernorm.weight",
        "fc_norm.bias": f"{prefix}pooler.layernorm.bias",
    }
    if layout == "pretrain":
        # BeitForMaskedImageModeling: its own top-level layernorm is the official final norm
        m.update({"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
                  "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"})
    else:
        # BeitModel.layernorm (present when use_mean_pooling=False) is the official norm
        m.update({"norm.weight": f"{prefix}layernorm.weight", "norm.bias": f"{prefix}layernorm.bias",
                  "head.weight": "classifier.weight", "head.bias": "classifier.bias"})
    return m


def official_to_hf(
    state_dict: Mapping[str, torch.Tensor], naming: str = "hf", prefix: str | None = None
) -> StateDict:
    """Official names -> HuggingFace names.

    ``naming``: "hf" (transformers >= 5 in-memory names, for ``model.load_state_dict``), "hf_legacy" (Hub /
    ``save_pretrained`` file names) or "auto" (the installed transformers' own, ``installed_hf_naming()``).
    ``prefix``: "beit." for ``BeitForMaskedImageModeling`` / ``BeitForImageClassification`` (default when the
    dict has ``lm_head`` or ``head``), "" for a bare ``BeitModel`` (default otherwise).

    ``qkv.weight`` is split into query/key/value; ``q_bias``/``v_bias`` become the query/value biases (zeros
    when the official model has ``qkv_bias=False``: HF's query/value projections always have a bias; the
    outputs are the same); the key has no bias in either. ``gamma_*`` -> ``lambda_*``. The
    ``relative_position_index`` buffers are dropped (HF recomputes them). Layouts: pretraining ->
    ``BeitForMaskedImageModeling`` (``norm`` -> top-level ``layernorm``), classification ->
    ``BeitForImageClassification`` (``fc_norm`` -> ``beit.pooler.layernorm``, ``head`` -> ``classifier``, a
    ``norm`` -> ``beit.layernorm``). The config must match (see ``hf_config_from_state_dict``; mind
    ``layer_norm_eps``: official 1e-6, HF's default 1e-12).
    """
    src = detect_format(state_dict)
    if src not in ("official", "timm"):
        raise ValueError(f"official_to_hf expects official (or timm) key names, got a {src!r} state dict "
                         "(use convert_state_dict to convert from any format)")
    if naming == "auto":
        naming = installed_hf_naming()
    if naming not in ("hf", "hf_legacy"):
        raise ValueError(f"naming must be 'hf', 'hf_legacy' or 'auto', got {naming!r}")
    layout = detect_layout(state_dict, src)
    if layout == "pretrain" and "head.weight" in state_dict:
        raise ValueError("a state dict with both lm_head and head: no HF model has both")
    if prefix is None:
        prefix = "" if layout == "backbone" else "beit."
    gmap = _global_map(layout, prefix, naming)
    col = 0 if naming == "hf" else 1
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        m = _BLOCK.match(key)
        if m is None:
            if key not in gmap:
                raise ValueError(f"official key {key!r} has no HuggingFace counterpart")
            out[gmap[key]] = value
            continue
        i, rest = m.group(1), m.group(2)
        layer = prefix + _LAYER[naming].format(i)
        if rest == "attn.qkv.weight":
            if value.shape[0] % 3:
                raise ValueError(f"{key} has {value.shape[0]} rows, not a multiple of 3")
            for name, part in zip(_QKV[naming], value.chunk(3, dim=0)):
                out[layer + name] = part
            if f"blocks.{i}.attn.q_bias" not in state_dict:  # qkv_bias=False: HF still has q/v biases
                d = value.shape[0] // 3
                out[layer + _BLOCK_MAP["attn.q_bias"][col]] = value.new_zeros(d)
                out[layer + _BLOCK_MAP["attn.v_bias"][col]] = value.new_zeros(d)
        elif rest in _BLOCK_MAP:
            out[layer + _BLOCK_MAP[rest][col]] = value
        else:
            raise ValueError(f"official key {key!r} has no HuggingFace counterpart")
    return out


def hf_to_official(
    state_dict: Mapping[str, torch.Tensor], with_index: bool = True, grid: tuple[int, int] | None = None
) -> StateDict:
    """HuggingFace names ("hf" or "hf_legacy", with or without the ``beit.`` prefix) -> official names.

    query/key/value weights are concatenated into ``qkv.weight``; the key bias must be absent or all
    zeros (BEiT has none: a non-zero key bias cannot be represented and raises). ``with_index`` adds the
    ``relative_position_index`` buffers the official code saves (recomputed, exactly the official ones;
    the window is read off the table size, square grids only unless ``grid=(H, W)`` is given).
    A ``BeitForMaskedImageModeling`` with ``use_mean_pooling=False`` (a ``beit.layernorm`` *and* the
    top-level ``layernorm``: two final norms) has no official counterpart and raises.
    """
    naming = detect_format(state_dict)
    if naming not in ("hf", "hf_legacy"):
        raise ValueError(f"hf_to_official expects HuggingFace key names, got a {naming!r} state dict")
    prefix = _hf_prefix(state_dict)
    layout = detect_layout(state_dict, naming)
    col = 0 if naming == "hf" else 1
    inverse_global = {v: k for k, v in _global_map(layout, prefix, naming).items()}
    inverse_block = {v[col]: k for k, v in _BLOCK_MAP.items()}
    layer_pattern = _LAYER[naming].replace(".", r"\.").replace("{}", r"(\d+)")
    layer_re = re.compile("^" + re.escape(prefix) + layer_pattern + "(.+)$")
    if layout == "pretrain" and f"{prefix}layernorm.weight" in state_dict:
        raise ValueError(
            "this BeitForMaskedImageModeling was built with use_mean_pooling=False: it applies beit.layernorm "
            "and then its own layernorm, two final norms, which the official pretraining model does not have"
        )
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        m = layer_re.match(key)
        if m is None:
            if key not in inverse_global:
                raise ValueError(f"HuggingFace key {key!r} has no official counterpart")
            out[inverse_global[key]] = value
            continue
        i, rest = m.group(1), m.group(2)
        if rest in _QKV[naming]:
            qkv.setdefault(i, {})[rest] = value
        elif rest == _K_BIAS[naming]:
            if torch.count_nonzero(value):
                raise ValueError(f"{key} is non-zero: BEiT's attention has no key bias (q_bias, v_bias only)")
        elif rest in inverse_block:
            out[f"blocks.{i}.{inverse_block[rest]}"] = value
        else:
            raise ValueError(f"HuggingFace key {key!r} has no official counterpart")
    for i, parts in qkv.items():
        missing = [n for n in _QKV[naming] if n not in parts]
        if missing:
            raise ValueError(f"layer {i}: missing {missing}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[n] for n in _QKV[naming]], dim=0)
    out = _official_order(out)
    return _add_index(out, grid) if with_index else out


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


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Any -> any
# --------------------------------------------------------------------------------------------------
def to_official(
    state_dict: Mapping[str, torch.Tensor], src: str | None = None, with_index: bool = True,
    grid: tuple[int, int] | None = None,
) -> StateDict:
    """Any supported format -> official names (with the ``relative_position_index`` buffers when
    ``with_index``, as the official code saves them)."""
    src = src or detect_format(state_dict)
    if src in ("hf", "hf_legacy"):
        out = hf_to_official(state_dict, with_index=False)
    elif src in ("timm", "official"):
        out = dict(state_dict)
    else:
        raise ValueError(f"unknown source format {src!r}; supported: {FORMATS}")
    return _add_index(out, grid) if with_index else _official_order(out)


TARGETS = ("official", "timm", "hf", "hf_legacy", "hf_auto")
_FAMILY = {"official": "official", "timm": "official", "hf": "hf", "hf_legacy": "hf"}


def same_family(a: str, b: str) -> bool:
    """official/timm share key names (timm lacks the index buffers); hf/hf_legacy are both HuggingFace."""
    return _FAMILY.get(a, a) == _FAMILY.get(b, b)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], to: str, src: str | None = None, *, drop_mim_head: bool = False,
    hf_prefix: str | None = None, grid: tuple[int, int] | None = None,
) -> StateDict:
    """Convert a BEiT state dict from any format (detected unless ``src`` is given) to ``to``: "official",
    "timm", "hf", "hf_legacy" or "hf_auto" (the installed transformers' naming). Values and dtypes are
    never changed; see the direction-specific functions for what each direction refuses."""
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; supported: {', '.join(TARGETS)}")
    if src is not None and src not in FORMATS:
        raise ValueError(f"unknown source format {src!r}; supported: {', '.join(FORMATS)}")
    detected = detect_format(state_dict)
    if src is not None and not same_family(src, detected):
        raise ValueError(f"the state dict looks like {detected!r}, not {src!r}")
    official = to_official(state_dict, detected, with_index=True, grid=grid)
    if to == "official":
        return official
    if to == "timm":
        return official_to_timm(official, drop_mim_head=drop_mim_head)
    return official_to_hf(official, naming="auto" if to == "hf_auto" else to, prefix=hf_prefix)


# --------------------------------------------------------------------------------------------------
# Architectures and configs
# --------------------------------------------------------------------------------------------------
def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture hyper-parameters read off a state dict (any format), as a dict:

    ``layout, embed_dim, depth, num_heads (None when no relative position bias table says), patch_size,
    in_chans, grid (H, W) (None when neither a table nor pos_embed says), mlp_hidden, qkv_bias,
    layer_scale (gamma present), use_abs_pos_emb, use_rel_pos_bias (per block), use_shared_rel_pos_bias,
    use_mean_pooling (fc_norm present), has_mask_token, vocab_size, num_classes``.
    LayerNorm eps is not stored in a state dict: it is not inferred.
    """
    sd = to_official(state_dict, with_index=False)
    layout = detect_layout(sd, "official")
    w = sd["patch_embed.proj.weight"]
    depth = _num_blocks(sd)
    tables = [v for k, v in sd.items() if k.endswith("relative_position_bias_table")]
    num_heads = int(tables[0].shape[1]) if tables else None
    grid = None
    if tables:
        try:
            grid = _window_from_table(tables[0].shape[0], "relative_position_bias_table", None)
        except ValueError:  # a non-square window cannot be read off the table size
            grid = None
    if grid is None and "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - 1
        g = math.isqrt(n)
        grid = (g, g) if g * g == n else None
    return {
        "layout": layout,
        "embed_dim": int(w.shape[0]),
        "depth": depth,
        "num_heads": num_heads,
        "patch_size": int(w.shape[-1]),
        "in_chans": int(w.shape[1]),
        "grid": grid,
        "mlp_hidden": int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if depth else None,
        "qkv_bias": "blocks.0.attn.q_bias" in sd,
        "layer_scale": "blocks.0.gamma_1" in sd,
        "use_abs_pos_emb": "pos_embed" in sd,
        "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in sd,
        "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in sd,
        "use_mean_pooling": "fc_norm.weight" in sd,
        "has_mask_token": "mask_token" in sd,
        "vocab_size": int(sd["lm_head.weight"].shape[0]) if "lm_head.weight" in sd else None,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else None,
    }


def _resolve(arch: dict[str, Any], num_heads: int | None, img_size: int | None) -> tuple[int, int]:
    heads = num_heads or arch["num_heads"]
    if heads is None:
        raise ValueError("num_heads cannot be read off this state dict (no relative position bias table): pass it")
    if img_size is None:
        if arch["grid"] is None:
            raise ValueError("the image size cannot be read off this state dict: pass img_size")
        gh, gw = arch["grid"]
        if gh != gw:
            raise ValueError(f"non-square grid {arch['grid']}: pass img_size")
        img_size = gh * arch["patch_size"]
    return heads, img_size


def official_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, img_size: int | None = None,
    layer_norm_eps: float = 1e-6, **overrides,
) -> BeitConfig:
    """A :class:`beit_fast.model.BeitConfig` for a *pretraining* state dict (any format), so that
    ``VisionTransformerForMaskedImageModeling(cfg).load_state_dict(convert_state_dict(sd, "official"))``
    works with ``strict=True``. ``layer_norm_eps`` is not in a state dict: 1e-6 is the official value; a
    model converted from HF needs the HF config's value (see ``official_config_from_hf``)."""
    arch = infer_architecture(state_dict)
    if arch["layout"] != "pretrain":
        raise ValueError(f"beit_fast's model is the pretraining model; this is a {arch['layout']!r} state dict")
    if arch["use_rel_pos_bias"]:
        raise ValueError(
            "per-block relative position bias tables: beit_fast's pretraining model has only the shared one"
        )
    heads, img = _resolve(arch, num_heads, img_size)
    d = arch["embed_dim"]
    fields = dict(
        img_size=img, patch_size=arch["patch_size"], in_chans=arch["in_chans"], vocab_size=arch["vocab_size"],
        embed_dim=d, depth=arch["depth"], num_heads=heads, mlp_ratio=arch["mlp_hidden"] / d,
        qkv_bias=arch["qkv_bias"], init_values=0.1 if arch["layer_scale"] else 0.0,
        use_abs_pos_emb=arch["use_abs_pos_emb"], use_shared_rel_pos_bias=arch["use_shared_rel_pos_bias"],
        layer_norm_eps=layer_norm_eps,
    )
    fields.update(overrides)
    return BeitConfig(**fields)


def official_config_from_hf(hf_config, **overrides) -> BeitConfig:
    """A :class:`beit_fast.model.BeitConfig` equal in architecture to a ``transformers.BeitConfig`` of a
    masked-image-modeling model, carrying its ``layer_norm_eps`` (HF's default 1e-12, not the official 1e-6:
    with it the converted model reproduces the HF model's outputs)."""
    if getattr(hf_config, "use_relative_position_bias", False):
        raise ValueError("use_relative_position_bias (per-layer tables): beit_fast's pretraining model has only "
                         "the shared table")
    image = hf_config.image_size
    patch = hf_config.patch_size
    if not isinstance(image, int) or not isinstance(patch, int):
        image, patch = tuple(image), tuple(patch)
        if image[0] != image[1] or patch[0] != patch[1]:
            raise ValueError(f"non-square image/patch size {image}/{patch}: not supported by beit_fast's model")
        image, patch = image[0], patch[0]
    fields = dict(
        img_size=image, patch_size=patch, in_chans=hf_config.num_channels, vocab_size=hf_config.vocab_size,
        embed_dim=hf_config.hidden_size, depth=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size, qkv_bias=True,
        init_values=float(hf_config.layer_scale_init_value), use_abs_pos_emb=hf_config.use_absolute_position_embeddings,
        use_shared_rel_pos_bias=hf_config.use_shared_relative_position_bias, layer_norm_eps=hf_config.layer_norm_eps,
        drop_path_rate=float(hf_config.drop_path_rate),
    )
    fields.update(overrides)
    return BeitConfig(**fields)


def hf_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, img_size: int | None = None,
    layer_norm_eps: float = 1e-6, **overrides,
):
    """A ``transformers.BeitConfig`` for a state dict of any format: ``BeitForMaskedImageModeling`` for the
    pretraining layout, ``BeitForImageClassification`` for the classification layout, ``BeitModel``
    otherwise. ``layer_norm_eps`` defaults to the official 1e-6 (HF's own default, 1e-12, would change the
    outputs of an official model). ``overrides`` go to ``transformers.BeitConfig`` (e.g. ``id2label``,
    ``drop_path_rate``)."""
    from transformers import BeitConfig as HFBeitConfig

    arch = infer_architecture(state_dict)
    heads, img = _resolve(arch, num_heads, img_size)
    fields = dict(
        hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=heads,
        intermediate_size=arch["mlp_hidden"], image_size=img, patch_size=arch["patch_size"],
        num_channels=arch["in_chans"], hidden_act="gelu", layer_norm_eps=layer_norm_eps,
        use_mask_token=arch["has_mask_token"], use_absolute_position_embeddings=arch["use_abs_pos_emb"],
        use_relative_position_bias=arch["use_rel_pos_bias"],
        use_shared_relative_position_bias=arch["use_shared_rel_pos_bias"],
        layer_scale_init_value=0.1 if arch["layer_scale"] else 0.0,
        # MIM: the official final norm is BeitForMaskedImageModeling.layernorm, BeitModel's must be an Identity
        use_mean_pooling=True if arch["layout"] == "pretrain" else arch["use_mean_pooling"],
    )
    if arch["vocab_size"] is not None:
        fields["vocab_size"] = arch["vocab_size"]
    if arch["num_classes"] is not None:
        fields["num_labels"] = arch["num_classes"]
    fields.update(overrides)
    return HFBeitConfig(**fields)


def timm_kwargs_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, img_size: int | None = None, **overrides
) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.beit.Beit(**kwargs)`` matching a state dict (any format): a
    classifier for the classification layout (``global_pool="avg"`` + ``fc_norm`` with mean pooling, else
    [CLS] pooling after ``norm``), ``num_classes=0`` otherwise. timm's LayerNorm eps is 1e-6, the official one."""
    arch = infer_architecture(state_dict)
    heads, img = _resolve(arch, num_heads, img_size)
    mean_pool = arch["use_mean_pooling"]
    kwargs = dict(
        img_size=img, patch_size=arch["patch_size"], in_chans=arch["in_chans"],
        num_classes=arch["num_classes"] or 0, global_pool="avg" if mean_pool else "token", use_fc_norm=mean_pool,
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=heads,
        mlp_ratio=arch["mlp_hidden"] / arch["embed_dim"], qkv_bias=arch["qkv_bias"],
        init_values=0.1 if arch["layer_scale"] else None, use_abs_pos_emb=arch["use_abs_pos_emb"],
        use_rel_pos_bias=arch["use_rel_pos_bias"], use_shared_rel_pos_bias=arch["use_shared_rel_pos_bias"],
    )
    kwargs.update(overrides)
    return kwargs


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
_WRAPPERS = ("model", "module", "state_dict", "model_state")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state dict found (expected a mapping of names to tensors, possibly under "
                         f"one of the keys {_WRAPPERS})")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _torch_load(path: Path, map_location, trust_pickle: bool):
    """The package's one checkpoint reader; every failure as a ValueError naming the file (an unsafe
    pickle's message names the opt-in, ``trust_pickle=True`` / ``--trust-pickle``)."""
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, map_location, trust_pickle=trust_pickle)
    except CheckpointError as e:
        if isinstance(e, ValueError):
            raise
        raise ValueError(str(e)) from None


def _load_safetensors(path: Path, map_location) -> StateDict:
    """A ``.safetensors`` file; a truncated, corrupt or crafted one is a ValueError naming it."""
    from safetensors.torch import load_file

    device = str(map_location) if not isinstance(map_location, str) else map_location
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError, RuntimeError, IndexError, OverflowError, ...
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {detail})") from None


def _shards(folder: Path, index_file: Path) -> list[Path]:
    """The shard files of an HF ``*.index.json``: relative paths inside ``folder`` only (a crafted index must
    not make us read ``../outside.safetensors`` or an absolute path)."""
    try:
        index = json.loads(index_file.read_text())
        names = sorted(set(index["weight_map"].values()))
        if not all(isinstance(n, str) for n in names):
            raise TypeError("shard names must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file} is not a valid shard index ({type(e).__name__}: {e})") from None
    shards = []
    for name in names:
        parts = Path(name).parts
        if not name or os.path.isabs(name) or ".." in parts:
            raise ValueError(f"{index_file} names the shard {name!r}, outside {folder}: refusing to read it")
        shards.append(folder / name)
    return shards


def load_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trust_pickle: bool = False
) -> StateDict:
    """Read a state dict from a ``.safetensors`` file, a torch file (``.pt``/``.pth``/``.bin``/``.ckpt``) or an
    HF model directory (``model.safetensors`` / ``pytorch_model.bin``, sharded or not).

    Official checkpoints keep the weights under ``"model"`` (also accepted: ``module``, ``state_dict``,
    ``model_state``); a ``module.`` prefix (DDP) is stripped. Torch files are read by
    :func:`beit_fast.checkpoint.load_checkpoint` (checksums, ``weights_only=True``) unless
    ``trust_pickle=True`` (needed for files that pickle other objects, such as official training
    checkpoints with their ``args``; it can run code from the file: only for files you trust). Shards of
    an index must lie inside its folder. A file that cannot be read is a ValueError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in _HF_FILES:
            if (path / name).is_file():
                return load_state_dict(path / name, map_location, trust_pickle)
        for name in _HF_INDEX:
            if (path / name).is_file():
                sd: StateDict = {}
                for shard in _shards(path, path / name):
                    sd.update(load_state_dict(shard, map_location, trust_pickle))
                return sd
        raise FileNotFoundError(f"{path} is a directory without {' or '.join(_HF_FILES + _HF_INDEX)}")
    if path.suffix == ".safetensors":
        return _unwrap(_load_safetensors(path, map_location), path)
    return _unwrap(_torch_load(path, map_location, trust_pickle), path)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, format: str | None = None,
    wrap: str | None = None, metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as ``format`` "safetensors" or "pt" (default: from the suffix; ``.safetensors`` ->
    safetensors, else pt). ``wrap="model"`` stores ``{"model": state_dict}`` in a torch file, the official
    checkpoint layout (safetensors files are always flat). safetensors files get the metadata
    ``{"format": "pt"}`` that ``transformers.from_pretrained`` requires, plus ``metadata``. Tensors are
    written contiguous and unshared (safetensors refuses views of one storage, e.g. split q/k/v). Torch
    files are written atomically."""
    path = Path(path)
    if format is None:
        format = "safetensors" if path.suffix == ".safetensors" else "pt"
    if format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors', got {format!r}")
    tensors = {k: v.detach() for k, v in state_dict.items()}
    if format == "safetensors":
        from safetensors.torch import save_file

        if wrap is not None:
            raise ValueError("safetensors files hold a flat state dict: wrap is for torch files only")
        meta = {"format": "pt", **(metadata or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=meta)
        return path
    from ..checkpoint import atomic_save

    # cloned so that views (split q/k/v) do not drag their whole storage into the file
    obj: Any = {k: v.clone() for k, v in tensors.items()}
    if wrap is not None:
        obj = {wrap: obj}
    return atomic_save(obj, path)
