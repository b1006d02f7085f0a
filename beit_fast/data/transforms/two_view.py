"""The BEiT two-view pretraining transform (spec section 1).

One sample = two views of ONE random crop box of one image:

* ``ColorJitter(0.4, 0.4, 0.4)`` (no hue) and ``RandomHorizontalFlip(0.5)`` on the whole PIL image,
* one ``RandomResizedCrop`` box (torchvision's ``RandomResizedCrop.get_params``: scale (0.08, 1), ratio
  (3/4, 4/3), 10 tries, then the centre fallback),
* that box resized twice with ``torchvision.transforms.functional.resized_crop`` on the PIL image:
  224x224 bicubic -> ToTensor -> Normalize (patch view), and 112x112 Lanczos -> ToTensor -> ``map_pixels``
  (tokenizer view, DALL-E: ``(1 - 2*0.1) * x + 0.1``).

This is the order of the official ``DataAugmentationForBEiT`` (``datasets.py``) with
``RandomResizedCropAndInterpolationWithTwoPic`` (``transforms.py``). One deliberate difference: the official
crop sampler draws the box with Python's ``random`` module; here torchvision's ``get_params`` draws it with
torch's RNG (same distribution: log-uniform ratio, uniform area, ``int(round(.))`` sides, 10 tries, same
centre fallback), so that ALL randomness of the transform comes from torch's global RNG and a sample is
reproducible by seeding torch alone (see ``beit_fast.data.pretraining.PretrainDataset``).

Resizing is done by Pillow (PIL input to ``resized_crop``), exactly like the official code, so given the
same box the views are identical to the official ones.

:class:`TokenizerViewTransform` runs the same steps but renders only the tokenizer view (the training data
of our dVAE tokenizer, ``python -m beit_fast.train_tokenizer``). ``map_pixels`` / ``unmap_pixels`` are
defined once, in :mod:`beit_fast.tokenizer.base`, and re-exported here.

``to_rgb`` converts any Pillow mode to 8-bit RGB correctly (16-bit greyscale is scaled, not clipped;
transparency is composited over a background colour instead of revealing whatever colour the transparent
pixels happen to store).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

# the one definition of DALL-E's pixel mapping (re-exported here for the data pipeline)
from ...tokenizer.base import LOGIT_LAPLACE_EPS, map_pixels, unmap_pixels

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_INCEPTION_MEAN",
    "IMAGENET_INCEPTION_STD",
    "LOGIT_LAPLACE_EPS",
    "TwoViewConfig",
    "AugmentParams",
    "TwoViewTransform",
    "TokenizerViewTransform",
    "map_pixels",
    "unmap_pixels",
    "to_rgb",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}

_TOKENIZER_VIEWS = ("dall-e", "customized")


# --------------------------------------------------------------------------------------------------------
# Mode conversion
# --------------------------------------------------------------------------------------------------------
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I"}


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit-int / float greyscale image to 8-bit 'L'.

    * 'I;16*' and 'I' are taken as 16-bit data (Pillow opens 16-bit PNG/TIFF greyscale as 'I;16', older
      Pillow and some paths as 'I'): 0..65535 -> 0..255 by ``round(v / 257)`` (values outside 0..65535 of an
      'I' image are clipped first).
    * 'F' is taken as [0, 1] when its maximum is <= 1, else as [0, 255]; values are clipped to that range.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0 / scale, neginf=0.0) * scale
        out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        arr = np.clip(arr.astype(np.int64), 0, 65535)
        out = ((arr * 255 + 32767) // 65535).astype(np.uint8)  # == round(v * 255 / 65535)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image, background: Sequence[int] = (255, 255, 255)) -> Image.Image:
    """Return ``img`` as an 8-bit RGB PIL image.

    * 'RGB' -> returned as is (no copy);
    * '1', 'L', 'P' (no transparency), 'CMYK', 'YCbCr', ... -> ``Image.convert('RGB')`` (Pillow's JPEG
      decoder already undoes Adobe's inverted CMYK);
    * modes with an alpha channel ('RGBA', 'LA', 'PA', ...), palettes with alpha and images with a
      ``transparency`` entry (palette or greyscale tRNS) -> alpha-composited over ``background`` (white by default). For fully
      opaque images this equals ``convert('RGB')``, which is what the official code does;
    * 16-bit greyscale ('I;16', 'I;16B', 'I') and float ('F') -> scaled to 8 bit first (``convert('RGB')``
      would clip every value above 255 to white).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _to_uint8_gray(img).convert("RGB")
    rgba_palette = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or rgba_palette or "transparency" in img.info:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(int(c) for c in background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------------
# Two-view transform
# --------------------------------------------------------------------------------------------------------
@dataclass
class TwoViewConfig:
    """Settings of :class:`TwoViewTransform`; the defaults are the official BEiT pretraining ones."""

    input_size: int = 224
    second_input_size: int = 112
    interpolation: str = "bicubic"  # patch view
    second_interpolation: str = "lanczos"  # tokenizer view
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    color_jitter: float = 0.4  # brightness = contrast = saturation = color_jitter, no hue; 0 disables
    hflip_prob: float = 0.5  # 0 disables
    imagenet_default_mean_and_std: bool = False  # False: mean = std = 0.5 (official default)
    tokenizer_view: str = "dall-e"  # "dall-e": map_pixels; "customized": Normalize(0.5, 0.5)
    # True: the views leave the transform as uint8 pixels (4x fewer bytes through the loader and to the
    # GPU) and are normalised where they are used (:meth:`TwoViewTransform.normalize`, on the device).
    uint8_views: bool = False

    def __post_init__(self) -> None:
        for name in ("interpolation", "second_interpolation"):
            v = getattr(self, name)
            if v not in _INTERPOLATIONS:
                raise ValueError(f"{name}={v!r}; expected one of {sorted(_INTERPOLATIONS)}")
        if self.tokenizer_view not in _TOKENIZER_VIEWS:
            raise ValueError(f"tokenizer_view={self.tokenizer_view!r}; expected one of {_TOKENIZER_VIEWS}")
        if self.input_size <= 0 or self.second_input_size <= 0:
            raise ValueError("input sizes must be positive")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ValueError(f"scale={self.scale} must satisfy 0 < min <= max")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < min <= max")
        if self.color_jitter < 0:
            raise ValueError("color_jitter must be >= 0")
        if not (0.0 <= self.hflip_prob <= 1.0):
            raise ValueError("hflip_prob must be in [0, 1]")

    @property
    def mean(self) -> tuple[float, float, float]:
        return IMAGENET_DEFAULT_MEAN if self.imagenet_default_mean_and_std else IMAGENET_INCEPTION_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return IMAGENET_DEFAULT_STD if self.imagenet_default_mean_and_std else IMAGENET_INCEPTION_STD


#: Colour-jitter operations in torchvision's ``ColorJitter`` numbering (its ``fn_idx``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugmentParams:
    """Every random draw of one two-view sample (:meth:`TwoViewTransform.draw_params`).

    ``jitter``: ``(operation, factor)`` pairs in the order they are applied (operation: ``BRIGHTNESS``,
    ``CONTRAST``, ``SATURATION`` or ``HUE``; empty without colour jitter); ``flip``: horizontal flip of the
    whole image; ``box``: ``(top, left, height, width)`` in the (flipped) image. The crop box depends only
    on the image size, so these can be drawn before an image is decoded (the GPU input pipeline does).
    """

    jitter: tuple[tuple[int, float], ...] = field(default=())
    flip: bool = False
    box: tuple[int, int, int, int] = (0, 0, 1, 1)


def _size_only(height: int, width: int) -> torch.Tensor:
    """A zero-storage ``[3, height, width]`` tensor: what ``RandomResizedCrop.get_params`` reads is the size."""
    return torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, int(height), int(width))


class TwoViewTransform:
    """PIL image -> (patch_image [3, S, S] float32, tokenizer_image [3, S2, S2] float32), or with
    ``cfg.uint8_views`` the same views as ``uint8`` pixels, which :meth:`normalize` turns into the float
    views bit for bit (on any device, batched or not).

    All randomness comes from torch's global RNG (ColorJitter, RandomHorizontalFlip and
    ``RandomResizedCrop.get_params`` are torchvision's), so ``torch.manual_seed(s)`` before a call makes the
    call reproducible. The steps are also available separately: :meth:`augment` (RGB conversion, jitter,
    flip), :meth:`sample_box` and :meth:`render` (both views of one given box).
    """

    def __init__(self, cfg: TwoViewConfig | None = None) -> None:
        self.cfg = cfg = cfg if cfg is not None else TwoViewConfig()
        cj = float(cfg.color_jitter)
        self.color_jitter = T.ColorJitter(cj, cj, cj) if cj > 0 else None
        self.hflip = T.RandomHorizontalFlip(p=cfg.hflip_prob) if cfg.hflip_prob > 0 else None
        self.patch_size = [cfg.input_size, cfg.input_size]
        self.second_size = [cfg.second_input_size, cfg.second_input_size]
        self.patch_interpolation = _INTERPOLATIONS[cfg.interpolation]
        self.second_interpolation = _INTERPOLATIONS[cfg.second_interpolation]
        self.mean = list(cfg.mean)
        self.std = list(cfg.std)

    # -- steps -------------------------------------------------------------------------------------------
    def augment(self, img: Image.Image) -> Image.Image:
        """RGB conversion, then ColorJitter and horizontal flip of the whole image (official order)."""
        img = to_rgb(img)
        if self.color_jitter is not None:
            img = self.color_jitter(img)
        if self.hflip is not None:
            img = self.hflip(img)
        return img

    def sample_box(self, img: Image.Image) -> tuple[int, int, int, int]:
        """One RandomResizedCrop box (top, left, height, width) with torchvision's sampler (torch RNG).

        Up to 10 tries: area ~ U(scale) * H * W, log-ratio ~ U(log ratio), w = int(round(sqrt(area * r))),
        h = int(round(sqrt(area / r))); accepted if 0 < w <= W and 0 < h <= H, then top/left uniform. After
        10 failures: the centre crop with the ratio clamped to the ratio range. Same distribution as the
        official (timm-derived) sampler, which uses Python's ``random`` instead of torch's RNG.
        """
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(self.cfg.scale), list(self.cfg.ratio))
        return int(i), int(j), int(h), int(w)

    def draw_params(self, height: int, width: int) -> AugmentParams:
        """The random draws of :meth:`__call__` for an image of ``height x width`` pixels, without the image.

        Draws exactly the torch random numbers that :meth:`__call__` draws, in the same order (ColorJitter's
        ``get_params``, the flip's ``torch.rand(1)``, :meth:`sample_box`), so under one torch seed
        ``apply_params(img, draw_params(h, w))`` equals ``__call__(img)`` (a test checks it bit for bit).
        """
        jitter: tuple[tuple[int, float], ...] = ()
        cj = self.color_jitter
        if cj is not None:
            fn_idx, *factors = T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
            jitter = tuple((int(k), float(factors[k])) for k in fn_idx if factors[k] is not None)
        flip = self.hflip is not None and bool(torch.rand(1) < self.hflip.p)
        return AugmentParams(jitter, flip, self.sample_box(_size_only(height, width)))

    def apply_params(self, img: Image.Image, params: AugmentParams):
        """The views of ``img`` for given draws (deterministic): RGB conversion, the jitter operations in
        order (torchvision's PIL functions, as ``ColorJitter``), the flip, :meth:`render` of the box."""
        img = to_rgb(img)
        adjust = {BRIGHTNESS: F.adjust_brightness, CONTRAST: F.adjust_contrast, SATURATION: F.adjust_saturation,
                  HUE: F.adjust_hue}
        for op, factor in params.jitter:
            img = adjust[op](img, factor)
        if params.flip:
            img = F.hflip(img)
        return self.render(img, params.box)

    # -- normalisation: the one formula of both views, for the PIL and the device pipeline -------------------
    def normalize_patch_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., 3, S, S]`` -> ToTensor's ``/255`` -> ``Normalize(mean, std)``, float32."""
        return F.normalize(pixels.to(torch.float32).div(255), self.mean, self.std)

    def normalize_tokenizer_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., 3, S2, S2]`` -> ``/255`` -> ``map_pixels`` ("dall-e") or Normalize(0.5, 0.5), float32."""
        x = pixels.to(torch.float32).div(255)
        if self.cfg.tokenizer_view == "dall-e":
            return map_pixels(x)
        # "customized" (official: IMAGENET_INCEPTION mean/std)
        return F.normalize(x, list(IMAGENET_INCEPTION_MEAN), list(IMAGENET_INCEPTION_STD))

    def normalize(self, patch: torch.Tensor, tokenizer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views from their ``uint8`` pixels (what ``cfg.uint8_views`` yields), one image or a batch;
        equal bit for bit to the float views the transform renders without ``uint8_views``."""
        return self.normalize_patch_view(patch), self.normalize_tokenizer_view(tokenizer)

    def render_tokenizer_view(self, img: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The tokenizer view of one box of an RGB PIL image (deterministic): ``second_input_size``
        ``second_interpolation`` resize -> ToTensor -> ``map_pixels`` ("dall-e") or Normalize(0.5, 0.5)
        (``uint8`` pixels with ``cfg.uint8_views``)."""
        i, j, h, w = box
        view = F.resized_crop(img, i, j, h, w, self.second_size, self.second_interpolation)
        pixels = F.pil_to_tensor(view).contiguous()
        return pixels if self.cfg.uint8_views else self.normalize_tokenizer_view(pixels)

    def render(self, img: Image.Image, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of one box of an RGB PIL image (deterministic; ``uint8`` pixels with
        ``cfg.uint8_views``)."""
        i, j, h, w = box
        patch = F.pil_to_tensor(F.resized_crop(img, i, j, h, w, self.patch_size, self.patch_interpolation))
        patch = patch.contiguous()
        if not self.cfg.uint8_views:
            patch = self.normalize_patch_view(patch)
        return patch, self.render_tokenizer_view(img, box)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`augment`, one :meth:`sample_box`, :meth:`render`."""
        img = self.augment(img)
        return self.render(img, self.sample_box(img))

    def _repr_views(self) -> str:
        c = self.cfg
        return (f"patch={c.input_size}px {c.interpolation} mean={tuple(self.mean)} std={tuple(self.std)}, "
                f"tokenizer={c.second_input_size}px {c.second_interpolation} {c.tokenizer_view}")

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}(jitter={c.color_jitter}, hflip={c.hflip_prob}, "
            f"crop(scale={tuple(c.scale)}, ratio=({c.ratio[0]:.4f}, {c.ratio[1]:.4f})), {self._repr_views()})"
        )


class TokenizerViewTransform(TwoViewTransform):
    """PIL image -> the tokenizer view alone, ``[3, S2, S2]`` float32 (what a visual tokenizer such as the
    dVAE is trained on).

    The same steps as :class:`TwoViewTransform` (:meth:`augment`, :meth:`sample_box`, then
    :meth:`render` = :meth:`render_tokenizer_view`) drawing the same torch random numbers, without rendering
    the patch view: under the same torch seed the result equals ``TwoViewTransform(cfg)(img)[1]``. The
    patch-view settings of ``cfg`` are unused.
    """

    def render(self, img: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:  # type: ignore[override]
        """The tokenizer view of one box (deterministic)."""
        return self.render_tokenizer_view(img, box)

    def _repr_views(self) -> str:
        c = self.cfg
        return f"tokenizer={c.second_input_size}px {c.second_interpolation} {c.tokenizer_view}"
