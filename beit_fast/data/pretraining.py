"""Pretraining data (over :mod:`beit_fast.data.image_folder`, whose docstring says how bad images are handled):
samples and batches, :class:`PretrainDataset`, :class:`ResumableSampler` (also the fine-tuning loop's) and
:func:`build_pretrain_loader`."""
from __future__ import annotations

import inspect
import math
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .image_folder import _warn_skipped
from .transforms import TwoViewTransform

__all__ = ["PretrainSample", "PretrainBatch", "collate_pretrain", "sample_seed", "PretrainDataset", "ResumableSampler",
           "SkippedImages", "PretrainLoader", "build_pretrain_loader"]


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
    """A DataLoader that records each batch's skipped images in ``self.skipped`` (main process).
    ``device_feed``: None, or a callable that turns the iterator of host batches into the batches to yield
    (:class:`beit_fast.train.device_feed.DeviceFeed`: to the device, normalised, one batch ahead)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = SkippedImages()
        self.device_feed = None

    def _host_batches(self):
        for batch in super().__iter__():
            self.skipped.update(getattr(batch, "skipped", ()))
            yield batch

    def __iter__(self):
        batches = self._host_batches()
        yield from (batches if self.device_feed is None else self.device_feed(batches))


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
