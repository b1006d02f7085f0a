"""The image folder BEiT reads (samples, batches and the loader are in :mod:`beit_fast.data.pretraining`).

* :class:`ImageFolderDataset` - image files found recursively under a folder (optionally class folders),
  loaded with Pillow and converted to RGB; unreadable files are skipped (see "Bad images" below).
* :class:`PretrainDataset` - (patch_image, tokenizer_image, bool_masked_pos) per index, deterministic in
  (seed, epoch, index) whatever the worker count or sample order.
* :class:`ResumableSampler` - the per-epoch permutation of ``torch.utils.data.DistributedSampler`` (same
  indices for the same seed/epoch/rank/world_size), plus a start offset for resuming mid-epoch.
* :func:`build_pretrain_loader` - the DataLoader (a :class:`PretrainLoader`) with the collate function that
  carries skipped-image reports from the workers to the main process.

Bad images
----------
A file that cannot be opened or decoded (corrupt bytes, zero-byte file, truncated JPEG/PNG - Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False -, unreadable permissions, not a regular file, more than
``max_image_pixels`` pixels, ...) is skipped: ``ImageFolderDataset`` falls back to the next index (modulo
the length) and keeps going, up to ``max_consecutive_bad`` files in a row, after which a ``RuntimeError``
says the data set looks corrupt (so a folder of nothing but bad files fails clearly instead of looping
forever).

Counting with DataLoader workers: a worker's dataset object is a copy, so counters kept on it never reach
the main process. Instead every sample carries the list of ``(path, reason)`` it had to skip
(``PretrainSample.skipped``), the collate function joins them into ``PretrainBatch.skipped``, and the
:class:`PretrainLoader` returned by :func:`build_pretrain_loader` feeds each batch into its
``loader.skipped`` (:class:`SkippedImages`) in the main process, which warns once per distinct file
(:class:`SkippedImageWarning`) and counts (``loader.skipped.num_skipped``, ``loader.skipped.files``).
Worker processes do not warn themselves (that would repeat every epoch in freshly started workers); in the
main process (``num_workers=0`` or direct indexing) the dataset warns once per file and keeps
``dataset.num_skipped`` / ``dataset.skipped_files``. Warnings are deduplicated per main process.

JPEG decoding
-------------
``jpeg_decoder`` (``--jpeg_decoder``, :mod:`beit_fast.data.jpeg`): ``"simplejpeg"`` decodes the JPEGs for which
simplejpeg gives exactly Pillow's pixels with it, every other file with Pillow; ``"pil"`` Pillow only;
``"auto"`` (the default) simplejpeg where it is installed.
"""
from __future__ import annotations

import functools
import os
import stat
import warnings
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from .jpeg import decode_like_pillow, resolve_jpeg_decoder
from ..utils.options import DEFAULT_MAX_IMAGE_PIXELS, JPEG_DECODERS
from .transforms import to_rgb

__all__ = [
    "IMG_EXTENSIONS",
    "iter_image_files",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "JPEG_DECODERS",
    "resolve_jpeg_decoder",
    "SkippedImageWarning",
    "ImageFolderDataset",
]

#: torchvision's ``IMG_EXTENSIONS`` (compared case-insensitively).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")




class SkippedImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


_WARNED: set[str] = set()  # paths already warned about in this process


def _warn_skipped(path: str, reason: str) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    warnings.warn(f"skipping unreadable image {path}: {reason}", SkippedImageWarning, stacklevel=3)


def _normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = []
    for e in extensions:
        e = e.lower()
        out.append(e if e.startswith(".") else "." + e)
    if not out:
        raise ValueError("extensions must not be empty")
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------------------
def open_regular_file(path: str) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only, opened without blocking (a FIFO or device named like an
    image can never hang a data worker); OSError naming the path otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_image_pixels(im: Image.Image, max_image_pixels: int | None) -> None:
    """Refuse, before decoding, an opened image of more than ``max_image_pixels`` pixels (None: no limit)."""
    if max_image_pixels is not None and im.width * im.height > max_image_pixels:
        raise ValueError(f"{im.width}x{im.height} = {im.width * im.height} pixels is more than "
                         f"max_image_pixels {max_image_pixels} (CLI: --max_image_pixels)")


