"""Augmentation seeds per epoch for persistent DataLoader workers.

A DataLoader seeds its workers (torch, ``random``, numpy) once, when it starts them; persistent workers (kept
across epochs, so no start-up per epoch) would then draw epoch e's augmentations from wherever epoch e - 1
left their generators, and a run resumed at epoch e (fresh workers) would draw others. :class:`EpochSeeded`
reseeds a worker's generators from ``(seed, epoch, worker id)`` at its first item of each epoch: epoch e's
augmentations are the same whether the workers are new or have run since epoch 0.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["EpochSeeded"]


class EpochSeeded(Dataset):
    """``dataset`` (map-style) whose items, when loaded in a DataLoader worker, draw their randomness from
    generators seeded by ``(seed, epoch, worker id)`` (see the module docstring); in the main process items
    use the global generators as they are. Call :meth:`set_epoch` before each epoch's iterator; the epoch is
    in shared memory, so it reaches workers that are already running."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._seeded_for: int | None = None  # per process: the epoch this worker's generators were seeded for

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        worker = get_worker_info()
        if worker is not None:
            epoch = int(self._epoch[0])
            if self._seeded_for != epoch:
                self._seeded_for = epoch
                state = np.random.SeedSequence([self.seed, epoch, worker.id]).generate_state(2, dtype=np.uint32)
                torch.manual_seed(int(state[0]) << 32 | int(state[1]))
                random.seed(int(state[0]))
                np.random.seed(int(state[1]))
        return self.dataset[index]
