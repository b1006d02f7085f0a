"""Data loading for BEiT pretraining.

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
"""
from __future__ import annotations

import inspect
import math
import os
import random
import stat
import warnings
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from .options import DEFAULT_MAX_IMAGE_PIXELS
from .transforms import TwoViewTransform, to_rgb

__all__ = [
    "IMG_EXTENSIONS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "SkippedImageWarning",
    "ImageFolderDataset",
    "PretrainSample",
    "PretrainBatch",
    "PretrainDataset",
    "ResumableSampler",
    "SkippedImages",
    "PretrainLoader",
    "collate_pretrain",
    "build_pretrain_loader",
    "sample_seed",
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
    * Item ``i`` is image ``i`` converted with :func:`beit_fast.transforms.to_rgb`; if it cannot be read, the
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
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.extensions = _normalize_extensions(extensions)
        if max_consecutive_bad < 1:
            raise ValueError("max_consecutive_bad must be >= 1")
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.max_image_pixels = int(max_image_pixels)
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
        """Relative paths of the regular image files under root. Real folders are walked first, then the
        symlinked ones whose target (device, inode) was not visited yet, so that each folder is read once
        and link loops end; a link's files are named by the link's path."""
        found: list[str] = []
        visited: set[tuple[int, int]] = set()
        pending = [""]  # folders to walk (relative to root), each only if not visited
        while pending:
            links: list[str] = []
            for rel_dir in pending:
                try:
                    st = os.stat(os.path.join(self.root, rel_dir))
                except OSError:  # a dangling link
                    continue
                if (st.st_dev, st.st_ino) in visited:
                    continue
                stack = [rel_dir]
                visited.add((st.st_dev, st.st_ino))
                while stack:
                    current = stack.pop()
                    try:
                        entries = list(os.scandir(os.path.join(self.root, current)))
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
                            elif entry.name.lower().endswith(self.extensions) and (
                                    entry.is_file(follow_symlinks=False)  # d_type: no system call
                                    or stat.S_ISREG(entry.stat(follow_symlinks=True).st_mode)):
                                found.append(rel)
                        except OSError:  # vanished or dangling entry
                            continue
            pending = sorted(links)
        found.sort()
        return found

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
    def load_image(path: str, max_image_pixels: int | None = None) -> Image.Image:
        """Open, fully decode and convert one file to RGB; raises on any failure, also for a file that is not
        a regular file (opened without blocking, so a FIFO cannot hang a worker) or, before decoding, for an
        image of more than ``max_image_pixels`` pixels."""
        with open_regular_file(path) as f, Image.open(f) as im:
            check_image_pixels(im, max_image_pixels)
            im.load()
            img = to_rgb(im)
            if img is im:  # detach from the (closing) file object
                img = im.copy()
        return img

    def get_with_skips(self, index: int, loader: Callable[[str], Any] | None = None
                       ) -> tuple[Image.Image, tuple[tuple[str, str], ...]]:
        """(RGB image, skipped (path, reason) pairs) for ``index``, falling back to the next indices.

        ``loader(path, max_image_pixels)``: what reads one path (default :meth:`load_image`); it raises on an
        unreadable file, a file that is not a regular file, or an image over ``max_image_pixels``.
        The GPU input pipeline passes one that returns the JPEG bytes (:mod:`beit_fast.pipeline`)."""
        load = self.load_image if loader is None else loader
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


# --------------------------------------------------------------------------------------------------------
# Samples and batches
# --------------------------------------------------------------------------------------------------------
class PretrainSample(tuple):
    """``(patch_image, tokenizer_image, bool_masked_pos)``; ``.skipped`` = ((path, reason), ...) skipped."""

    skipped: tuple[tuple[str, str], ...]

    def __new__(cls, patch_image, tokenizer_image, bool_masked_pos, skipped=()):
        self = super().__new__(cls, (patch_image, tokenizer_image, bool_masked_pos))
        self.skipped = tuple(skipped)
        return self

    def __reduce__(self):
        return (type(self), (self[0], self[1], self[2], self.skipped))


class PretrainBatch(PretrainSample):
    """Batched ``(patch_images [B,3,S,S], tokenizer_images [B,3,S2,S2], bool_masked_pos [B,h*w])``.

    Unpacks like a 3-tuple; ``.skipped`` lists the (path, reason) pairs skipped while building the batch
    (a file may appear once per time it was hit). ``pin_memory()`` is supported for the DataLoader.
    """

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def pin_memory(self, device: Any = None) -> "PretrainBatch":  # ``device`` accepted, unused (deprecated)
        return type(self)(self[0].pin_memory(), self[1].pin_memory(), self[2].pin_memory(), self.skipped)

    def to(self, *args, **kwargs) -> "PretrainBatch":
        return type(self)(*(t.to(*args, **kwargs) for t in self), self.skipped)


def collate_pretrain(samples: Sequence[Sequence[torch.Tensor]]) -> PretrainBatch:
    """Stack samples (PretrainSample or plain 3-tuples) into a :class:`PretrainBatch`.

    Uses ``default_collate`` per field, which in a worker stacks straight into shared memory.
    """
    fields = list(zip(*[tuple(s) for s in samples]))
    if len(fields) != 3:
        raise ValueError(f"expected samples of 3 tensors, got {len(fields)}")
    skipped: list[tuple[str, str]] = []
    for s in samples:
        skipped.extend(getattr(s, "skipped", ()))
    return PretrainBatch(*(default_collate(list(f)) for f in fields), skipped)


# --------------------------------------------------------------------------------------------------------
# Pretraining dataset
# --------------------------------------------------------------------------------------------------------
_TORCH_STREAM = 0x7472616E  # spawn key separating the transform's torch seed from the mask's numpy stream


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit torch seed of sample (seed, epoch, index) (independent of the mask's numpy stream)."""
    ss = np.random.SeedSequence([seed, epoch, index], spawn_key=(_TORCH_STREAM,))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _accepts_rng(fn: Callable) -> bool:
    """True if ``fn`` can be called with one positional argument (the numpy Generator)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(None)
        return True
    except TypeError:
        return False


class PretrainDataset(Dataset):
    """BEiT pretraining samples: ``(patch_image, tokenizer_image, bool_masked_pos [h*w] torch.bool)``.

    ``images`` is any Dataset of PIL images (``ImageFolderDataset``, ``SampleImages``, ...). Sample
    ``index`` of epoch ``epoch`` is a pure function of ``(seed, epoch, index)``:

    * the transform runs inside ``torch.random.fork_rng(devices=[])`` after
      ``torch.manual_seed(sample_seed(seed, epoch, index))`` (the caller's global torch RNG is untouched);
    * the mask generator gets ``np.random.default_rng([seed, epoch, index])``. A generator taking no
      argument (official style, drawing from Python's ``random``/numpy's global RNG) is called with those
      two global RNGs temporarily seeded from the same triple and restored afterwards.

    The epoch is stored in a shared-memory tensor, so ``set_epoch`` also reaches persistent DataLoader
    workers (their dataset copies share that memory, whether the workers were forked or spawned).
    If an image is unreadable, the image dataset's fallback image is used with the requested index's
    randomness; the skipped files ride along in ``PretrainSample.skipped``.
    """

    def __init__(
        self,
        images: Dataset,
        transform: TwoViewTransform | Callable,
        mask_generator: Callable,
        seed: int = 0,
    ) -> None:
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images = images
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self._mask_takes_rng = _accepts_rng(mask_generator)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    # -- epoch -------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files seen in this process (0 if ``images`` does not track them)."""
        return int(getattr(self.images, "num_skipped", 0))

    # -- items -------------------------------------------------------------------------------------------
    def _image(self, index: int):
        getter = getattr(self.images, "get_with_skips", None)
        if getter is not None:
            return getter(index)
        return self.images[index], ()

    def _mask(self, epoch: int, index: int) -> torch.Tensor:
        if self._mask_takes_rng:
            mask = self.mask_generator(np.random.default_rng([self.seed, epoch, index]))
        else:
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                ss = np.random.SeedSequence([self.seed, epoch, index])
                random.seed(int(ss.generate_state(1, dtype=np.uint64)[0]))
                np.random.seed(ss.generate_state(4, dtype=np.uint32))
                mask = self.mask_generator()
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            mask = mask != 0
        return torch.from_numpy(np.ascontiguousarray(mask.reshape(-1)))

    def get(self, index: int, epoch: int | None = None) -> PretrainSample:
        """Sample ``index`` of ``epoch`` (default: the current epoch)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        epoch = self.epoch if epoch is None else int(epoch)
        img, skipped = self._image(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            patch_image, tokenizer_image = self.transform(img)
        return PretrainSample(patch_image, tokenizer_image, self._mask(epoch, index), skipped)

    def __getitem__(self, index: int) -> PretrainSample:
        return self.get(index)

    def __repr__(self) -> str:
        return (
            f"PretrainDataset(images={self.images!r}, transform={self.transform!r}, "
            f"mask_generator={self.mask_generator!r}, seed={self.seed}, epoch={self.epoch})"
        )


# --------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------
class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch order, resumable mid-epoch, DDP-ready.

    The indices of epoch ``e`` on ``rank`` are exactly those of
    ``torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle, seed, drop_last)`` after
    ``set_epoch(e)``: ``torch.randperm(n)`` from a generator seeded with ``seed + e`` (or ``range(n)``
    without shuffle); padded by repeating the start of that permutation (``drop_last=False``) or cut
    (``drop_last=True``) to a multiple of ``world_size``; rank ``r`` takes ``perm[r::world_size]``.
    Every rank therefore gets ``num_samples`` indices and, for ``drop_last=False``, the ranks together cover
    every index.

    ``set_start(k)`` skips the first ``k`` indices of this rank's list for the epoch it is set for (the
    current one by default; ``set_epoch`` to another epoch makes it inert), without touching the data:
    after ``s`` optimizer steps of per-rank batch ``b`` in an epoch, resume with ``set_start(s * b)``.
    ``len(sampler)`` is the number of indices still to come (``num_samples - start``), so ``len(loader)``
    of a resumed epoch is its remaining batch count; ``num_samples`` is the full per-epoch count.
    """

    def __init__(
        self,
        dataset_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.dataset_len % self.world_size != 0:
            self.num_samples = math.ceil((self.dataset_len - self.world_size) / self.world_size)
        else:
            self.num_samples = math.ceil(self.dataset_len / self.world_size)
        if self.num_samples <= 0:
            raise ValueError(f"dataset of {dataset_len} is too small for world_size {world_size} with drop_last")
        self.total_size = self.num_samples * self.world_size
        self.epoch = 0
        self._start = 0
        self._start_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start_index: int, epoch: int | None = None) -> None:
        """Begin epoch ``epoch`` (default: the current one) at position ``start_index`` of this rank's list."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self._start = int(start_index)
        self._start_epoch = self.epoch if epoch is None else int(epoch)

    @property
    def start(self) -> int:
        """Where the current epoch begins (0 unless ``set_start`` was called for it)."""
        return self._start if self._start_epoch == self.epoch else 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list of ``epoch`` (default: current), ignoring the start offset."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if not self.drop_last:
            pad = self.total_size - n
            if pad <= n:
                order += order[:pad]
            else:
                order += (order * math.ceil(pad / n))[:pad]
        else:
            order = order[: self.total_size]
        assert len(order) == self.total_size
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(n={self.dataset_len}, seed={self.seed}, shuffle={self.shuffle}, "
            f"rank={self.rank}/{self.world_size}, drop_last={self.drop_last}, epoch={self.epoch}, "
            f"start={self.start}, num_samples={self.num_samples})"
        )


# --------------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------------
class SkippedImages:
    """Main-process record of unreadable images reported by batches (works with any worker count)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}  # path -> reason (first seen)
        self.events = 0  # skips counted over all batches (a file hit in several epochs counts each time)

    def update(self, skipped: Iterable[tuple[str, str]]) -> list[str]:
        """Record ``(path, reason)`` pairs; warn once per new file; return the new paths."""
        new = []
        for path, reason in skipped:
            self.events += 1
            if path not in self.files:
                self.files[path] = reason
                new.append(path)
                _warn_skipped(path, reason)
        return new

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files seen so far."""
        return len(self.files)

    def __repr__(self) -> str:
        return f"SkippedImages(files={self.num_skipped}, events={self.events})"


class PretrainLoader(DataLoader):
    """A DataLoader that records each batch's skipped images in ``self.skipped`` (main process)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = SkippedImages()

    def __iter__(self):
        for batch in super().__iter__():
            self.skipped.update(getattr(batch, "skipped", ()))
            yield batch


def build_pretrain_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = True,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
) -> PretrainLoader:
    """DataLoader for :class:`PretrainDataset` yielding :class:`PretrainBatch` es.

    ``sampler`` defaults to ``ResumableSampler(len(dataset), seed=dataset.seed)``; the caller calls
    ``sampler.set_epoch(e)`` and ``dataset.set_epoch(e)`` before each epoch. No ``worker_init_fn`` is needed:
    every sample seeds itself. ``persistent_workers`` and ``prefetch_factor`` are ignored when
    ``num_workers == 0`` (where DataLoader would reject them).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if sampler is None:
        sampler = ResumableSampler(len(dataset), seed=int(getattr(dataset, "seed", 0)))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    return PretrainLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_pretrain,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **kwargs,
    )
