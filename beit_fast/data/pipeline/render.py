"""Rendering on the device: decode, jitter, flip, both views, normalisation of a batch (no prefetching; the
loader that prefetches is :mod:`beit_fast.data.pipeline.device`).

:class:`DeviceTwoViewTransform` turns an :class:`~beit_fast.data.pipeline.encoded.EncodedBatch` into the
batch the training step takes, ``(patch_images float32 [B, 3, S, S], tokenizer_images float32
[B, 3, S2, S2], bool_masked_pos bool [B, N])`` on the device:

1. JPEG decode, batched: ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA, libjpeg-turbo on
   CPU tensors); images the workers decoded (non-JPEG files) are copied from pinned host memory.
2. Rows in chunks of similar shape, each chunk's padded buffers bounded (:func:`bounded_chunks`: at most
   ``PAD_FACTOR`` times its own pixels): the crops of a chunk are cut (unflipped) into one zero-padded
   ``uint8 [n, 3, h, w]`` tensor and colour-jittered there (:func:`~beit_fast.data.pipeline.ops.color_jitter`,
   each image with its own order and factors; the contrast step's grey mean comes from the whole image,
   :func:`~beit_fast.data.pipeline.ops.contrast_means`).
3. Each view by two batched matrix products with Pillow's resampling weights
   (:func:`~beit_fast.data.pipeline.ops.resample_weights`): the flip is folded into the weights.
4. ``/255``, then ``Normalize`` (patch view) and ``map_pixels`` (tokenizer view) with the very function
   the PIL pipeline calls.

With the CPU decoder (bit-identical to Pillow's, both libjpeg-turbo) the views equal the PIL pipeline's
bit for bit; nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a level here and there, which
is the only difference on a GPU (measure it with ``benchmarks/bench_input_pipeline.py``).
"""
from __future__ import annotations

import math
import warnings

import torch

from ..transforms import TwoViewConfig, TwoViewTransform
from .encoded import EncodedBatch
from .ops import (BAND_ELEMENTS, FILTERS, color_jitter, contrast_means, resample_weights, resize_crops,
                  vertical_pass_first)


def device_pipeline_problems(interpolation: str, second_interpolation: str) -> list[str]:
    """Why the device pipeline cannot render views with these filters (empty list: it can)."""
    problems = []
    for flag, value in (("--train_interpolation", interpolation), ("--second_interpolation", second_interpolation)):
        if value not in FILTERS:
            problems.append(f"--data_pipeline gpu supports {flag} {', '.join(sorted(FILTERS))} (Pillow's "
                            f"convolution filters), not {value}; use --data_pipeline pil")
    return problems


def _decode_jpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cpu":
        return list(decode_jpeg(data, mode=ImageReadMode.RGB))
    return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))


def _decode_with_pillow(data: torch.Tensor) -> torch.Tensor:
    """The PIL pipeline's decode of JPEG bytes (raises on a bad file)."""
    import io

    import numpy as np
    from PIL import Image

    from ..transforms import to_rgb

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        im.load()
        arr = np.asarray(to_rgb(im))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


#: A chunk's zero-padded buffer (largest height x largest width x rows) holds at most this many times the
#: pixels of its own images (whole images for the contrast means, crops for the resize).
PAD_FACTOR = 4
#: Pixels of the images (and of the crops) of one chunk, beyond its first image: bounds the float64 resize
#: buffers (about 3 x 8 bytes per pixel) whatever ``chunk_size`` is.
CHUNK_PIXELS = 2**24


def bounded_chunks(sizes: torch.Tensor, crop_sizes: torch.Tensor, chunk_size: int) -> list[list[int]]:
    """Rows of a batch in chunks whose padded buffers stay bounded (a 60000x1 image never shares a buffer
    with a 1x60000 one): rows sorted by crop shape (aspect ratio, then area), each chunk grown while it has
    fewer than ``chunk_size`` rows, ``rows x max h x max w`` of both its images and its crops is at most
    :data:`PAD_FACTOR` times their own pixels, and those pixels at most :data:`CHUNK_PIXELS`. A chunk's
    first image always fits (the per-image pixel limit bounds it). The views do not depend on the chunking. ``sizes`` / ``crop_sizes``: ``[B, 2]``
    heights and widths."""
    hw = [(int(h), int(w)) for h, w in sizes.tolist()]
    crops = [(max(int(h), 1), max(int(w), 1)) for h, w in crop_sizes.tolist()]
    order = sorted(range(len(hw)), key=lambda r: (round(math.log2(crops[r][0] / crops[r][1])),
                                                   crops[r][0] * crops[r][1], r))
    chunks: list[list[int]] = []
    current: list[int] = []
    stats = [0, 0, 0, 0, 0, 0]  # images: max h, max w, pixels; crops: the same

    def fits(r: int) -> bool:
        n = len(current) + 1
        for k, (h, w) in ((0, hw[r]), (3, crops[r])):
            mh, mw, px = max(stats[k], h), max(stats[k + 1], w), stats[k + 2] + h * w
            if n * mh * mw > PAD_FACTOR * px or px > CHUNK_PIXELS:
                return False
        return True

    for r in order:
        if current and (len(current) >= chunk_size or not fits(r)):
            chunks.append(current)
            current, stats = [], [0, 0, 0, 0, 0, 0]
        current.append(r)
        for k, (h, w) in ((0, hw[r]), (3, crops[r])):
            stats[k], stats[k + 1], stats[k + 2] = max(stats[k], h), max(stats[k + 1], w), stats[k + 2] + h * w
    if current:
        chunks.append(current)
    return chunks


