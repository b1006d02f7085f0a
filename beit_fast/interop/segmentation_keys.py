"""Segmentation state-dict layouts: official mmseg (= ours) <-> HuggingFace ``BeitForSemanticSegmentation``.

``"official"``   the official mmseg release, which is our model's own layout: ``backbone.*`` (the fine-tuning
                 trunk's names, per-block tables and index buffers, ``fpn1.{0,1,3}``, ``fpn2.0``),
                 ``decode_head.*`` and ``auxiliary_head.*`` (mmcv ``ConvModule``: ``conv`` / ``bn``;
                 ``conv_seg``). Official files hold it under ``"state_dict"`` (with ``"meta"``).
``"hf_legacy"``  HF files on the Hub / ``save_pretrained``: the trunk as ``beit.encoder.layer.{i}...``,
                 ``fpn1.*`` / ``fpn2.*`` at the top, the heads as mmseg names them except
                 ``conv_seg`` -> ``classifier``.
``"hf"``         transformers >= 5 in memory: ``beit.layers.{i}...``, ``fpn.fpn1.conv_transpose1`` ...,
                 ``psp_modules.blocks.{i}.conv.convolution``, ``psp_bottleneck``, ``*.convolution`` /
                 ``*.normalization``, ``classifier``.

The trunk goes through :mod:`beit_fast.interop` (one mapping of BEiT's blocks); the neck and heads through
the templates below. Values and dtypes are never changed; every key must map (else ValueError).

HF's ``out_indices`` are not the official ones: HF takes ``hidden_states[i - 1]`` for each ``i`` (index 0 is
the embedding output), i.e. the output of block ``i - 2`` (0-based), where the official backbone takes block
``i``. :func:`hf_out_indices` / :func:`out_indices_from_hf` convert (official (3, 5, 7, 11) is HF's
(5, 7, 9, 13), which HF's config refuses: HF's ``out_indices`` must be <= depth, so it never reads the
last block; the ADE20K models on the Hub, ``out_indices`` (3, 5, 7, 11), read blocks 1, 3, 5, 9).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["SEG_FORMATS", "is_segmentation_state_dict", "detect_segmentation_format", "segmentation_to_hf",
           "segmentation_from_hf", "convert_segmentation_state_dict", "hf_out_indices", "out_indices_from_hf",
           "hf_config_for", "segmenter_from_hf_config"]

SEG_FORMATS = ("official", "hf", "hf_legacy")

# (ours = official mmseg, hf, hf_legacy); {i}: an index, {p}: a parameter / buffer name, {h}: a head,
# {m}: a ConvModule list, {n}: a single ConvModule.
_TEMPLATES = [
    ("backbone.fpn1.0.{p}", "fpn.fpn1.conv_transpose1.{p}", "fpn1.0.{p}"),
    ("backbone.fpn1.1.{p}", "fpn.fpn1.normalization.{p}", "fpn1.1.{p}"),
    ("backbone.fpn1.3.{p}", "fpn.fpn1.conv_transpose2.{p}", "fpn1.3.{p}"),
    ("backbone.fpn2.0.{p}", "fpn.fpn2.{p}", "fpn2.0.{p}"),
    ("decode_head.psp_modules.{i}.1.conv.{p}", "decode_head.psp_modules.blocks.{i}.conv.convolution.{p}",
     "decode_head.psp_modules.{i}.1.conv.{p}"),
    ("decode_head.psp_modules.{i}.1.bn.{p}", "decode_head.psp_modules.blocks.{i}.conv.normalization.{p}",
     "decode_head.psp_modules.{i}.1.bn.{p}"),
    ("decode_head.bottleneck.conv.{p}", "decode_head.psp_bottleneck.convolution.{p}", "decode_head.bottleneck.conv.{p}"),
    ("decode_head.bottleneck.bn.{p}", "decode_head.psp_bottleneck.normalization.{p}", "decode_head.bottleneck.bn.{p}"),
    ("{h}.{m}.{i}.conv.{p}", "{h}.{m}.{i}.convolution.{p}", "{h}.{m}.{i}.conv.{p}"),
    ("{h}.{m}.{i}.bn.{p}", "{h}.{m}.{i}.normalization.{p}", "{h}.{m}.{i}.bn.{p}"),
    ("{h}.{n}.conv.{p}", "{h}.{n}.convolution.{p}", "{h}.{n}.conv.{p}"),
    ("{h}.{n}.bn.{p}", "{h}.{n}.normalization.{p}", "{h}.{n}.bn.{p}"),
    ("{h}.conv_seg.{p}", "{h}.classifier.{p}", "{h}.classifier.{p}"),
]
_FIELDS = {"i": r"\d+", "p": r"[A-Za-z_]+", "h": "decode_head|auxiliary_head", "m": "lateral_convs|fpn_convs|convs",
           "n": "fpn_bottleneck|conv_cat"}
_COLUMN = {"official": 0, "hf": 1, "hf_legacy": 2}


def _regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, pattern in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{pattern})")
    return re.compile("^" + out + "$")


_COMPILED = [[_regex(t) for t in row] for row in _TEMPLATES]


def _translate(key: str, src: str, dst: str) -> str | None:
    for row, regexes in zip(_TEMPLATES, _COMPILED):
        m = regexes[_COLUMN[src]].match(key)
        if m:
            return row[_COLUMN[dst]].format(**m.groupdict())
    return None


def is_segmentation_state_dict(sd: Mapping) -> bool:
    """A segmentation model's state dict (any layout): it has a decode head."""
    return any(k.startswith("decode_head.") for k in sd)


