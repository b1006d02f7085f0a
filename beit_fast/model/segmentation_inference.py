"""Inference as mmseg's ``EncoderDecoder`` does it: whole-image or sliding window, then (test-time
augmentation) horizontal flip and several scales averaged as softmax probabilities.

``logits_fn(x [B, 3, h, w]) -> [B, C, h, w]``: the model's logits resized (bilinear, align_corners=False) to
its input, mmseg's ``encode_decode`` (:func:`model_logits` for a :class:`~beit_fast.model.segmentation.
BeitForSegmentation`). The BEiT backbone takes one input size (its crop size): whole-image inference needs
images of that size; sliding windows of that size cover any image (smaller ones are padded with 0, the
normalised padding value of training, and the padding is cut off again).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.segmentation import rescale_size

__all__ = ["model_logits", "whole_logits", "slide_logits", "predict"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def model_logits(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` (logits at 1/4) resized to ``x``'s size: ``[B, C, h, w]``."""
    return F.interpolate(model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def whole_logits(logits_fn: LogitsFn, img: torch.Tensor) -> torch.Tensor:
    """mmseg ``whole_inference``: one forward of the whole image."""
    return logits_fn(img)


def slide_logits(logits_fn: LogitsFn, img: torch.Tensor, num_classes: int, crop: int | tuple[int, int],
                 stride: int | tuple[int, int]) -> torch.Tensor:
    """mmseg ``slide_inference``: windows of ``crop`` every ``stride`` (the last one flush with the border),
    their logits summed where they overlap and divided by the count. ``img [B, 3, H, W]`` -> ``[B, C, H, W]``.
    The official BEiT test config: crop 512, stride 341."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if sh <= 0 or sw <= 0 or sh > ch or sw > cw:
        raise ValueError(f"stride {sh}x{sw} must be in 1..crop ({ch}x{cw})")
    b, _, h, w = img.shape
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    preds = img.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            window = img[:, :, y1:y2, x1:x2]
            ph, pw = ch - window.shape[2], cw - window.shape[3]
            if ph or pw:  # an image smaller than the crop: pad, then cut the padding's logits off
                window = F.pad(window, (0, pw, 0, ph))
            logits = logits_fn(window)[:, :, : y2 - y1, : x2 - x1].float()
            preds[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def predict(logits_fn: LogitsFn, image: torch.Tensor, num_classes: int, *, mode: str = "slide",
            crop: int = 512, stride: int = 341, img_scale: tuple[int, int] | None = (2048, 512),
            ratios: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class ids ``int64 [H, W]`` for one normalised image ``[3, H, W]`` at its original size (mmseg's test
    pipeline): for each ratio, the image resized (bilinear) to ``img_scale * ratio`` keeping its aspect
    (``img_scale`` None: ``ratio`` times its own size), logits by ``mode`` ("slide" or "whole"), softmax,
    resized back to ``[H, W]``; with ``flip`` also of the mirrored image (mirrored back); the probabilities
    averaged over all of them, then argmax."""
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    h, w = image.shape[-2:]
    img = image.unsqueeze(0)
    total = None
    for r in ratios:
        if img_scale is None:
            size = (int(h * r + 0.5), int(w * r + 0.5))
        else:
            size = rescale_size(h, w, (int(img_scale[0] * r), int(img_scale[1] * r)))
        x = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = slide_logits(logits_fn, xi, num_classes, crop, stride) if mode == "slide" else \
                whole_logits(logits_fn, xi).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
    return total[0].argmax(0)