def iter_image_files(root: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> Iterator[str]:
    """Relative paths (``/``-separated) of the regular files under ``root`` whose names end with one of
    ``extensions`` (lower case), in walk order; hidden files and folders are ignored. Real folders are walked
    first, then the symlinked ones whose target (device, inode) was not visited yet, so that each folder is
    read once and link loops end; a link's files are named by the link's path. A generator, so that
    ``next(iter_image_files(root), None)`` tells whether a folder holds any image without listing them all."""
    visited: set[tuple[int, int]] = set()
    pending = [""]  # folders to walk (relative to root), each only if not visited
    while pending:
        links: list[str] = []
        for rel_dir in pending:
            try:
                st = os.stat(os.path.join(root, rel_dir))
            except OSError:  # a dangling link
                continue
            if (st.st_dev, st.st_ino) in visited:
                continue
            stack = [rel_dir]
            visited.add((st.st_dev, st.st_ino))
            while stack:
                current = stack.pop()
                try:
                    entries = list(os.scandir(os.path.join(root, current)))
                except OSError:  # unreadable folder: nothing from it
                    continue
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    rel = entry.name if not current else f"{current}/{entry.name}"
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) not in visited:
                                visited.add((st.st_dev, st.st_ino))
                                stack.append(rel)
                        elif entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                            links.append(rel)
                        elif entry.name.lower().endswith(extensions) and (
                                entry.is_file(follow_symlinks=False)  # d_type: no system call
                                or stat.S_ISREG(entry.stat(follow_symlinks=True).st_mode)):
                            yield rel
                    except OSError:  # vanished or dangling entry
                        continue
        pending = sorted(links)


