"""Tensor ops of the device input pipeline, written to reproduce Pillow's arithmetic (CPU or CUDA tensors).

The PIL pipeline (:class:`beit_fast.data.transforms.TwoViewTransform`) jitters, flips and resizes 8-bit images
with Pillow. These functions do the same on batches of ``uint8`` tensors, following Pillow's integer and
rounding rules, so that for the same decoded pixels and the same draws the views are the PIL views:

* :func:`color_jitter`: ``ImageEnhance`` Brightness / Contrast / Color as torchvision's PIL functions call
  them: ``Image.blend(degenerate, image, factor)`` computed in float32 and truncated to ``uint8``
  (``in1 + factor * (in2 - in1)``, clipped to [0, 255]); grey = Pillow's ``convert("L")``
  (``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``); the contrast degenerate is the rounded mean of
  the whole image's grey (``int(mean + 0.5)``).
* :func:`resample_weights` / :func:`resize_crops`: Pillow's separable resampling (``Image.resize`` with
  the BOX, BILINEAR, HAMMING, BICUBIC or LANCZOS filter; the support widens with the downscaling factor, i.e.
  antialiasing): the same window bounds, weights normalised per output pixel then rounded to 22-bit fixed
  point, a first pass rounded and clipped to ``uint8``, then the second (horizontal first, or vertical
  first where Pillow 13 does so: :func:`vertical_pass_first`). The crop and the
  horizontal flip are folded into the weight matrices, so a whole batch of differently sized, zero-padded
  images is resized by two batched matrix products. In float64 (``exact=True``) every sum is an exact
  integer, so the result is Pillow's bit for bit up to the double rounding of the weights themselves;
  float32 is faster where float64 is slow (consumer GPUs) and may differ by one level.

Shapes: images ``[B, 3, H, W]`` uint8, zero-padded to the batch's largest height and width (an image of
size ``h x w`` occupies ``[:, :h, :w]``); per-image parameters are ``[B]`` or ``[B, k]`` tensors on the
images' device.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..transforms import BRIGHTNESS, CONTRAST, SATURATION

__all__ = ["FILTERS", "PRECISION_BITS", "pil_gray", "color_jitter", "contrast_means", "resample_weights",
           "resize_crops",
           "vertical_pass_first"]

#: Fixed-point fraction bits of Pillow's 8-bit resampling coefficients (``32 - 8 - 2``).
PRECISION_BITS = 22


# --------------------------------------------------------------------------------------------------------
# Colour jitter
# --------------------------------------------------------------------------------------------------------
def pil_gray(images: Tensor) -> Tensor:
    """Pillow's ``convert("L")`` of ``uint8 [..., 3, H, W]`` -> ``int32 [..., 1, H, W]`` (ITU-R 601-2 luma,
    integer weights 19595 / 38470 / 7471 out of 65536, rounded)."""
    x = images.to(torch.int32)
    return (x[..., 0:1, :, :] * 19595 + x[..., 1:2, :, :] * 38470 + x[..., 2:3, :, :] * 7471 + 0x8000) >> 16


def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ``Image.blend(degenerate, images, factor)`` for uint8 images: float32
    ``d + f * (x - d)`` clipped to [0, 255] and truncated. ``factor``: float32 ``[B, 1, 1, 1]``."""
    d = degenerate.to(torch.float32)
    # two separate float32 roundings (product, then sum), as Pillow's C code; never a fused multiply-add
    v = d + factor * (images.to(torch.float32) - d)
    return v.clamp_(0, 255).trunc_().to(torch.uint8)


def color_jitter(images: Tensor, ops: Tensor, factors: Tensor, num_pixels: Tensor | None = None,
                 present: list[set[int]] | None = None, contrast_mean: Tensor | None = None) -> Tensor:
    """Brightness / contrast / saturation jitter of a batch, each image with its own order and factors.

    Args:
        images: ``uint8 [B, 3, H, W]``, zero beyond each image's own size.
        ops: ``int64 [B, K]``: the operation of slot k for each image (``BRIGHTNESS``, ``CONTRAST``,
            ``SATURATION``; -1 = none), applied for k = 0, 1, ... (``AugmentParams.jitter`` order).
        factors: ``float32 [B, K]``: the factor of each slot (any value where the op is -1).
        num_pixels: ``[B]`` ``h * w`` of each image (the contrast mean is over the image, not the padding).
        present: optional host-side ``K`` sets of the ops present in each slot (skips work; derived from
            ``ops`` with a device sync when omitted).
        contrast_mean: int32 ``[B]`` contrast degenerate levels computed elsewhere
            (:func:`contrast_means` of the whole images): then ``images`` may be crops of them, since
            every other step is per pixel.

    Returns ``uint8 [B, 3, H, W]``. The padding stays zero through brightness and saturation, so the grey
    sums that feed the contrast mean are those of the images themselves; after contrast it is not zero
    (harmless: the resampling weights never read it).
    """
    return _jitter(images, ops, factors, num_pixels, present, contrast_mean)[0]


