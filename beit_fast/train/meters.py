"""Running sums of step results that stay where the results are: host floats from an engine that checks on
the host, 0-dim device tensors from one that checks on the device (adding them needs no synchronisation;
reading them is one)."""
from __future__ import annotations

import time

import torch

from . import host_reads

__all__ = ["Meter", "BadStepRun", "Window"]


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _read(values: list) -> list[float]:
    """Host floats of a list of numbers and 0-dim tensors, with one device read for all the tensors."""
    tensors = [v for v in values if _is_tensor(v)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    stacked = host_reads.values(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]))
    return [float(v) for v in stacked]


class Meter:
    """Sums of the loss and the metric over the good (not ``bad``) steps, and the count of each kind."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.metric_sum = 0.0
        self.good = 0
        self.bad = 0

    @classmethod
    def from_totals(cls, loss_sum: float, good: int) -> "Meter":
        meter = cls()
        meter.loss_sum, meter.good = loss_sum, good
        return meter

    def add(self, result) -> None:
        """Add a :class:`~beit_fast.train.engine.StepResult`."""
        if _is_tensor(result.bad):
            good = ~result.bad
            self.loss_sum = self.loss_sum + torch.where(good, result.loss.double(), 0.0)
            self.metric_sum = self.metric_sum + torch.where(good, result.metric.double(), 0.0)
            self.good = self.good + good.long()
            self.bad = self.bad + result.bad.long()
        elif result.bad:
            self.bad += 1
        else:
            self.loss_sum += result.loss
            self.metric_sum += result.metric
            self.good += 1

    def totals(self) -> tuple[float, float, int, int]:
        """``(loss sum, metric sum, good steps, bad steps)`` as host numbers."""
        loss, metric, good, bad = _read([self.loss_sum, self.metric_sum, self.good, self.bad])
        return loss, metric, int(good), int(bad)

    def means(self) -> tuple[float, float, int]:
        """``(mean loss, mean metric, good steps)`` over the good steps (NaN means when there were none)."""
        loss, metric, good, _ = self.totals()
        if not good:
            return float("nan"), float("nan"), 0
        return loss / good, metric / good, good


class BadStepRun:
    """Consecutive bad steps (across reads), and per read interval the longest such run and the count."""

    def __init__(self) -> None:
        self.run = 0
        self._reset()

    def _reset(self) -> None:
        self.worst = 0
        self.count = 0

    def add(self, result) -> None:
        bad = result.bad
        if _is_tensor(bad):
            self.run = torch.where(bad, self.run + 1, 0)
            self.worst = torch.maximum(torch.as_tensor(self.worst, device=bad.device), self.run)
            self.count = self.count + bad.long()
        elif bad:
            self.run += 1
            self.worst = max(self.worst, self.run)
            self.count += 1
        else:
            self.run = 0

    def read(self) -> tuple[int, int]:
        """``(longest run of consecutive bad steps that ended in this interval, bad steps in it)``; starts
        the next interval."""
        worst, count = (int(v) for v in _read([self.worst, self.count]))
        self._reset()
        return worst, count


class Window(Meter):
    """The results since the last step record: sums over good steps, the last step's values, wall time, and
    the part of it the loop spent waiting for the loader (``data_wait_s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        Meter.__init__(self)
        self.t0 = time.time()
        self.steps = 0
        self.data_wait_s = 0.0

    def add(self, result) -> None:
        super().add(result)
        self.steps += 1
        self.last = result

    @property
    def host(self) -> bool:
        return not isinstance(self.last.loss, torch.Tensor)

    def last_values(self) -> dict:
        r = self.last
        values = [r.loss, r.metric, r.grad_norm, r.loss_scale, r.bad]
        if not self.host:
            values = host_reads.values(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=r.loss.device)
                                                    for v in values]))
        return {"loss": values[0], "metric": values[1], "grad_norm": values[2], "loss_scale": values[3],
                "lr": r.lr, "min_lr": r.min_lr, "weight_decay": r.weight_decay, "bad": bool(values[4])}

    def elapsed(self) -> tuple[float, int]:
        return time.time() - self.t0, self.steps

    def data_wait_share(self) -> float:
        """The share of the window's wall time spent waiting for batches (0 when the loader keeps up)."""
        return min(1.0, self.data_wait_s / max(time.time() - self.t0, 1e-9))
