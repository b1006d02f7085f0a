"""Device side of the input pipeline: decode, jitter, flip, both views, normalisation; prefetched.

:class:`~beit_fast.data.pipeline.render.DeviceTwoViewTransform` (:mod:`beit_fast.data.pipeline.render`, importable from
here too) turns an :class:`~beit_fast.data.pipeline.encoded.EncodedBatch` into the batch the training step takes
on the device; this module is the loader around it.

:class:`DevicePretrainLoader` is the DataLoader of an :class:`EncodedPretrainDataset` (workers only read
files) whose iterator runs this transform in a background thread on a side CUDA stream, one batch ahead
(double buffering): while the step runs on the compute stream, the next batch is decoded and rendered.
The compute stream waits for the batch's event, so nothing is copied or computed on it for the input.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..pretraining import PretrainBatch, PretrainDataset, PretrainLoader, ResumableSampler
from .encoded import EncodedBatch, EncodedPretrainDataset, EncodedSample, collate_encoded
from .render import DeviceTwoViewTransform, device_pipeline_problems

__all__ = ["DeviceTwoViewTransform", "DevicePretrainLoader", "LoaderStats", "build_device_pretrain_loader",
           "build_loader_for", "device_pipeline_problems", "DATA_PIPELINES"]


DATA_PIPELINES = ("pil", "gpu")


def build_loader_for(pipeline: str, dataset: PretrainDataset, batch_size: int, device: str | torch.device,
                     **kwargs) -> PretrainLoader:
    """The loader of ``--data_pipeline``: ``"pil"`` -> :func:`beit_fast.data.pretraining.build_pretrain_loader` (host
    batches; the step copies them), ``"gpu"`` -> :func:`build_device_pretrain_loader` (batches on
    ``device``). ``kwargs``: the arguments both take (``num_workers``, ``sampler``, ``pin_memory``, ...)."""
    if pipeline == "pil":
        from ..pretraining import build_pretrain_loader

        return build_pretrain_loader(dataset, batch_size, **kwargs)
    if pipeline == "gpu":
        return build_device_pretrain_loader(dataset, batch_size, device, **kwargs)
    raise ValueError(f"unknown data pipeline {pipeline!r}; expected one of {DATA_PIPELINES}")


def _replace_row(batch: EncodedBatch, row: int, sample: EncodedSample) -> None:
    """Put another sample's draws into ``row`` (its image is decoded separately)."""
    p = sample.params
    batch.sizes[row] = torch.tensor([sample.image.height, sample.image.width])
    batch.boxes[row] = torch.tensor(p.box)
    batch.flips[row] = p.flip
    batch.jitter_ops[row] = -1
    batch.jitter_factors[row] = 1.0
    for slot, (op, factor) in enumerate(p.jitter):
        batch.jitter_ops[row, slot] = op
        batch.jitter_factors[row, slot] = factor
    batch.file_indices[row] = sample.file_index
    paths = list(batch.paths)
    paths[row] = sample.path
    batch.paths = tuple(paths)


@dataclass
class LoaderStats:
    """Where a :class:`DevicePretrainLoader` spent time: ``batches`` delivered; ``host_wait_s``: the
    training thread blocked waiting for a batch; ``device_wait_s``: the compute stream waiting for a batch's
    event on the GPU (CUDA only, measured with timing events: those already passed are folded into a sum as
    new ones come, so only the few not yet reached by the GPU are held; the rest is read at ``summary()``)."""

    batches: int = 0
    host_wait_s: float = 0.0
    _events: list = field(default_factory=list)
    _waits: list = field(default_factory=list)

    def add_device_wait(self, start, end) -> None:
        """A pair of timing events around the compute stream's wait for a batch (not synchronised here)."""
        self._events.append((start, end))
        while self._events and self._events[0][1].query():  # done on the GPU: no wait to read it
            first, last = self._events.pop(0)
            self._waits.append(first.elapsed_time(last) / 1e3)

    def device_waits(self) -> list[float]:
        """Seconds the compute stream waited for each batch, in order (waits for the GPU to reach the last)."""
        for start, end in self._events:
            end.synchronize()
            self._waits.append(start.elapsed_time(end) / 1e3)
        self._events.clear()
        return list(self._waits)

    @property
    def device_wait_s(self) -> float:
        return sum(self.device_waits())

    def summary(self) -> dict:
        return {"batches": self.batches, "host_wait_s": self.host_wait_s, "device_wait_s": self.device_wait_s}


_END = object()