def contrast_means(images: Tensor, ops: Tensor, factors: Tensor, num_pixels: Tensor,
                   present: list[set[int]] | None = None) -> Tensor:
    """int32 ``[B]``: the grey level each image's contrast step blends with (Pillow: the rounded mean of
    ``convert("L")`` of the whole image as it is when contrast is applied, i.e. after the operations
    before it); 0 for images without contrast. Arguments as :func:`color_jitter` (whole images)."""
    return _jitter(images, ops, factors, num_pixels, present, None, means_only=True)[1]


def _check_jitter_args(images: Tensor, ops: Tensor, factors: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if ops.shape != factors.shape or ops.dim() != 2 or ops.shape[0] != images.shape[0]:
        raise ValueError(f"ops {tuple(ops.shape)} and factors {tuple(factors.shape)} must be [B, K] with B = "
                         f"{images.shape[0]}")


def _jitter(images: Tensor, ops: Tensor, factors: Tensor, num_pixels: Tensor | None,
            present: list[set[int]] | None, contrast_mean: Tensor | None,
            means_only: bool = False) -> tuple[Tensor, Tensor]:
    _check_jitter_args(images, ops, factors)
    if present is None:
        present = [set(ops[:, k].tolist()) for k in range(ops.shape[1])]
    if any(kinds - {-1, BRIGHTNESS, CONTRAST, SATURATION} for kinds in present):
        raise ValueError("color_jitter supports brightness, contrast and saturation (BEiT does not jitter hue)")
    x = images
    dev = x.device
    shape = (-1, 1, 1, 1)
    means = torch.zeros(x.shape[0], dtype=torch.int32, device=dev)
    last_contrast = max((k for k, kinds in enumerate(present) if CONTRAST in kinds), default=-1)
    for k, kinds in enumerate(present):
        kinds = kinds - {-1}
        if means_only and k > last_contrast:
            break
        if not kinds:
            continue
        op = ops[:, k].view(shape)
        # factor 1 for images without an op in this slot: d + 1 * (x - d) == x exactly in float32
        f = torch.where(op >= 0, factors[:, k].view(shape).to(torch.float32), torch.ones((), device=dev))
        need_gray = SATURATION in kinds or (CONTRAST in kinds and contrast_mean is None)
        gray = pil_gray(x) if need_gray else None
        degenerate = torch.zeros((), dtype=torch.int32, device=dev)
        if CONTRAST in kinds:
            if contrast_mean is None:
                if num_pixels is None:
                    raise ValueError("num_pixels is needed to compute the contrast mean")
                sums = gray.sum(dim=(1, 2, 3), dtype=torch.int64).to(torch.float64)
                # ImageStat's mean (sum / count in double) + 0.5, truncated: Contrast's degenerate grey level
                mean = torch.floor(sums / num_pixels.to(torch.float64) + 0.5).to(torch.int32)
                means = torch.where(ops[:, k] == CONTRAST, mean, means)
            else:
                mean = contrast_mean.to(torch.int32)
            degenerate = torch.where(op == CONTRAST, mean.view(shape), degenerate)
        if SATURATION in kinds:
            degenerate = torch.where(op == SATURATION, gray, degenerate)
        if means_only and k == last_contrast:
            break
        x = _blend(degenerate, x, f)
    return x, means


# --------------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------------
def _box(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _bilinear(x: Tensor) -> Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _hamming(x: Tensor) -> Tensor:
    x = x.abs()
    px = x * math.pi
    safe = torch.where(x == 0.0, torch.ones_like(px), px)
    # Pillow: sin(x) / x * (0.54f + 0.46f * cos(x)), float constants promoted to double
    v = torch.sin(safe) / safe * (float(torch.tensor(0.54, dtype=torch.float32)) +
                                  float(torch.tensor(0.46, dtype=torch.float32)) * torch.cos(safe))
    return torch.where(x == 0.0, torch.ones_like(x), torch.where(x >= 1.0, torch.zeros_like(x), v))


def _bicubic(x: Tensor) -> Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _sinc(x: Tensor) -> Tensor:
    px = x * math.pi
    safe = torch.where(x == 0.0, torch.ones_like(px), px)
    return torch.where(x == 0.0, torch.ones_like(x), torch.sin(safe) / safe)


def _lanczos(x: Tensor) -> Tensor:
    inside = (x >= -3.0) & (x < 3.0)
    return torch.where(inside, _sinc(x) * _sinc(x / 3), torch.zeros_like(x))


#: Pillow's resampling filters: name -> (function, support at scale 1).
FILTERS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "box": (_box, 0.5), "bilinear": (_bilinear, 1.0), "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0),
}


def resample_weights(length: Tensor, origin: Tensor, reverse: Tensor, out_size: int, total: int,
                     filter: str) -> Tensor:
    """Fixed-point weights of Pillow's resize of a crop, as dense matrices over the source axis.

    For image b, the crop is ``length[b]`` source pixels along this axis; crop pixel ``c`` is source pixel
    ``origin[b] + c``, or ``origin[b] - c`` when ``reverse[b]`` (a horizontal flip folded in). The crop is
    resized to ``out_size`` pixels with Pillow's filter window and weights (``Image.resize`` of the cropped
    image: the window is clipped to the crop, not to the whole image).

    Returns ``float64 [B, out_size, total]`` holding integers (weights times 2**22, rounded like Pillow's
    ``normalize_coeffs_8bpc``), zero outside each window. ``length``, ``origin``: int64 ``[B]``;
    ``reverse``: bool ``[B]``; all on the device the weights should live on.
    """
    if filter not in FILTERS:
        raise ValueError(f"unsupported filter {filter!r} for the tensor resampler; expected one of {sorted(FILTERS)}")
    fn, base_support = FILTERS[filter]
    dev = length.device
    n = length.to(torch.float64).view(-1, 1, 1)  # [B, 1, 1]
    scale = n / out_size  # in1 - in0 = crop length (the crop starts at 0 in Pillow's cropped image)
    filterscale = torch.clamp(scale, min=1.0)
    support = base_support * filterscale
    xx = torch.arange(out_size, dtype=torch.float64, device=dev).view(1, -1, 1)
    center = (xx + 0.5) * scale  # [B, out, 1]
    xmin = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), n)
    t = torch.arange(total, dtype=torch.float64, device=dev).view(1, 1, -1)
    o = origin.to(torch.float64).view(-1, 1, 1)
    c = torch.where(reverse.view(-1, 1, 1), o - t, t - o)  # crop coordinate of each source pixel
    inside = (c >= xmin) & (c < xmax)
    ss = 1.0 / filterscale
    w = torch.where(inside, fn((c - center + 0.5) * ss), torch.zeros((), dtype=torch.float64, device=dev))
    ww = w.sum(dim=-1, keepdim=True)
    k = torch.where(ww != 0.0, w / torch.where(ww != 0.0, ww, torch.ones_like(ww)), w)
    one = float(1 << PRECISION_BITS)
    return torch.where(k < 0, torch.trunc(-0.5 + k * one), torch.trunc(0.5 + k * one))