def detect_segmentation_format(sd: Mapping) -> str:
    """"official" (``backbone.*``), "hf" (``beit.layers.*``) or "hf_legacy" (``beit.encoder.layer.*``)."""
    if not is_segmentation_state_dict(sd):
        raise ValueError(f"not a segmentation state dict (no decode_head.* keys); first keys: {list(sd)[:6]}")
    if any(k.startswith("backbone.blocks.") for k in sd):
        return "official"
    if any(k.startswith("beit.layers.") for k in sd):
        return "hf"
    if any(k.startswith("beit.encoder.layer.") for k in sd):
        return "hf_legacy"
    raise ValueError(f"a segmentation state dict without a BEiT trunk (backbone.blocks / beit.layers / "
                     f"beit.encoder.layer); first keys: {list(sd)[:6]}")


def _is_neck_or_head(key: str) -> bool:
    return not key.startswith("backbone.") or key.startswith(("backbone.fpn1.", "backbone.fpn2."))


def segmentation_to_hf(sd: Mapping[str, torch.Tensor], naming: str = "hf") -> dict[str, torch.Tensor]:
    """Official mmseg / our names -> HF ``BeitForSemanticSegmentation`` (``naming`` "hf" or "hf_legacy").
    The ``relative_position_index`` buffers are dropped (HF recomputes them)."""
    from .hf_keys import official_to_hf

    if naming not in ("hf", "hf_legacy"):
        raise ValueError(f"naming must be 'hf' or 'hf_legacy', got {naming!r}")
    trunk, out = {}, {}
    for key, value in sd.items():
        if _is_neck_or_head(key):
            new = _translate(key, "official", naming)
            if new is None:
                raise ValueError(f"segmentation key {key!r} has no HuggingFace counterpart")
            out[new] = value
        else:
            trunk[key.removeprefix("backbone.")] = value
    out.update(official_to_hf(trunk, naming=naming, prefix="beit."))
    return out


def segmentation_from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``BeitForSemanticSegmentation`` ("hf" or "hf_legacy") -> official mmseg / our names, with the
    per-block ``relative_position_index`` buffers (square grids, read off the table size)."""
    from .hf_keys import hf_to_official

    naming = detect_segmentation_format(sd)
    if naming == "official":
        raise ValueError("segmentation_from_hf expects HuggingFace names, got the official layout")
    trunk, out = {}, {}
    for key, value in sd.items():
        if key.startswith("beit."):
            trunk[key] = value
            continue
        new = _translate(key, naming, "official")
        if new is None:
            raise ValueError(f"HuggingFace segmentation key {key!r} has no official counterpart")
        out[new] = value
    out.update({"backbone." + k: v for k, v in hf_to_official(trunk, with_index=True).items()})
    return out


def convert_segmentation_state_dict(sd: Mapping[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Any segmentation layout -> ``to`` ("official", "hf", "hf_legacy"), through the official names."""
    if to not in SEG_FORMATS:
        raise ValueError(f"unknown segmentation target {to!r}; choose one of {SEG_FORMATS}")
    src = detect_segmentation_format(sd)
    official = dict(sd) if src == "official" else segmentation_from_hf(sd)
    return official if to == "official" else segmentation_to_hf(official, naming=to)


