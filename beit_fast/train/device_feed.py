"""Host batches to the training device one batch ahead, as ``uint8`` pixels, normalised there.

The PIL pipeline's workers render both views as ``uint8`` (``TwoViewConfig.uint8_views``): a BEiT batch of
256 is 48 MB instead of 193 MB of float32, and the DataLoader pins it (``pin_memory``). :class:`DeviceFeed`
copies batch t+1 to the device and normalises it there (:meth:`beit_fast.data.transforms.TwoViewTransform.normalize`,
the formula the float views come from, so the step's inputs are the same bit for bit) while step t runs:
on CUDA the copy and the normalisation go on a side stream and the compute stream waits for the batch's
event; elsewhere the same code runs without streams.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch

__all__ = ["DeviceFeed"]


class DeviceFeed:
    """``feed(host_batches) -> device_batches``: :class:`beit_fast.data.pretraining.PretrainBatch` es of ``uint8`` views
    (``[B, 3, S, S]``, ``[B, 3, S2, S2]``) and masks ``bool [B, N]`` in, the same batches on ``device`` with
    the views ``normalize(patch, tokenizer) -> (float32, float32)``-ed out, one batch ahead (see the module
    docstring). ``bytes_copied`` / ``batches``: what went host -> device so far."""

    def __init__(self, device: str | torch.device,
                 normalize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.device = torch.device(device)
        self.normalize = normalize
        self.bytes_copied = 0
        self.batches = 0

    def _send(self, batch, stream):
        """Queue the copy and the normalisation of ``batch`` (on ``stream`` on CUDA); ``(batch, event)``."""
        event = None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            patch, tok, mask = (t.to(self.device, non_blocking=True) for t in batch[:3])
            patch, tok = self.normalize(patch, tok)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.bytes_copied += sum(t.nbytes for t in batch[:3])
        self.batches += 1
        out = type(batch)(patch, tok, mask, getattr(batch, "skipped", ()))
        return out, event

    def _receive(self, out, event):
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out[:3]:
                t.record_stream(current)  # made on the side stream, used (and freed) on this one
        return out

    def __call__(self, batches: Iterable) -> Iterator:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending = None
        for batch in batches:
            ready = self._send(batch, stream)  # batch t+1 is on its way before step t is queued
            if pending is not None:
                yield self._receive(*pending)
            pending = ready
        if pending is not None:
            yield self._receive(*pending)
