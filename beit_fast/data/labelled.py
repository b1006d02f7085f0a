"""Labelled images for fine-tuning and linear probing: class folders read through the same safe scanner as
pretraining's image folders, or the embedded handwritten digits.

:class:`LabelledImageFolder` is ``root/<class>/**/<image>`` as ``(image, class index)`` pairs (torchvision's
``ImageFolder`` layout and class order) on :class:`beit_fast.data.image_folder.ImageFolderDataset`: symlink loops end,
each real folder is read once, FIFOs and other non-regular files named like images are never opened, images
over ``max_image_pixels`` are skipped before decoding, JPEGs are decoded by ``jpeg_decoder`` (Pillow's
pixels either way), and an unreadable file is skipped (with a warning) in favour of the next readable image,
with that image's label. torchvision's ``ImageFolder`` has none of this.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from .image_folder import ImageFolderDataset
from ..utils.options import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["LabelledImageFolder", "load_classification_data", "count_class_folders"]


class LabelledImageFolder(Dataset):
    """``(transform(image), label)`` for every image under ``root/<class>/`` (recursively), classes sorted by
    name (``classes``, ``class_to_idx``, ``targets`` as torchvision's ``ImageFolder``). ``ValueError`` when
    no image is found or an image lies outside a class folder; ``FileNotFoundError`` for a missing ``root``.
    ``transform`` may be set after construction."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, jpeg_decoder: str = "auto") -> None:
        self.images = ImageFolderDataset(root, max_image_pixels=max_image_pixels, jpeg_decoder=jpeg_decoder)
        if self.images.targets is None:
            raise ValueError(f"images must lie in class folders ({self.images.root}/<class>/...), but some lie "
                             f"directly in {self.images.root}")
        self.classes: list[str] = list(self.images.classes)
        self.class_to_idx = dict(self.images.class_to_idx)
        self.targets: list[int] = list(self.images.targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, skipped = self.images.get_with_skips(index)
        actual = (index + len(skipped)) % len(self)  # each unreadable file passed over moves on by one
        return (self.transform(image) if self.transform is not None else image), self.targets[actual]

    def __repr__(self) -> str:
        return f"LabelledImageFolder(root={self.images.root!r}, images={len(self)}, classes={len(self.classes)})"


def count_class_folders(root: str | os.PathLike) -> int:
    """The class folders of ``root`` (not hidden, links to folders included): a count that needs no scan."""
    return sum(1 for d in Path(root).iterdir() if not d.name.startswith(".") and d.is_dir())


def load_classification_data(cfg, train_transform, eval_transform):
    """``(train set, val set, class names)`` of a fine-tuning / probing config (``data_path``, ``input_size``,
    ``labels_per_class``, ``seed``, ``nb_classes``, ``max_image_pixels``, ``jpeg_decoder``): without
    ``data_path`` the embedded digits, else ``data_path/train/<class>/*`` and ``data_path/val/<class>/*``.
    SystemExit with a clear message on errors."""
    if cfg.data_path is None:
        from .digits import DigitsDataset

        try:
            train = DigitsDataset("train", image_size=cfg.input_size, transform=train_transform,
                                  labels_per_class=cfg.labels_per_class, seed=cfg.seed)
        except ValueError as e:
            raise SystemExit(f"error: --labels_per_class {cfg.labels_per_class}: {e}") from None
        val = DigitsDataset("val", image_size=cfg.input_size, transform=eval_transform, seed=cfg.seed)
        classes = list(DigitsDataset.classes)
    else:
        if cfg.labels_per_class is not None:
            raise SystemExit("error: --labels_per_class only applies to the embedded digits data (no --data_path)")
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise SystemExit(f"error: --data_path {root} is not a folder")
        sets = []
        for split, tf in (("train", train_transform), ("val", eval_transform)):
            folder = root / split
            if not folder.is_dir():
                raise SystemExit(f"error: {folder} not found: --data_path must hold train/ and val/ folders, each "
                                 "with one subfolder of images per class")
            try:
                sets.append(LabelledImageFolder(folder, tf, max_image_pixels=cfg.max_image_pixels,
                                                jpeg_decoder=cfg.jpeg_decoder))
            except (FileNotFoundError, NotADirectoryError, ValueError, PermissionError) as e:
                raise SystemExit(f"error: {folder}: {e}") from None
        train, val = sets
        if train.classes != val.classes:
            raise SystemExit(f"error: train/ and val/ have different class folders: {train.classes[:5]}... vs "
                             f"{val.classes[:5]}...")
        classes = list(train.classes)
    if cfg.nb_classes is not None and cfg.nb_classes != len(classes):
        raise SystemExit(f"error: --nb_classes {cfg.nb_classes}, but the data has {len(classes)} classes")
    return train, val, classes