class ImageFolderDataset(Dataset):
    """All image files under ``root`` (recursively), as RGB PIL images.

    * Files are those whose name ends with one of ``extensions`` (case-insensitive); hidden files and
      folders (name starting with '.', e.g. macOS ``._x.jpg`` resource forks, ``.ipynb_checkpoints``) are
      ignored. Order: sorted by path relative to ``root`` (deterministic across machines).
    * Class folders are optional: if every image lies inside a first-level sub-folder, ``classes`` is the
      sorted list of those sub-folders, ``class_to_idx`` maps them to 0..C-1 and ``targets[k]`` is the class
      of image k (as torchvision's ``ImageFolder``); otherwise ``classes == []`` and ``targets is None``.
    * Only regular files are images (a FIFO, socket or device named ``x.png`` is ignored, and one that replaces
      an image after the scan is skipped, never waited on). Symlinked folders are followed, each real folder
      (by device and inode) once: links to a folder already in the tree, and link loops, add nothing.
    * ``root`` missing -> ``FileNotFoundError``; no image found -> ``ValueError``; both name the path.
    * ``max_image_pixels``: larger images (width x height from the header) are skipped like unreadable ones.
    * ``jpeg_decoder``: ``"auto"``, ``"pil"`` or ``"simplejpeg"`` (module docstring, "JPEG decoding"); kept
      resolved (``"pil"`` or ``"simplejpeg"``) in ``self.jpeg_decoder``, which DataLoader workers' copies share.
    * Item ``i`` is image ``i`` converted with :func:`beit_fast.data.transforms.to_rgb`; if it cannot be read, the
      next readable index (modulo ``len``) is returned instead (see the module docstring).
      :meth:`get_with_skips` also returns the ``(path, reason)`` pairs skipped on the way.

    Paths are kept in one numpy byte buffer (not a list of Python strings) so that forked DataLoader
    workers do not slowly copy the whole list through reference counting on large data sets.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        max_consecutive_bad: int = 64,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        jpeg_decoder: str = "auto",
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.extensions = _normalize_extensions(extensions)
        if max_consecutive_bad < 1:
            raise ValueError("max_consecutive_bad must be >= 1")
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.max_image_pixels = int(max_image_pixels)
        self.jpeg_decoder = resolve_jpeg_decoder(jpeg_decoder)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"not a folder: {self.root}")

        rel_paths = self._scan()
        if not rel_paths:
            raise ValueError(
                f"no image files found under {self.root} (searched recursively for extensions "
                f"{', '.join(self.extensions)}; hidden files and folders are ignored)"
            )
        encoded = [p.encode("utf-8", "surrogateescape") for p in rel_paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

        top = [p.split("/", 1) for p in rel_paths]
        if all(len(parts) == 2 for parts in top):
            self.classes = sorted({parts[0] for parts in top})
            self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
            self.targets: list[int] | None = [self.class_to_idx[parts[0]] for parts in top]
        else:
            self.classes = []
            self.class_to_idx = {}
            self.targets = None

        self.skipped_files: dict[str, str] = {}  # path -> reason, this process only
        self._bad: set[int] = set()

    def _scan(self) -> list[str]:
        """Relative paths of the regular image files under root, sorted (see :func:`iter_image_files`)."""
        return sorted(iter_image_files(self.root, self.extensions))

    # -- paths -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relpath(self, index: int) -> str:
        a, b = self._offsets[index], self._offsets[index + 1]
        return self._blob[a:b].tobytes().decode("utf-8", "surrogateescape")

    def path(self, index: int) -> str:
        """Absolute path of image ``index``."""
        return os.path.join(self.root, *self.relpath(index).split("/"))

    @property
    def files(self) -> list[str]:
        """All absolute paths, in dataset order (built on demand)."""
        return [self.path(i) for i in range(len(self))]

    @property
    def num_skipped(self) -> int:
        """Distinct files found unreadable in THIS process (see the module docstring for workers)."""
        return len(self.skipped_files)

    # -- loading -----------------------------------------------------------------------------------------
    @staticmethod
    def load_image(path: str, max_image_pixels: int | None = None, jpeg_decoder: str = "auto") -> Image.Image:
        """Open, fully decode and convert one file to RGB; raises on any failure, also for a file that is not
        a regular file (opened without blocking, so a FIFO cannot hang a worker) or, before decoding, for an
        image of more than ``max_image_pixels`` pixels. ``jpeg_decoder``: see the module docstring (the
        same pixels and the same failures with either)."""
        use_simplejpeg = resolve_jpeg_decoder(jpeg_decoder) == "simplejpeg"
        with open_regular_file(path) as f, Image.open(f) as im:
            check_image_pixels(im, max_image_pixels)
            if use_simplejpeg:
                img = decode_like_pillow(im, f)
                if img is not None:
                    return img
            im.load()
            img = to_rgb(im)
            if img is im:  # detach from the (closing) file object
                img = im.copy()
        return img

    def get_with_skips(self, index: int, loader: Callable[[str], Any] | None = None
                       ) -> tuple[Image.Image, tuple[tuple[str, str], ...]]:
        """(RGB image, skipped (path, reason) pairs) for ``index``, falling back to the next indices.

        ``loader(path, max_image_pixels)``: what reads one path (default :meth:`load_image` with this
        dataset's ``jpeg_decoder``); it raises on an unreadable file, a file that is not a regular file, or an
        image over ``max_image_pixels``. The GPU input pipeline passes one that returns the JPEG bytes
        (:mod:`beit_fast.data.pipeline`)."""
        load = functools.partial(self.load_image, jpeg_decoder=self.jpeg_decoder) if loader is None else loader
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        skipped: list[tuple[str, str]] = []
        in_worker = get_worker_info() is not None
        for k in range(min(n, self.max_consecutive_bad)):
            j = (index + k) % n
            path = self.path(j)
            if j in self._bad:
                skipped.append((path, self.skipped_files.get(path, "unreadable")))
                continue
            try:
                return load(path, self.max_image_pixels), tuple(skipped)
            except Exception as e:  # any decode/IO failure: never crash a run for one file
                reason = f"{type(e).__name__}: {e}"
                self._bad.add(j)
                self.skipped_files[path] = reason
                skipped.append((path, reason))
                if not in_worker:
                    _warn_skipped(path, reason)
        tried = len(skipped)
        first = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise RuntimeError(
            f"{tried} consecutive images starting at index {index} could not be read "
            f"(data set {self.root} looks corrupt or holds no readable image); first failures: {first}"
        )

    def unreadable_files(self, limit: int = 64) -> list[tuple[str, str]]:
        """(path, reason) of each file among the first ``limit`` that cannot be read, without the fallback to
        the next file: what an error about a folder too small for one step reports as the real cause."""
        found = []
        for i in range(min(limit, len(self))):
            try:
                self.load_image(self.path(i), self.max_image_pixels, self.jpeg_decoder)
            except Exception as e:  # noqa: BLE001 - any failure makes the file unreadable, as in training
                found.append((self.path(i), f"{type(e).__name__}: {e}"))
        return found

    def mark_unreadable(self, index: int, reason: str) -> None:
        """Record file ``index`` as unreadable (found so after loading, e.g. by a GPU decoder): later
        :meth:`get_with_skips` calls skip it. Does not warn (the caller reports it)."""
        index %= len(self)
        self._bad.add(index)
        self.skipped_files.setdefault(self.path(index), reason)

    def __getitem__(self, index: int) -> Image.Image:
        return self.get_with_skips(index)[0]

    def __repr__(self) -> str:
        layout = f"{len(self.classes)} classes" if self.classes else "no class folders"
        return f"ImageFolderDataset(root={self.root!r}, images={len(self)}, {layout})"

