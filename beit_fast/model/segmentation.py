"""BEiT for semantic segmentation: the BEiT trunk as a multi-scale backbone, a UperNet decode head and an FCN
auxiliary head, with the state-dict names of the official mmseg release (``backbone.*``, ``decode_head.*``,
``auxiliary_head.*``), so that its checkpoints load with ``strict=True`` (``checkpoint["state_dict"]``).

The official ``semantic_segmentation/backbone/beit.py`` (mmseg 0.11): the classification trunk with a
relative position bias table per block (no final norm), the patch tokens of blocks ``out_indices`` (0-based,
3, 5, 7, 11 for BEiT-B) as maps ``[B, D, H/16, W/16]`` through the multi-scale neck ``fpn1`` (two 2x2
transposed convolutions with BatchNorm + GELU between: 4x), ``fpn2`` (one: 2x), ``fpn3`` (identity),
``fpn4`` (2x2 max-pool: 1/2x). The heads are mmseg's ``UPerHead`` (PPM with pool scales 1, 2, 3, 6 on the
last map, FPN over all four, ``channels`` wide) and ``FCNHead`` (``in_index`` 2, one 3x3 conv of 256
channels); both end in ``Dropout2d(0.1)`` and a 1x1 ``conv_seg``. Every conv-BN-ReLU is mmseg's
``ConvModule`` (``conv`` without bias, ``bn``, ReLU). Logits come out at 1/4 of the input size.

The trunk is :class:`beit_fast.model.beit.BeitEncoder` (one model class for every task): the same blocks, the
same attention ops, the same fast path (fused attention with each block's table, activation checkpointing).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.amp import autocast_or_null
from .beit import BeitConfig, BeitEncoder, get_config, init_vit_weights_

__all__ = [
    "SegmentationHeadConfig", "default_out_indices", "ConvModule", "BeitSegmentationBackbone", "UPerHead",
    "FCNHead", "BeitForSegmentation", "build_segmenter", "segmentation_loss", "SegmentationLoss",
    "build_segmentation_loss", "SEG_IGNORE_INDEX",
]

#: The label of pixels that count nowhere (padding, ADE20K's "other" after reduce_zero_label).
SEG_IGNORE_INDEX = 255


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks (0-based) whose outputs feed the neck: official (3, 5, 7, 11) for 12 blocks and
    (7, 11, 15, 23) for 24; otherwise four evenly spaced blocks ending with the last."""
    if depth == 12:
        return (3, 5, 7, 11)
    if depth == 24:
        return (7, 11, 15, 23)
    if depth < 4:
        raise ValueError(f"a segmentation backbone needs at least 4 blocks, got depth {depth}")
    return tuple(depth * (k + 1) // 4 - 1 for k in range(4))


@dataclass
class SegmentationHeadConfig:
    """The heads of the official UperNet config (``upernet_beit_base_12_512_slide_160k_ade20k.py``).
    ``channels`` None: the backbone width (768 for BEiT-B, as officially and in HF)."""

    num_classes: int = 150
    out_indices: tuple[int, ...] | None = None  # None: default_out_indices(depth)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    channels: int | None = None
    dropout_ratio: float = 0.1
    use_auxiliary_head: bool = True
    aux_channels: int = 256
    aux_num_convs: int = 1
    aux_in_index: int = 2
    aux_concat_input: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        self.pool_scales = tuple(int(s) for s in self.pool_scales)
        if self.out_indices is not None:
            self.out_indices = tuple(int(i) for i in self.out_indices)
            if len(self.out_indices) != 4:
                raise ValueError(f"out_indices must name 4 blocks (one per neck level), got {self.out_indices}")

    def to_dict(self) -> dict:
        return asdict(self)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` with BN and ReLU: ``conv`` (no bias), ``bn``, ReLU (official key names)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class BeitSegmentationBackbone(BeitEncoder):
    """The trunk with per-block relative position bias (no final norm, no mask token) and the multi-scale
    neck. ``forward(x [B, 3, S, S]) -> [4 maps]``: ``[B, D, S/4, S/4]``, ``S/8``, ``S/16``, ``S/32``
    (patch 16). Keys: the official fine-tuning trunk's (``patch_embed``, ``cls_token``, ``blocks.{i}.*``
    with ``attn.relative_position_bias_table`` / ``relative_position_index``), ``fpn1.{0,1,3}.*``,
    ``fpn2.0.*``."""

    def __init__(self, cfg: BeitConfig, out_indices: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if cfg.patch_size not in (8, 16):
            raise ValueError(f"the official neck is defined for patch size 16 or 8, got {cfg.patch_size}")
        grid = (cfg.grid_size, cfg.grid_size)
        self._build_trunk(cfg, mask_token=False, block_window=grid)
        self.fc_norm = None  # for beit_fast.interop.pretrained.load_pretrained: no pooling norm
        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(cfg.depth)
        if sorted(set(self.out_indices)) != list(self.out_indices) or not all(0 <= i < cfg.depth for i in self.out_indices):
            raise ValueError(f"out_indices must be increasing block indices in 0..{cfg.depth - 1}, got {self.out_indices}")
        d = cfg.embed_dim
        if cfg.patch_size == 16:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                      nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(2, 2)
        else:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.MaxPool2d(2, 2)
            self.fpn4 = nn.MaxPool2d(4, 4)
        with torch.no_grad():
            init_vit_weights_(self, cfg.init_std, (self.cls_token,))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        gh, gw = self.patch_embed.patch_shape
        x = self.embed(x)
        rel_pos_bias = None  # per-block tables only (the blocks use their own)
        feats = []
        for i, blk in enumerate(self.blocks[: self.out_indices[-1] + 1]):
            x = self._run_block(i, blk, x, rel_pos_bias)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw))
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UPerHead(nn.Module):
    """mmseg ``UPerHead``: PPM on the last map (``psp_modules`` + ``bottleneck``), FPN top-down
    (``lateral_convs``, ``fpn_convs``), ``fpn_bottleneck``, dropout, ``conv_seg``. Bilinear resizes with
    ``align_corners=False``. ``forward([4 maps]) -> logits [B, classes, h0, w0]`` (the first map's size)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [F.interpolate(m(x), size=x.shape[2:], mode="bilinear", align_corners=False)
                      for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(feats[3]))
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(3)] + [laterals[3]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` (the auxiliary head): ``num_convs`` 3x3 ConvModules on map ``in_index``
    (optionally concatenated with the input through ``conv_cat``), dropout, ``conv_seg``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, in_index: int = 2,
                 concat_input: bool = False, dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])
        self.conv_cat = ConvModule(in_channels + channels, channels, 3, padding=1) if concat_input else None
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


