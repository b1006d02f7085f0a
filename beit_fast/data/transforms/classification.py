"""The fine-tuning (classification) transforms and mixup / cutmix, from torchvision ``transforms.v2``.

The official ``run_class_finetuning.py`` recipe: RandomResizedCrop, RandomHorizontalFlip, RandAugment,
RandomErasing for training; resize + center crop for evaluation (:func:`build_transforms`); MixUp / CutMix
with the label smoothing folded into the soft targets (:func:`build_mixup`), applied on the device to whole
batches before the training step's task module (static shapes: images ``[B, 3, H, W]`` and targets
``[B, classes]`` whether a batch is mixed or not). Differences from timm's (which the official code uses) are
documented in each function.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from ...utils.options import RESIZE_FILTERS

__all__ = ["parse_randaug", "build_transforms", "build_mixup", "INCEPTION_MEAN", "INCEPTION_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_randaug(spec: str | None) -> tuple[int, int] | None:
    """``(num_ops, magnitude)`` of a timm-style RandAugment string (``rand-m9-n2-mstd0.5-inc1``; n
    defaults to 2), None for ``None`` / "" / "none". Other timm options (mstd, inc, mmax) are accepted and
    not reproduced (torchvision's RandAugment has no magnitude noise)."""
    if spec is None or spec.lower() in ("", "none", "off"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"only RandAugment ('rand-m9-mstd0.5-inc1') or 'none' are supported, got {spec!r}")
    num_ops, magnitude = 2, 9
    for p in parts[1:]:
        if p.startswith("mstd") or p.startswith("mmax") or p.startswith("inc") or p.startswith("w"):
            continue
        if p.startswith("m") and p[1:].isdigit():
            magnitude = int(p[1:])
        elif p.startswith("n") and p[1:].isdigit():
            num_ops = int(p[1:])
        else:
            raise ValueError(f"cannot parse {p!r} in RandAugment spec {spec!r}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be in 0..10 (timm's scale), got {magnitude}")
    return num_ops, magnitude


def build_transforms(
    img_size: int, *, train: bool, randaug: str | tuple[int, int] | bool | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25, crop_pct: float | None = None, min_scale: float = 0.08, hflip: float = 0.5,
    interpolation: str = "bicubic", mean=INCEPTION_MEAN, std=INCEPTION_STD, scale: tuple[float, float] | None = None,
) -> Callable:
    """The official fine-tuning transforms, built from torchvision ``transforms.v2``; PIL image in,
    normalised ``float32 [3, img_size, img_size]`` out.

    Train: RandomResizedCrop(img_size, scale=(min_scale, 1), ratio (3/4, 4/3), bicubic) ->
    RandomHorizontalFlip(hflip) -> RandAugment -> to float in [0, 1] -> Normalize(mean, std) ->
    RandomErasing(p=reprob, per-pixel normal values, like timm's "pixel" mode). ``scale=(lo, hi)``, when
    given, replaces ``(min_scale, 1)``. ``randaug``: a timm string (:func:`parse_randaug`),
    ``(num_ops, magnitude)``, True (the official rand-m9) or None / False (off); magnitude on timm's 0..10 scale
    (torchvision ``num_magnitude_bins=11``), no magnitude noise (timm's mstd0.5). As in timm, no colour
    jitter when RandAugment is on. ``hflip=0`` and a larger ``min_scale`` for data that is not
    flip-invariant or too small to crop hard (digits).

    Eval: Resize(int(img_size / crop_pct), bicubic) -> CenterCrop(img_size) -> Normalize.
    ``crop_pct`` None: 224/256 below 384 px, 1.0 from 384 px (official).
    Mean/std default to the official (0.5, 0.5, 0.5); pass ImageNet's with ``IMAGENET_MEAN/STD``.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import InterpolationMode

    mode = getattr(InterpolationMode, RESIZE_FILTERS[interpolation])
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if not train:
        if crop_pct is None:
            crop_pct = 224 / 256 if img_size < 384 else 1.0
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        return v2.Compose([v2.Resize(int(img_size / crop_pct), interpolation=mode, antialias=True),
                           v2.CenterCrop(img_size), *to_tensor])
    scale = (min_scale, 1.0) if scale is None else tuple(scale)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"the crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    ops: list = [v2.RandomResizedCrop(img_size, scale=scale, interpolation=mode, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaug is True:
        randaug = "rand-m9-mstd0.5-inc1"
    ra = None if randaug is None or randaug is False else (
        parse_randaug(randaug) if isinstance(randaug, str) else tuple(randaug))
    if ra is not None:
        ops.append(v2.RandAugment(num_ops=ra[0], magnitude=ra[1], num_magnitude_bins=11, interpolation=mode))
    ops += to_tensor
    if reprob > 0:
        ops.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(ops)


def build_mixup(
    num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> Callable | None:
    """``fn(images [B,3,H,W], labels [B] int64) -> (images, soft targets [B, C])`` or None when
    ``mixup`` and ``cutmix`` are both 0.

    torchvision's ``v2.MixUp`` / ``v2.CutMix`` (one lambda per batch, like timm's ``mode="batch"``; the
    partner of sample i is i-1, timm's is B-1-i), chosen by ``v2.RandomChoice`` (cutmix with
    ``switch_prob``), applied with probability ``prob`` (else plain one-hot targets); label smoothing is
    folded into the targets afterwards, ``t * (1 - s) + s / C``, which equals timm's mixing of smoothed
    one-hot targets. Each target row sums to 1.
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    choices, p = [], []
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        p.append(switch_prob if mixup > 0 else 1.0)
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        p.append(1.0 - switch_prob if cutmix > 0 else 1.0)
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=p)

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prob >= 1.0 or random.random() < prob:
            images, targets = mix(images, labels)
        else:
            targets = F.one_hot(labels, num_classes).to(images.dtype)
        if label_smoothing > 0:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        return images, targets

    return apply