def _round_clip(acc: Tensor) -> Tensor:
    """Pillow's ``clip8``: ``(sum + 2**21) >> 22`` clipped to [0, 255] (exact for float64 integer sums)."""
    return torch.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp_(0, 255)


#: Elements of the float copy of an image band in the first resampling pass (:func:`resize_crops`): 128 MiB
#: in float64, whatever the image size.
BAND_ELEMENTS = 2**24


def resize_crops(images: Tensor, weights_y: Tensor, weights_x: Tensor, vertical_first: Tensor | None = None,
                 exact: bool = True) -> Tensor:
    """Resize one crop per image with precomputed :func:`resample_weights`.

    ``images``: uint8 ``[B, 3, H, W]``; ``weights_y``: ``[B, out_h, H]``; ``weights_x``: ``[B, out_w, W]``;
    ``vertical_first``: bool ``[B]`` (host), which pass runs first for each image (see
    :func:`vertical_pass_first`; default: horizontal first). The first pass is rounded and clipped to 8
    bits before the second, as in Pillow. Returns uint8 ``[B, 3, out_h, out_w]``. ``exact``: float64 sums
    (Pillow's integers exactly); False: float32, unless TF32 is on for CUDA matmuls (then float64: the flag is
    global and the training thread's compiled step watches it, so this loader code never changes it).
    """
    dtype = _resample_dtype(images.device, exact)
    b = images.shape[0]
    out = torch.empty(b, 3, weights_y.shape[1], weights_x.shape[1], dtype=torch.uint8, device=images.device)
    vfirst = torch.zeros(b, dtype=torch.bool) if vertical_first is None else vertical_first.cpu()
    for flag in (False, True):
        sel = (vfirst == flag).nonzero().flatten()
        if sel.numel() == 0:
            continue
        whole = sel.numel() == b
        idx = sel.to(images.device)
        x = images if whole else images.index_select(0, idx)
        wx = (weights_x if whole else weights_x.index_select(0, idx)).to(dtype).transpose(1, 2).unsqueeze(1)
        wy = (weights_y if whole else weights_y.index_select(0, idx)).to(dtype).unsqueeze(1)
        # The first pass in bands of columns (vertical first) or rows (horizontal first), each converted to
        # ``dtype`` on its own: the float copy of a large image stays within BAND_ELEMENTS (the sums are those
        # of the whole image: the bands split a dimension the pass does not sum over).
        n, c, h, w = x.shape
        if flag:  # [B,1,oh,H] @ [B,3,H,W] -> [B,3,oh,W], then @ [B,1,W,ow]
            step = max(1, BAND_ELEMENTS // max(n * c * h, 1))
            mid = torch.cat([_round_clip(torch.matmul(wy, x[..., j: j + step].to(dtype)))
                             for j in range(0, w, step)], dim=3) if w > step else \
                _round_clip(torch.matmul(wy, x.to(dtype)))
            res = _round_clip(torch.matmul(mid, wx))
        else:  # [B,3,H,W] @ [B,1,W,ow] -> [B,3,H,ow], then [B,1,oh,H] @ that
            step = max(1, BAND_ELEMENTS // max(n * c * w, 1))
            mid = torch.cat([_round_clip(torch.matmul(x[:, :, i: i + step].to(dtype), wx))
                             for i in range(0, h, step)], dim=2) if h > step else \
                _round_clip(torch.matmul(x.to(dtype), wx))
            res = _round_clip(torch.matmul(wy, mid))
        if whole:
            return res.to(torch.uint8)
        out.index_copy_(0, idx, res.to(torch.uint8))
    return out


_VERTICAL_FIRST_RULE: bool | None = None


def _pillow_reorders_passes() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks much more than
    the width (Pillow 13, python-pillow/Pillow#9549; earlier versions always start horizontally).

    Decided once per process by resizing a small random image both ways and comparing with Pillow."""
    global _VERTICAL_FIRST_RULE
    if _VERTICAL_FIRST_RULE is None:
        import numpy as np
        from PIL import Image

        h, w, oh, ow = 120, 60, 40, 58  # height 3x smaller, width almost kept: the orders differ here
        arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = torch.from_numpy(np.array(Image.fromarray(arr).resize((ow, oh), Image.BICUBIC))).permute(2, 0, 1)
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
        zero, no = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.bool)
        wy = resample_weights(torch.tensor([h]), zero, no, oh, h, "bicubic")
        wx = resample_weights(torch.tensor([w]), zero, no, ow, w, "bicubic")
        vfirst = resize_crops(x, wy, wx, torch.ones(1, dtype=torch.bool))[0]
        hfirst = resize_crops(x, wy, wx, torch.zeros(1, dtype=torch.bool))[0]
        if torch.equal(vfirst, ref) == torch.equal(hfirst, ref):
            raise RuntimeError("cannot tell the installed Pillow's resampling pass order: the tensor resampler "
                               "matches neither order (an unexpected Pillow build?)")
        _VERTICAL_FIRST_RULE = torch.equal(vfirst, ref)
    return _VERTICAL_FIRST_RULE


def vertical_pass_first(in_h: Tensor, in_w: Tensor, out_h: int, out_w: int) -> Tensor:
    """bool ``[B]``: does Pillow resize an ``in_h x in_w`` image to ``out_h x out_w`` vertically first?

    Pillow 13: when the height is reduced and by more than twice as many pixels as the width
    (``out_h < in_h and in_h - out_h > 2 * (in_w - out_w)``); earlier Pillow: never. Matters because the
    first pass is rounded to 8 bits."""
    if not _pillow_reorders_passes():
        return torch.zeros(in_h.shape, dtype=torch.bool)
    return (in_h > out_h) & ((in_h - out_h) > 2 * (in_w - out_w))


def _resample_dtype(device: torch.device, exact: bool) -> torch.dtype:
    """float64 for ``exact``; else float32, unless CUDA matmuls may use TF32 (10-bit mantissas would move
    pixels by more than a level): float64 then, read from the flag, never set (it is process-wide)."""
    if exact or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return torch.float64
    return torch.float32
