"""Official <-> HuggingFace transformers key names ("hf": transformers >= 5 in memory; "hf_legacy": files on
the Hub and ``save_pretrained``), including the attention input projection (official ``qkv.weight``
<-> HF query/key/value)."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .formats import _BLOCK, StateDict, _hf_prefix, detect_format, detect_layout
from .official_keys import _add_index, _official_order

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
