"""Worker side of the device input pipeline: file bytes, the image size and the sample's draws.

A DataLoader worker of the PIL pipeline decodes, jitters and resizes every image (about 10-20 ms of a
core each). Here it only reads the file, parses the JPEG header for the size (Pillow's lazy ``open``),
draws the sample's augmentation parameters and mask exactly as the PIL pipeline would
(:meth:`beit_fast.data.transforms.TwoViewTransform.draw_params` under the sample's torch seed; the mask from
the dataset's own generator) and ships the bytes. Decoding and everything after it run on the device
(:mod:`beit_fast.data.pipeline.device`).

What is decoded here instead (exactly as the PIL pipeline decodes it: ``ImageFolderDataset.load_image``, with
the image folder's ``jpeg_decoder``):
non-JPEG files, JPEGs that are not plain RGB or greyscale (CMYK, ...), and JPEGs that do not end with the
end-of-image marker (a truncated file raises there, and is skipped like today). Images that are already
PIL images (``SampleImages``) are shipped as pixels. Unreadable files are skipped with the PIL pipeline's
rule (the next readable index, with the requested index's randomness), and reported in ``skipped``.

A batch (:class:`EncodedBatch`) keeps all JPEG bytes in one ``uint8`` buffer (and all shipped pixels in
another), so a worker hands over a few tensors, and the DataLoader pins two buffers, not hundreds.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ..image_folder import ImageFolderDataset, check_image_pixels, open_regular_file
from ..pretraining import PretrainDataset, sample_seed
from ..transforms import AugmentParams, to_rgb

__all__ = ["EncodedImage", "EncodedSample", "EncodedBatch", "EncodedPretrainDataset", "read_encoded",
           "encode_pil", "collate_encoded"]

_SOI = b"\xff\xd8\xff"  # JPEG start of image (+ the first marker's 0xFF)
_EOI = b"\xff\xd9"  # JPEG end of image


@dataclass
class EncodedImage:
    """One image as a worker ships it: ``data`` uint8 JPEG bytes ``[n]`` (``is_jpeg``) or RGB pixels
    ``[3, height, width]``."""

    data: torch.Tensor
    height: int
    width: int

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


def encode_pil(img: Image.Image) -> EncodedImage:
    """An already decoded PIL image as RGB pixels (``to_rgb`` first, as the PIL pipeline)."""
    arr = np.asarray(to_rgb(img))
    return EncodedImage(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), arr.shape[0], arr.shape[1])


def read_encoded(path: str, max_image_pixels: int | None = None, jpeg_decoder: str = "auto") -> EncodedImage:
    """Read one file for the device pipeline; raises on a file the PIL pipeline could not read either.

    Plain RGB / greyscale JPEGs that end with the end-of-image marker: the bytes and the header's size,
    no decoding. Anything else: decoded here by ``ImageFolderDataset.load_image`` with ``jpeg_decoder`` (the
    PIL pipeline's decoder, so a bad file fails with the same error and a good one gives the same pixels).
    """
    with open_regular_file(path) as f:  # a regular file only, never blocking (a FIFO cannot hang a worker)
        raw = f.read()
    if raw.startswith(_SOI) and raw.endswith(_EOI):
        with Image.open(io.BytesIO(raw)) as im:  # lazy: parses the header only
            check_image_pixels(im, max_image_pixels)  # before nvJPEG ever sees it
            if im.format == "JPEG" and im.mode in ("RGB", "L"):
                width, height = im.size
                return EncodedImage(torch.frombuffer(bytearray(raw), dtype=torch.uint8), height, width)
    return encode_pil(ImageFolderDataset.load_image(path, max_image_pixels, jpeg_decoder))


@dataclass
class EncodedSample:
    """One sample before decoding: the image, its draws and mask, and where it came from."""

    index: int  # the sample index (its randomness)
    file_index: int  # the image actually used (index, or the next readable one)
    path: str  # that image's file ("" for in-memory images)
    image: EncodedImage
    params: AugmentParams
    mask: torch.Tensor  # bool [N]
    skipped: tuple[tuple[str, str], ...] = ()


class EncodedPretrainDataset(Dataset):
    """The samples of a :class:`beit_fast.data.pretraining.PretrainDataset`, before decoding (see the module docstring).

    Shares the wrapped dataset's images, transform (its :meth:`draw_params`), mask generator, seed and
    epoch (``set_epoch`` on either reaches both and persistent workers). Item ``i`` of epoch ``e`` draws the
    same random numbers as ``dataset.get(i, e)``, so after decoding and rendering it gives the same views.
    """

    def __init__(self, dataset: PretrainDataset) -> None:
        if not isinstance(dataset, PretrainDataset):
            raise TypeError(f"expected a beit_fast.data.pretraining.PretrainDataset, got {type(dataset).__name__}")
        if not hasattr(dataset.transform, "draw_params"):
            raise TypeError("the device input pipeline needs a TwoViewTransform (it draws the transform's "
                            f"parameters without the image); got {type(dataset.transform).__name__}")
        self.dataset = dataset

    @property
    def seed(self) -> int:
        return self.dataset.seed

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[EncodedImage, tuple[tuple[str, str], ...], int, str]:
        images = self.dataset.images
        if isinstance(images, ImageFolderDataset):
            read = functools.partial(read_encoded, jpeg_decoder=images.jpeg_decoder)
            image, skipped = images.get_with_skips(index, loader=read)
            file_index = (index + len(skipped)) % len(images)
            return image, skipped, file_index, images.path(file_index)
        pil, skipped = self.dataset._image(index)
        return encode_pil(pil), skipped, index, ""

    def get(self, index: int, epoch: int | None = None) -> EncodedSample:
        """Sample ``index`` of ``epoch`` (default: the current epoch), undecoded."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        epoch = self.dataset.epoch if epoch is None else int(epoch)
        image, skipped, file_index, path = self._load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.dataset.seed, epoch, index))
            params = self.dataset.transform.draw_params(image.height, image.width)
        mask = self.dataset._mask(epoch, index)
        return EncodedSample(index, file_index, path, image, params, mask, skipped)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.get(index)

    def mark_unreadable(self, file_index: int, reason: str) -> bool:
        """Record a file the device decoder could not read, so that :meth:`get` skips it from now on
        (this process only). False when the images are not files (nothing to skip to)."""
        images = self.dataset.images
        if not isinstance(images, ImageFolderDataset):
            return False
        images.mark_unreadable(file_index, reason)
        return True

    def __repr__(self) -> str:
        return f"EncodedPretrainDataset({self.dataset!r})"


