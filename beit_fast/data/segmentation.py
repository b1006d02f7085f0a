"""Segmentation data: ADE20K's folder layout, a generic images + masks folder pair, and the official mmseg
training / test pipelines as joint image + mask transforms.

Masks are single-channel PNGs (greyscale "L", or palette "P", whose pixel values are the palette indices:
what mmseg's pillow loader reads), one per image with the same stem and size. Label values must be
class ids ``0..num_classes-1`` or 255 (ignored); with ``reduce_zero_label`` (ADE20K: 0 = "other") 0 becomes
255 and ``l`` becomes ``l - 1`` first. Anything else is an error naming the file and the value.

The training pipeline (``upernet_beit_base_12_512_slide_160k_ade20k.py``): Resize to ``img_scale``
(2048, 512) times a ratio drawn from ``ratio_range`` (0.5, 2.0), keeping the aspect ratio (image bilinear,
mask nearest); RandomCrop ``crop_size`` (512) retried up to 10 times until no class covers more than
``cat_max_ratio`` (0.75) of the labelled pixels; RandomFlip (0.5); PhotoMetricDistortion; Normalize
(mean = std = 127.5, BEiT's); Pad to the crop size (image 0, mask 255). Random numbers come from torch's
global generator (per data worker: seeded by the loader), so a run's augmentations are reproducible and
resume exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

__all__ = ["SegmentationDataError", "IMAGE_EXTENSIONS", "pair_folders", "ade20k_folders", "read_mask",
           "SegTrainTransform", "SegEvalTransform", "SegmentationFolder", "reduce_zero_label_",
           "photometric_distortion", "rescale_size"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MEAN = STD = (127.5, 127.5, 127.5)  # BEiT's normalisation (pixels to [-1, 1])


class SegmentationDataError(ValueError):
    """A data set problem (missing pairs, sizes, label values, mask modes, empty folders), naming the file."""


def _files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise SegmentationDataError(f"{folder}: no such folder")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts and p.is_file()}
    if not found:
        raise SegmentationDataError(f"{folder}: no files ({', '.join(exts)})")
    return found


def pair_folders(images: str | os.PathLike, masks: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs matched by file stem (masks: ``.png``), sorted by stem. Raises
    :class:`SegmentationDataError` for an empty folder or a file without its partner (naming them)."""
    imgs = _files(Path(images), IMAGE_EXTENSIONS)
    msks = _files(Path(masks), (".png",))
    lonely_imgs = sorted(set(imgs) - set(msks))
    lonely_masks = sorted(set(msks) - set(imgs))
    problems = []
    if lonely_imgs:
        problems.append(f"{len(lonely_imgs)} images without a mask in {masks}: "
                        + ", ".join(imgs[s].name for s in lonely_imgs[:5]))
    if lonely_masks:
        problems.append(f"{len(lonely_masks)} masks without an image in {images}: "
                        + ", ".join(msks[s].name for s in lonely_masks[:5]))
    if problems:
        raise SegmentationDataError("; ".join(problems))
    return [(imgs[s], msks[s]) for s in sorted(imgs)]