def hf_out_indices(out_indices) -> list[int]:
    """Our (official, 0-based block) ``out_indices`` -> HF config ``out_indices`` (``i + 2``)."""
    return [int(i) + 2 for i in out_indices]


def out_indices_from_hf(hf_indices) -> tuple[int, ...]:
    """HF config ``out_indices`` -> the blocks they read (0-based), our ``out_indices`` (``i - 2``). HF's
    ``i = 1`` reads the embedding output, which no official backbone uses: refused."""
    out = tuple(int(i) - 2 for i in hf_indices)
    if any(i < 0 for i in out):
        raise ValueError(f"HF out_indices {list(hf_indices)} read the embedding output (index 1): no block feeds it")
    return out


def hf_config_for(model, layer_norm_eps: float | None = None):
    """A ``transformers.BeitConfig`` for HF's ``BeitForSemanticSegmentation`` with ``model``'s architecture
    (a :class:`beit_fast.model.segmentation.BeitForSegmentation`). HF's UperNet is as wide as the trunk and reads
    the auxiliary head's input from map 2: other settings are refused."""
    from transformers import BeitConfig as HFConfig

    cfg, head = model.cfg, model.head_cfg
    if (head.channels or cfg.embed_dim) != cfg.embed_dim:
        raise ValueError(f"HF's UperNet has as many channels as the trunk ({cfg.embed_dim}), this model {head.channels}")
    if max(model.backbone.out_indices) > cfg.depth - 2:
        raise ValueError(f"HF reads block i - 2 for out_indices i <= depth: it cannot read the last block "
                         f"({cfg.depth - 1}), which this model's out_indices {model.backbone.out_indices} use")
    if head.aux_in_index != 2:
        raise ValueError("HF's auxiliary head reads map 2; this model's aux_in_index is " + str(head.aux_in_index))
    return HFConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, use_relative_position_bias=True, use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb, layer_scale_init_value=cfg.init_values,
        layer_norm_eps=cfg.layer_norm_eps if layer_norm_eps is None else layer_norm_eps, use_mean_pooling=True,
        num_labels=head.num_classes, out_indices=hf_out_indices(model.backbone.out_indices),
        pool_scales=list(head.pool_scales), use_auxiliary_head=head.use_auxiliary_head,
        auxiliary_channels=head.aux_channels, auxiliary_num_convs=head.aux_num_convs,
        auxiliary_concat_input=head.aux_concat_input, semantic_loss_ignore_index=255, auxiliary_loss_weight=0.4,
        drop_path_rate=cfg.drop_path_rate, qkv_bias=cfg.qkv_bias,
    )


def segmenter_from_hf_config(hf_config):
    """Our :class:`~beit_fast.model.segmentation.BeitForSegmentation` with the architecture of an HF
    ``BeitForSemanticSegmentation`` config (its ``out_indices`` read as HF reads them)."""
    from ..model.beit import BeitConfig
    from ..model.segmentation import BeitForSegmentation, SegmentationHeadConfig

    c = hf_config
    if c.use_shared_relative_position_bias or not c.use_relative_position_bias:
        raise ValueError("only per-block relative position bias (use_relative_position_bias=True) is supported")
    img = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    cfg = BeitConfig(img_size=img, patch_size=c.patch_size, in_chans=c.num_channels, embed_dim=c.hidden_size,
                     depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                     mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=True, drop_path_rate=0.0,
                     init_values=c.layer_scale_init_value or 0.0, use_abs_pos_emb=c.use_absolute_position_embeddings,
                     use_shared_rel_pos_bias=False, layer_norm_eps=c.layer_norm_eps)
    head = SegmentationHeadConfig(num_classes=c.num_labels, out_indices=out_indices_from_hf(c.out_indices),
                                  pool_scales=tuple(c.pool_scales), channels=c.hidden_size,
                                  use_auxiliary_head=c.use_auxiliary_head, aux_channels=c.auxiliary_channels,
                                  aux_num_convs=c.auxiliary_num_convs, aux_concat_input=c.auxiliary_concat_input)
    return BeitForSegmentation(cfg, head)