def _shared_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """In a DataLoader worker: allocate in shared memory directly (no copy when the batch is sent)."""
    out = torch.empty(numel, dtype=dtype)
    return out.share_memory_() if get_worker_info() is not None else out


def _concat(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(one flat uint8 buffer, int64 offsets [len + 1])."""
    sizes = [int(p.numel()) for p in parts]
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    if parts:
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    buf = _shared_empty(int(offsets[-1]), torch.uint8)
    if parts:
        torch.cat([p.reshape(-1) for p in parts], out=buf)
    return buf, offsets


class EncodedBatch:
    """A collated batch of :class:`EncodedSample` (host tensors; ``pin_memory()`` for the DataLoader).

    ``jpeg_data`` / ``jpeg_offsets`` / ``jpeg_rows``: the JPEG bytes of batch rows ``jpeg_rows``;
    ``pixel_data`` / ``pixel_offsets`` / ``pixel_rows``: the pixels of the other rows (each ``[3, h, w]``
    flattened); ``sizes`` int64 ``[B, 2]`` (h, w); ``boxes`` int64 ``[B, 4]`` (top, left, height, width);
    ``flips`` bool ``[B]``; ``jitter_ops`` int64 ``[B, K]`` (-1 = none) and ``jitter_factors`` float32
    ``[B, K]``; ``masks`` bool ``[B, N]``; ``indices`` / ``file_indices`` int64 ``[B]``; ``paths``; ``skipped``.
    """

    _TENSORS = ("jpeg_data", "jpeg_offsets", "jpeg_rows", "pixel_data", "pixel_offsets", "pixel_rows", "sizes",
                "boxes", "flips", "jitter_ops", "jitter_factors", "masks", "indices", "file_indices")

    def __init__(self, **fields) -> None:
        for name in self._TENSORS + ("paths", "skipped"):
            setattr(self, name, fields[name])

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def jpeg(self, k: int) -> torch.Tensor:
        """The bytes of the k-th JPEG (row ``jpeg_rows[k]``), a view of the buffer."""
        return self.jpeg_data[int(self.jpeg_offsets[k]): int(self.jpeg_offsets[k + 1])]

    def pixels(self, k: int, data: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[3, h, w]`` pixels of the k-th shipped image (row ``pixel_rows[k]``), a view of ``data``
        (default: ``pixel_data``; e.g. its copy on the device, made once for all shipped images)."""
        row = int(self.pixel_rows[k])
        h, w = (int(v) for v in self.sizes[row])
        data = self.pixel_data if data is None else data
        return data[int(self.pixel_offsets[k]): int(self.pixel_offsets[k + 1])].view(3, h, w)

    def pin_memory(self, device=None) -> "EncodedBatch":  # ``device`` accepted, unused (deprecated)
        fields = {name: getattr(self, name) for name in self._TENSORS}
        fields = {k: v.pin_memory() for k, v in fields.items()}
        return EncodedBatch(**fields, paths=self.paths, skipped=self.skipped)

    def __reduce__(self):
        fields = {name: getattr(self, name) for name in self._TENSORS + ("paths", "skipped")}
        return (_rebuild_batch, (fields,))


def _rebuild_batch(fields: dict) -> EncodedBatch:
    return EncodedBatch(**fields)


def _jitter_rows(params: Sequence[AugmentParams]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max((len(p.jitter) for p in params), default=0)
    ops = torch.full((len(params), k), -1, dtype=torch.int64)
    factors = torch.ones((len(params), k), dtype=torch.float32)
    for row, p in enumerate(params):
        for slot, (op, factor) in enumerate(p.jitter):
            ops[row, slot] = op
            factors[row, slot] = factor  # a float32 value already (torch.empty(1).uniform_)
    return ops, factors


def collate_encoded(samples: Sequence[EncodedSample]) -> EncodedBatch:
    """Collate :class:`EncodedSample` s into one :class:`EncodedBatch`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    jpeg_rows = [r for r, s in enumerate(samples) if s.image.is_jpeg]
    pixel_rows = [r for r, s in enumerate(samples) if not s.image.is_jpeg]
    jpeg_data, jpeg_offsets = _concat([samples[r].image.data for r in jpeg_rows])
    pixel_data, pixel_offsets = _concat([samples[r].image.data for r in pixel_rows])
    ops, factors = _jitter_rows([s.params for s in samples])
    skipped: list[tuple[str, str]] = []
    for s in samples:
        skipped.extend(s.skipped)
    return EncodedBatch(
        jpeg_data=jpeg_data, jpeg_offsets=jpeg_offsets, jpeg_rows=torch.tensor(jpeg_rows, dtype=torch.int64),
        pixel_data=pixel_data, pixel_offsets=pixel_offsets, pixel_rows=torch.tensor(pixel_rows, dtype=torch.int64),
        sizes=torch.tensor([[s.image.height, s.image.width] for s in samples], dtype=torch.int64),
        boxes=torch.tensor([s.params.box for s in samples], dtype=torch.int64),
        flips=torch.tensor([s.params.flip for s in samples], dtype=torch.bool),
        jitter_ops=ops, jitter_factors=factors,
        masks=torch.stack([s.mask for s in samples]),
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
        file_indices=torch.tensor([s.file_index for s in samples], dtype=torch.int64),
        paths=tuple(s.path for s in samples), skipped=tuple(skipped),
    )
