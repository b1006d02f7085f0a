"""scikit-learn's handwritten digits as a small labelled image set that needs no download.

1,797 greyscale 8x8 images (16 grey levels) of the digits 0-9, from the UCI optical recognition data
set, shipped inside scikit-learn. They are the real, labelled data of the fine-tuning CLI's embedded
default and of ``beit_fast.evidence``. Images are upsampled (bicubic by default) to ``image_size`` and
returned as RGB ``PIL.Image`` so the same transforms as for photographs apply.

The split is fixed by ``seed`` and stratified: ``test_fraction`` of each class is held out (``"val"``),
the rest is ``"train"``; ``labels_per_class`` keeps only that many training images per class (the
few-label setting in which pretraining on all images, without their labels, should help).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "load_digits_arrays", "DIGIT_CLASSES"]

DIGIT_CLASSES = tuple(str(i) for i in range(10))


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``images uint8 [1797, 8, 8]`` (0..255) and ``labels int64 [1797]``, read-only (parsed once per
    process: every split and transform of a run shares them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays, each sorted; deterministic in ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(idx) * test_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(Dataset):
    """``(image, label)`` pairs: an RGB ``PIL.Image`` of ``image_size`` squared, or ``transform(image)``.

    ``split``: ``"train"``, ``"val"`` or ``"all"``. ``labels_per_class``: keep only the first that many
    training images of each class (after a seeded shuffle); only with ``split="train"``.
    """

    classes = DIGIT_CLASSES

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        transform: Callable | None = None,
        *,
        test_fraction: float = 0.25,
        labels_per_class: int | None = None,
        seed: int = 0,
        resample: int = Image.BICUBIC,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if labels_per_class is not None and (split != "train" or labels_per_class <= 0):
            raise ValueError("labels_per_class must be a positive integer and needs split='train'")
        images, labels = load_digits_arrays()
        if split == "all":
            idx = np.arange(len(labels))
        else:
            train, val = split_indices(labels, test_fraction, seed)
            idx = train if split == "train" else val
        if labels_per_class is not None:
            rng = np.random.default_rng(seed + 1)
            keep = []
            for c in range(10):
                members = idx[labels[idx] == c]
                if len(members) < labels_per_class:
                    raise ValueError(f"class {c} has only {len(members)} training images, "
                                     f"fewer than labels_per_class={labels_per_class}")
                keep.append(rng.permutation(members)[:labels_per_class])
            idx = np.sort(np.concatenate(keep))
        self.indices = idx
        self.targets = labels[idx].tolist()
        self._images = images[idx]
        self.image_size = image_size
        self.transform = transform
        self.resample = resample

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Image.Image:
        img = Image.fromarray(self._images[i], mode="L").resize((self.image_size,) * 2, self.resample)
        return img.convert("RGB")

    def __getitem__(self, i: int):
        img = self.image(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def __repr__(self) -> str:
        return f"DigitsDataset({len(self)} images, {self.image_size}x{self.image_size})"