def ade20k_folders(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """ADEChallengeData2016's ``images/{training,validation}`` and ``annotations/...`` (split "training" or
    "validation"); 150 classes with ``reduce_zero_label``."""
    if split not in ("training", "validation"):
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
    root = Path(root)
    return root / "images" / split, root / "annotations" / split


def read_mask(path: Path) -> np.ndarray:
    """A label map ``uint8 [H, W]`` from a greyscale ("L") or palette ("P": the indices) PNG. Colour masks
    (RGB / RGBA) are refused: their colours need a palette to mean classes."""
    with Image.open(path) as im:
        if im.mode in ("L", "P", "I;16", "I"):
            arr = np.asarray(im)
        else:
            raise SegmentationDataError(
                f"{path}: a {im.mode} mask; masks must be single-channel (greyscale 'L' or palette 'P' PNG) whose "
                "values are class ids (convert colour masks to class ids first)")
    if arr.max(initial=0) > 255:
        raise SegmentationDataError(f"{path}: label value {int(arr.max())} does not fit 0..255")
    return arr.astype(np.uint8)


def reduce_zero_label_(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255, l -> l - 1 (255 stays 255)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(np.uint8)


def check_labels(label: np.ndarray, num_classes: int, where: Path) -> None:
    bad = np.unique(label[(label >= num_classes) & (label != 255)])
    if bad.size:
        raise SegmentationDataError(f"{where}: label values {bad[:8].tolist()} are outside 0..{num_classes - 1} "
                                    "and not 255 (ignore); check --num_classes / --reduce_zero_label")


# --------------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion, on 0..255 float RGB)
# --------------------------------------------------------------------------------------------------
def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] -> HSV with H in [0, 1)."""
    r, g, b = img
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / dc, torch.where(maxc == g, 2.0 + (b - r) / dc, 4.0 + (r - g) / dc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc))


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack((v, q, p, p, t, v)).gather(0, i[None])[0]
    g = torch.stack((t, v, v, q, p, p)).gather(0, i[None])[0]
    b = torch.stack((p, p, t, v, v, q)).gather(0, i[None])[0]
    return torch.stack((r, g, b))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()))


def photometric_distortion(img: torch.Tensor, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a float RGB image ``[3, H, W]`` in 0..255, each step with
    probability 0.5: brightness ``+U(-32, 32)``; contrast ``* U(0.5, 1.5)`` (before or after the colour
    steps, a coin decides); saturation ``* U(0.5, 1.5)`` and hue ``+ randint(-18, 18)`` degrees/2 in HSV (the
    OpenCV hue unit). Each step clips to 0..255 (mmseg rounds to uint8 in between; this stays in float)."""
    img = img.float()
    if _coin():
        img = (img + _uniform(-brightness_delta, brightness_delta)).clamp(0, 255)
    contrast_first = _coin()
    if contrast_first and _coin():
        img = (img * _uniform(*contrast_range)).clamp(0, 255)
    sat = _uniform(*saturation_range) if _coin() else None
    hue = int(torch.randint(-hue_delta, hue_delta + 1, ())) if _coin() else None
    if sat is not None or hue is not None:
        hsv = _rgb_to_hsv(img / 255.0)
        if sat is not None:
            hsv[1] = (hsv[1] * sat).clamp(0, 1)
        if hue is not None:
            hsv[0] = (hsv[0] + hue / 180.0) % 1.0
        img = (_hsv_to_rgb(hsv) * 255.0).clamp(0, 255)
    if not contrast_first and _coin():
        img = (img * _uniform(*contrast_range)).clamp(0, 255)
    return img


# --------------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------------
def _normalize(img: torch.Tensor) -> torch.Tensor:
    return TF.normalize(img.float(), list(MEAN), list(STD))


@dataclass
class SegTrainTransform:
    """The official training pipeline on ``(image uint8 [3, H, W], label uint8 [H, W])`` ->
    ``(image float [3, crop, crop], label int64 [crop, crop])`` (see the module docstring)."""

    crop_size: int = 512
    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def resize(self, img, label):

        ratio = _uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        size = list(rescale_size(img.shape[-2], img.shape[-1], scale))
        img = TF.resize(tv_tensors.Image(img), size, interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        label = TF.resize(tv_tensors.Mask(label[None]), size, interpolation=TF.InterpolationMode.NEAREST)[0]
        return img.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)

    def crop_box(self, h: int, w: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(h - self.crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.crop_size, 0) + 1, ()))
        return top, left

    def random_crop(self, img, label):
        """mmseg RandomCrop: up to 10 boxes until the largest class (255 not counted) covers less than
        ``cat_max_ratio`` of the box's labelled pixels (and there are at least two classes)."""
        h, w = label.shape
        c = self.crop_size
        top, left = self.crop_box(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                seg = label[top:top + c, left:left + c]
                _, counts = torch.unique(seg[seg != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                top, left = self.crop_box(h, w)
        return img[:, top:top + c, left:left + c], label[top:top + c, left:left + c]

    def __call__(self, img: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.resize(img, label)
        img, label = self.random_crop(img, label)
        if float(torch.rand(())) < self.flip_prob:
            img, label = TF.horizontal_flip(img), TF.horizontal_flip(label)
        img = photometric_distortion(img) if self.photometric else img.float()
        img = _normalize(img)
        c = self.crop_size
        pad = [0, 0, c - img.shape[-1], c - img.shape[-2]]  # left, top, right, bottom
        if pad[2] or pad[3]:
            img = TF.pad(img, pad, fill=0)
            label = TF.pad(tv_tensors.Mask(label), pad, fill=self.ignore_index).as_subclass(torch.Tensor)
        return img.contiguous(), label.long().contiguous()


@dataclass
class SegEvalTransform:
    """The test pipeline's image side: the image normalised at its ORIGINAL size (the resize to
    ``img_scale`` is done by :func:`beit_fast.model.segmentation_inference.predict`, which maps the prediction
    back), the label unchanged: ``(image float [3, H, W], label int64 [H, W])``."""

    def __call__(self, img: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalize(img), label.long()


class SegmentationFolder(torch.utils.data.Dataset):
    """``(image, label)`` samples of ``pairs`` (see :func:`pair_folders`) through ``transform``
    (:class:`SegTrainTransform` / :class:`SegEvalTransform`; None: ``(uint8 [3, H, W], uint8 [H, W])``).
    Every sample is checked: image and mask of the same size, label values in range (after
    ``reduce_zero_label``)."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, *, reduce_zero_label: bool = False,
                 transform=None) -> None:
        if not pairs:
            raise SegmentationDataError("no (image, mask) pairs")
        if num_classes < 2 or num_classes > 255:
            raise ValueError(f"num_classes must be in 2..255 (255 is the ignore label), got {num_classes}")
        self.pairs, self.num_classes, self.reduce_zero_label = list(pairs), int(num_classes), bool(reduce_zero_label)
        self.transform = transform

    @classmethod
    def from_folders(cls, images, masks, num_classes: int, **kw) -> "SegmentationFolder":
        return cls(pair_folders(images, masks), num_classes, **kw)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image uint8 [3, H, W], label uint8 [H, W])``, checked, zero label reduced."""
        img_path, mask_path = self.pairs[index]
        try:
            with Image.open(img_path) as im:
                img = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise SegmentationDataError(f"{img_path}: cannot be read as an image ({e})") from None
        label = read_mask(mask_path)
        if label.shape != img.shape[:2]:
            raise SegmentationDataError(f"{mask_path}: mask size {label.shape[1]}x{label.shape[0]} differs from its "
                                        f"image's {img.shape[1]}x{img.shape[0]} ({img_path.name})")
        if self.reduce_zero_label:
            label = reduce_zero_label_(label)
        check_labels(label, self.num_classes, mask_path)
        return torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous(), torch.from_numpy(label.copy())

    def __getitem__(self, index: int):
        img, label = self.load(index)
        return self.transform(img, label) if self.transform is not None else (img, label)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest size with the long side <= max(scale) and the short
    side <= min(scale); ``(new_h, new_w)`` rounded as mmcv does (``int(x * f + 0.5)``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)