class DeviceTwoViewTransform:
    """The two BEiT views of an :class:`EncodedBatch`, computed on ``device`` (see the module docstring).

    Args:
        cfg: the PIL pipeline's :class:`TwoViewConfig` (sizes, filters, normalisation, tokenizer view).
        device: where to decode and compute (``cuda``, ``cuda:1``, ``cpu``).
        exact: float64 resampling sums, Pillow's integer arithmetic exactly (default); False: float32
            (faster where float64 is slow, e.g. consumer GPUs; may differ from Pillow by one level).
        chunk_size: images padded and resized together (bounds the padded float64 tensor's memory:
            about ``chunk * 3 * H * W * 8`` bytes for the largest images of a chunk).
        decoder: ``"device"`` (decode_jpeg on ``device``), ``"cpu"`` (libjpeg-turbo on the host, then a
            copy; for CUDA builds without nvJPEG) or ``"auto"`` (device, falling back to cpu once if
            torchvision has no nvJPEG).
    """

    def __init__(self, cfg: TwoViewConfig, device: str | torch.device = "cpu", exact: bool = True,
                 chunk_size: int = 64, decoder: str = "auto") -> None:
        problems = device_pipeline_problems(cfg.interpolation, cfg.second_interpolation)
        if problems:
            raise ValueError("; ".join(problems))
        if decoder not in ("auto", "device", "cpu"):
            raise ValueError(f"decoder must be auto, device or cpu, got {decoder!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.cfg = cfg
        self._normalize = TwoViewTransform(cfg).normalize  # the PIL pipeline's formula
        self.device = torch.device(device)
        self.exact = bool(exact)
        self.chunk_size = int(chunk_size)
        self.decoder = decoder

    # -- decode --------------------------------------------------------------------------------------------
    def decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor | None], list[tuple[int, str]]]:
        """Decoded ``uint8 [3, h, w]`` images on the device, one per row (None for a failed row), and the
        failures ``(row, reason)``. A batch the decoder rejects is retried image by image; an image the
        device decoder rejects is decoded by Pillow; only one Pillow rejects too is a failure."""
        images: list[torch.Tensor | None] = [None] * len(batch)
        failures: list[tuple[int, str]] = []
        if batch.pixel_rows.numel():  # one copy for every image the workers decoded, not one per image
            shipped = batch.pixel_data.to(self.device, non_blocking=True)
            for k in range(int(batch.pixel_rows.numel())):
                images[int(batch.pixel_rows[k])] = batch.pixels(k, shipped)
        rows = [int(r) for r in batch.jpeg_rows]
        if not rows:
            return images, failures
        data = [batch.jpeg(k) for k in range(len(rows))]
        decode_device = self.device if self.decoder != "cpu" else torch.device("cpu")
        try:
            decoded: list[torch.Tensor | None] = _decode_jpeg(data, decode_device)
        except RuntimeError as e:
            if self.decoder == "auto" and decode_device.type == "cuda" and "nvjpeg" in str(e).lower():
                warnings.warn(f"torchvision cannot decode JPEGs on {self.device} ({e}); decoding on the CPU "
                              "instead (slower)", RuntimeWarning, stacklevel=2)
                self.decoder = "cpu"
                return self.decode(batch)
            decoded = []
            for d in data:  # find the bad ones
                try:
                    decoded.append(_decode_jpeg([d], decode_device)[0])
                except RuntimeError:
                    decoded.append(None)
        for k, (row, img) in enumerate(zip(rows, decoded)):
            h, w = (int(v) for v in batch.sizes[row])
            if img is not None and tuple(img.shape) != (3, h, w):
                img = None  # the header said otherwise: let Pillow decide
            if img is None:
                try:
                    img = _decode_with_pillow(data[k])
                    if tuple(img.shape) != (3, h, w):
                        raise ValueError(f"decoded size {tuple(img.shape[1:])} differs from the header's {(h, w)}")
                except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unreadable
                    failures.append((row, f"{type(e).__name__}: {e}"))
                    continue
            images[row] = img.to(self.device, non_blocking=True)
        return images, failures

    # -- render --------------------------------------------------------------------------------------------
    def render(self, images: list[torch.Tensor], batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch_images float32 [B, 3, S, S], tokenizer_images float32 [B, 3, S2, S2])`` on the device.

        Rows are processed in chunks of similar shape (:func:`bounded_chunks`): each chunk's zero-padded
        buffers hold at most :data:`PAD_FACTOR` times its images' own pixels."""
        cfg, dev, b = self.cfg, self.device, len(batch)
        s1, s2 = cfg.input_size, cfg.second_input_size
        patch = torch.empty(b, 3, s1, s1, dtype=torch.float32, device=dev)
        tok = torch.empty(b, 3, s2, s2, dtype=torch.float32, device=dev)
        # The batch's draws on the device once (from pinned memory, asynchronous), not a small copy per chunk.
        on_device = {name: getattr(batch, name).to(dev, non_blocking=True)
                     for name in ("sizes", "boxes", "flips", "jitter_ops", "jitter_factors")}
        for rows in bounded_chunks(batch.sizes, batch.boxes[:, 2:4], self.chunk_size):
            p, t = self._render_chunk([images[r] for r in rows], batch, rows, on_device)
            if rows == list(range(rows[0], rows[0] + len(rows))):
                patch[rows[0]: rows[0] + len(rows)] = p
                tok[rows[0]: rows[0] + len(rows)] = t
            else:
                index = torch.tensor(rows, dtype=torch.int64, device=dev)
                patch.index_copy_(0, index, p)
                tok.index_copy_(0, index, t)
        return patch, tok

    def _render_chunk(self, images: list[torch.Tensor], batch: EncodedBatch, rows: list[int],
                      on_device: dict[str, torch.Tensor]):
        """``rows``' views; ``on_device``: the batch's sizes, boxes, flips and jitter draws on the device
        (the host ones give the shapes)."""
        cfg, dev = self.cfg, self.device
        sel = torch.tensor(rows, dtype=torch.int64)
        sizes, boxes, flips = batch.sizes[sel], batch.boxes[sel], batch.flips[sel]
        top, left, bh, bw = boxes.unbind(1)
        # The box is in the flipped image when flipping: it covers source columns [W - left - w, W - left),
        # mirrored. Crops are cut unflipped; the flip goes into the horizontal weights.
        x0 = torch.where(flips, sizes[:, 1] - left - bw, left)
        ops = batch.jitter_ops[sel]
        present = [set(ops[:, k].tolist()) for k in range(ops.shape[1])]
        sel_dev = sel.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else sel
        ops_dev, factors_dev, sizes_dev, boxes_dev, flips_dev = (
            on_device[name][sel_dev] for name in ("jitter_ops", "jitter_factors", "sizes", "boxes", "flips"))
        means = None
        if any(1 in kinds for kinds in present):  # CONTRAST: its mean is over the whole image
            hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
            whole = torch.zeros(len(rows), 3, hmax, wmax, dtype=torch.uint8, device=dev)
            for k, img in enumerate(images):
                whole[k, :, : img.shape[1], : img.shape[2]].copy_(img)
            means = contrast_means(whole, ops_dev, factors_dev, sizes_dev[:, 0] * sizes_dev[:, 1], present)
            del whole
        hc, wc = int(bh.max()), int(bw.max())
        crops = torch.zeros(len(rows), 3, hc, wc, dtype=torch.uint8, device=dev)
        for k, img in enumerate(images):
            t, x, h, w = int(top[k]), int(x0[k]), int(bh[k]), int(bw[k])
            crops[k, :, :h, :w].copy_(img[:, t: t + h, x: x + w])
        if ops.shape[1]:  # per pixel (the contrast means come from the whole images): in bands of rows
            step = max(1, BAND_ELEMENTS // max(len(rows) * 3 * wc, 1))
            for i in range(0, hc, step):
                crops[:, :, i: i + step] = color_jitter(crops[:, :, i: i + step], ops_dev, factors_dev, None,
                                                        present, means)
        views = []
        zeros = torch.zeros(len(rows), dtype=torch.int64, device=dev)
        bh_dev, bw_dev = boxes_dev[:, 2], boxes_dev[:, 3]
        for size, interp in ((cfg.input_size, cfg.interpolation), (cfg.second_input_size, cfg.second_interpolation)):
            wy = resample_weights(bh_dev, zeros, torch.zeros(len(rows), dtype=torch.bool, device=dev), size, hc,
                                  interp)
            wx = resample_weights(bw_dev, torch.where(flips_dev, bw_dev - 1, 0), flips_dev, size, wc, interp)
            views.append(resize_crops(crops, wy, wx, vertical_pass_first(bh, bw, size, size), self.exact))
        return self._normalize(views[0], views[1])

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and render a batch whose images all decode (raises naming the file otherwise; the loader
        replaces unreadable images instead)."""
        images, failures = self.decode(batch)
        if failures:
            row, reason = failures[0]
            raise RuntimeError(f"cannot decode {batch.paths[row] or f'row {row}'}: {reason}")
        return self.render(images, batch)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"DeviceTwoViewTransform(device={self.device}, decoder={self.decoder}, exact={self.exact}, "
                f"chunk={self.chunk_size}, patch={c.input_size}px {c.interpolation}, "
                f"tokenizer={c.second_input_size}px {c.second_interpolation} {c.tokenizer_view})")