class DevicePretrainLoader(PretrainLoader):
    """A DataLoader over an :class:`EncodedPretrainDataset` whose iteration yields :class:`PretrainBatch`
    es on the transform's device (see the module docstring).

    ``prefetch``: batches rendered ahead in a background thread (1: double buffering; 0: render in the
    calling thread, for debugging). Unreadable images are handled as in the PIL pipeline: a file the
    device decoder and Pillow both reject is marked unreadable, the sample is redrawn from the next
    readable file with its own randomness, and the skip is counted in ``loader.skipped`` with a warning.
    ``stats``: a :class:`LoaderStats` of the last iteration.
    """

    def __init__(self, dataset: EncodedPretrainDataset, *args, transform: DeviceTwoViewTransform,
                 prefetch: int = 1, **kwargs) -> None:
        if not isinstance(dataset, EncodedPretrainDataset):
            raise TypeError(f"expected an EncodedPretrainDataset, got {type(dataset).__name__}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        kwargs["collate_fn"] = collate_encoded
        super().__init__(dataset, *args, **kwargs)
        self.transform = transform
        self.prefetch = int(prefetch)
        self.stats = LoaderStats()
        self.tokenizer: torch.nn.Module | None = None
        self.tokenizer_dtype: torch.dtype | None = None

    def set_tokenizer(self, tokenizer: torch.nn.Module | None, dtype: torch.dtype | None = None) -> None:
        """Also compute each batch's visual tokens here (``batch.tokens``, int64 ``[B, N]``, with
        :func:`beit_fast.tokenizer.base.tokenize` in ``dtype``): in the prefetch thread, on the side CUDA stream, so
        the tokenizer's forward of batch t+1 overlaps the step of batch t; the engine then uses them instead
        of tokenizing. The training thread must not use ``tokenizer`` while iterating. None: off."""
        self.tokenizer, self.tokenizer_dtype = tokenizer, dtype

    # -- one batch ------------------------------------------------------------------------------------------
    def _replacement(self, batch: EncodedBatch, row: int, reason: str) -> tuple[torch.Tensor, list]:
        """Decode a replacement for ``row``, whose file neither decoder could read: the file is marked
        unreadable and the sample redrawn (next readable file, same randomness), as the PIL pipeline does.
        Returns (image, the (path, reason) skips not yet reported by the worker)."""
        images = self.dataset.dataset.images
        n = len(images)
        for _ in range(getattr(images, "max_consecutive_bad", 1)):
            index, file_index = int(batch.indices[row]), int(batch.file_indices[row])
            if not self.dataset.mark_unreadable(file_index, reason):
                raise RuntimeError(f"cannot decode the image of sample {index}: {reason}")
            reported = (file_index - index) % n  # the worker already reported the files before this one
            sample = self.dataset.get(index, epoch=self.dataset.epoch)
            _replace_row(batch, row, sample)
            decoded, failures = self.transform.decode(collate_encoded([sample]))
            if not failures:
                return decoded[0], list(sample.skipped[reported:])
            reason = failures[0][1]
        raise RuntimeError(f"{getattr(images, 'max_consecutive_bad', 1)} consecutive images starting at index "
                           f"{int(batch.indices[row])} could not be read (data set {getattr(images, 'root', '')} "
                           f"looks corrupt); last failure: {reason}")

    def _process(self, batch: EncodedBatch) -> PretrainBatch:
        images, failures = self.transform.decode(batch)
        skipped = list(batch.skipped)
        for row, reason in failures:
            images[row], extra = self._replacement(batch, row, reason)
            skipped.extend(extra)
        patch, tok = self.transform.render(images, batch)
        masks = batch.masks.to(self.transform.device, non_blocking=True)
        out = PretrainBatch(patch, tok, masks, skipped)
        if self.tokenizer is not None:
            from ...tokenizer.base import tokenize

            out.tokens = tokenize(self.tokenizer, tok, self.tokenizer_dtype)
        return out

    # -- iteration ------------------------------------------------------------------------------------------
    def __iter__(self):
        self.stats = LoaderStats()
        raw = DataLoader.__iter__(self)  # created here, in the calling thread (signal handlers)
        if self.prefetch == 0:
            for batch in raw:
                out = self._process(batch)
                self.stats.batches += 1
                self.skipped.update(out.skipped)
                yield out
            return
        yield from self._threaded(raw)

    def _threaded(self, raw):
        device = self.transform.device
        cuda = device.type == "cuda"
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                stream = None
                if cuda:
                    torch.cuda.set_device(index)  # the current device is per thread
                    stream = torch.cuda.Stream(index)
                for batch in raw:
                    if stop.is_set():
                        return
                    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                        out = self._process(batch)
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                    if not put((out, event, batch)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                put(("error", e))

        thread = threading.Thread(target=work, name="beit_fast-device-input", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.stats.host_wait_s += time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
                    raise item[1]
                out, event, _host = item  # the host batch stays referenced until here (pinned buffers)
                if cuda:
                    current = torch.cuda.current_stream(device)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(current)
                    current.wait_event(event)
                    end.record(current)
                    self.stats.add_device_wait(start, end)
                    for t in (*out[:3], getattr(out, "tokens", None)):
                        if t is not None:
                            t.record_stream(current)  # allocated on the side stream, used on this one
                self.stats.batches += 1
                self.skipped.update(out.skipped)
                yield out
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


def build_device_pretrain_loader(
    dataset: PretrainDataset,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = True,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    *,
    exact: bool = True,
    chunk_size: int = 64,
    decoder: str = "auto",
    prefetch: int = 1,
) -> DevicePretrainLoader:
    """The device-pipeline counterpart of :func:`beit_fast.data.pretraining.build_pretrain_loader` (same arguments,
    same samples in the same order, same ``loader.skipped`` reporting), yielding batches on ``device``.

    ``dataset`` must use a :class:`beit_fast.data.transforms.TwoViewTransform`; its config decides the views.
    ``exact`` / ``chunk_size`` / ``decoder``: see :class:`DeviceTwoViewTransform`; ``prefetch``: see
    :class:`DevicePretrainLoader`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    transform = DeviceTwoViewTransform(dataset.transform.cfg, device, exact=exact, chunk_size=chunk_size,
                                       decoder=decoder)
    if sampler is None:
        sampler = ResumableSampler(len(dataset), seed=int(dataset.seed))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DevicePretrainLoader(EncodedPretrainDataset(dataset), batch_size=batch_size, sampler=sampler,
                                num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                                transform=transform, prefetch=prefetch, **kwargs)
