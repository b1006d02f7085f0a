"""Architecture hyper-parameters read off a state dict, and the beit_fast / HF / timm configs built from them."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..model.beit import BeitConfig
from .conversion import to_official
from .formats import _num_blocks, detect_layout
from .official_keys import _window_from_table

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
    """A :class:`beit_fast.model.beit.BeitConfig` for a *pretraining* state dict (any format), so that
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
    """A :class:`beit_fast.model.beit.BeitConfig` equal in architecture to a ``transformers.BeitConfig`` of a
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