def _init_head_(head: nn.Module) -> None:
    """mmseg's head init: ConvModule convs Kaiming (fan_out, ReLU), BN (1, 0), ``conv_seg`` normal(0.01)."""
    for m in head.modules():
        if isinstance(m, ConvModule):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.normal_(head.conv_seg.weight, 0, 0.01)
    nn.init.zeros_(head.conv_seg.bias)


class BeitForSegmentation(nn.Module):
    """``backbone`` (:class:`BeitSegmentationBackbone`), ``decode_head`` (:class:`UPerHead`),
    ``auxiliary_head`` (:class:`FCNHead`, None without). ``forward(x [B, 3, S, S]) -> logits
    [B, classes, S/4, S/4]`` (decode head only; :meth:`forward_train` adds the auxiliary logits).
    ``S`` is ``cfg.img_size``: the crop size (sliding-window inference feeds crops of that size)."""

    def __init__(self, cfg: BeitConfig, head: SegmentationHeadConfig | None = None) -> None:
        super().__init__()
        head = head or SegmentationHeadConfig()
        self.cfg, self.head_cfg = cfg, head
        self.num_classes = head.num_classes
        self.backbone = BeitSegmentationBackbone(cfg, head.out_indices)
        d = cfg.embed_dim
        channels = head.channels or d
        self.decode_head = UPerHead(d, channels, head.num_classes, head.pool_scales, head.dropout_ratio)
        self.auxiliary_head = (FCNHead(d, head.aux_channels, head.num_classes, head.aux_num_convs, head.aux_in_index,
                                       head.aux_concat_input, head.dropout_ratio) if head.use_auxiliary_head else None)
        with torch.no_grad():
            _init_head_(self.decode_head)
            if self.auxiliary_head is not None:
                _init_head_(self.auxiliary_head)

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def get_num_layers(self) -> int:
        return len(self.backbone.blocks)

    def no_weight_decay(self) -> set[str]:
        """As the official mmseg ``LayerDecayOptimizerConstructor``: only 1-D parameters and biases are exempt
        (it compares the full names, ``backbone.cls_token``, with ``cls_token``: never equal)."""
        return set()

    def configure_fast_path(self, attention: str = "auto", activation_checkpointing: str | int = "none",
                            fused_embed: str | None = None) -> "BeitForSegmentation":
        """The trunk's fast path (see :meth:`beit_fast.model.beit.VisionTransformerForClassification.configure_fast_path`):
        fused attention with each block's own table, activation checkpointing of the blocks."""
        self.backbone._configure_trunk(attention, fused_embed, activation_checkpointing)
        return self

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(decode logits, auxiliary logits or None)``, both ``[B, classes, S/4, S/4]`` (aux: ``S/16``... at
        the size of map ``aux_in_index``)."""
        feats = self.backbone(x)
        aux = self.auxiliary_head(feats) if self.auxiliary_head is not None else None
        return self.decode_head(feats), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))

    def model_config(self) -> dict:
        """What a checkpoint records of the architecture (``build_segmenter(**...)`` rebuilds it)."""
        return {"backbone": self.cfg.to_dict(), "head": self.head_cfg.to_dict()}


def build_segmenter(name_or_cfg: str | BeitConfig = "base", num_classes: int = 150, *, img_size: int = 512,
                    head: SegmentationHeadConfig | None = None, **cfg_overrides) -> BeitForSegmentation:
    """A segmentation model from a named backbone config or a :class:`BeitConfig` (per-block tables, no
    shared table), input size ``img_size`` (the crop size). The official BEiT-B config: drop path 0.1,
    LayerScale 0.1, no absolute position embedding."""
    cfg_overrides.setdefault("use_shared_rel_pos_bias", False)
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    cfg = replace(cfg, img_size=img_size, **cfg_overrides)
    head = replace(head, num_classes=num_classes) if head is not None else SegmentationHeadConfig(num_classes=num_classes)
    return BeitForSegmentation(cfg, head)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def _pixel_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, avg_non_ignore: bool) -> torch.Tensor:
    """mmseg's ``CrossEntropyLoss`` on logits resized (bilinear, align_corners=False) to the labels: fp32 per-pixel
    CE, ignored pixels 0, mean over ALL pixels (mmseg's default) or over the non-ignored ones."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss.sum() / (labels != ignore_index).sum().clamp_min(1)
    return loss.mean()


def segmentation_loss(decode_logits: torch.Tensor, aux_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      aux_weight: float = 0.4, ignore_index: int = SEG_IGNORE_INDEX,
                      avg_non_ignore: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, pixel accuracy)``, 0-dim fp32: decode CE + ``aux_weight`` * auxiliary CE (official 0.4), labels
    ``int64 [B, H, W]`` (255 ignored). ``avg_non_ignore=False`` is mmseg's reduction (the sum over labelled
    pixels divided by all pixels, ignored ones included); True divides by the labelled pixels (HF's). Accuracy:
    of the decode logits at the label size over labelled pixels. No host synchronisation."""
    if labels.dim() != 3 or labels.shape[0] != decode_logits.shape[0]:
        raise ValueError(f"labels must be [B, H, W] with B = {decode_logits.shape[0]}, got {tuple(labels.shape)}")
    loss = _pixel_ce(decode_logits, labels, ignore_index, avg_non_ignore)
    if aux_logits is not None and aux_weight:
        loss = loss + aux_weight * _pixel_ce(aux_logits, labels, ignore_index, avg_non_ignore)
    with torch.no_grad():
        pred = F.interpolate(decode_logits.float(), size=labels.shape[-2:], mode="bilinear",
                             align_corners=False).argmax(1)
        valid = labels != ignore_index
        acc = ((pred == labels) & valid).sum().float() / valid.sum().clamp_min(1).float()
    return loss, acc


class SegmentationLoss(nn.Module):
    """The segmenter and its loss as one task module for :class:`beit_fast.train.engine.Engine`:
    ``forward(images [B, 3, S, S], labels int64 [B, S, S]) -> (loss, pixel acc)``. Static shapes, no host
    read: ``torch.compile(..., fullgraph=True, dynamic=False)`` makes one graph."""

    def __init__(self, model: BeitForSegmentation, amp_dtype: torch.dtype | None = None, aux_weight: float = 0.4,
                 avg_non_ignore: bool = False) -> None:
        super().__init__()
        self.model, self.amp_dtype = model, amp_dtype
        self.aux_weight, self.avg_non_ignore = float(aux_weight), bool(avg_non_ignore)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_or_null(images.device.type, self.amp_dtype):
            decode, aux = self.model.forward_train(images)
        return segmentation_loss(decode, aux, labels, aux_weight=self.aux_weight, avg_non_ignore=self.avg_non_ignore)


def build_segmentation_loss(model: BeitForSegmentation, amp_dtype: torch.dtype | None = None, *, fast: bool = True,
                            attention: str = "auto", activation_checkpointing: str | int = "none",
                            aux_weight: float = 0.4, avg_non_ignore: bool = False) -> SegmentationLoss:
    """As :func:`beit_fast.train.loss.build_finetune_loss`: ``fast`` configures the trunk's fast path first; the
    returned module is uncompiled (the engine compiles it)."""
    if fast:
        model.configure_fast_path(attention=attention, activation_checkpointing=activation_checkpointing)
    return SegmentationLoss(model, amp_dtype, aux_weight, avg_non_ignore)

