"""The training engine: one optimizer step of a task module, for every kind of training.

A *task module* is the model and its loss as one ``nn.Module``, ``forward(*inputs) -> (loss, metric)``
(0-dim tensors): :class:`beit_fast.train.loss.MIMLoss` for pretraining, the classification loss for
fine-tuning, a linear probe's loss. The engine calls the model only through it, so a DDP wrapper sees
every forward, FSDP2 shards it as its root, and ``torch.compile`` compiles it (or the wrapper) as one
graph. The engine owns everything around that call:

* per-step lr / weight-decay schedules (:func:`beit_fast.train.optim.apply_schedule`: each group's lr is
  ``lr_schedule[t] * group["lr_scale"]``, the decaying groups get ``wd_schedule[t]``);
* autocast (the task module's ``amp_dtype``) and a loss scaler for fp16;
* gradient accumulation over micro-batches (``loss / n`` each, gradients synchronised across ranks only
  on the last one), gradient clipping (the norm is computed, and logged, even without a clip; without a
  clip the gradients are not rescaled);
* the non-finite policy: a step whose loss (mean over ranks) or, without a loss scaler, whose gradient
  norm is not finite makes no update and is reported ``skipped`` (the loop stops the run, with a
  checkpoint, after ``max_bad_steps`` of them in a row; see :mod:`beit_fast.train.loop`);
* DDP wrapping, FSDP2 full-state checkpoints, ``torch.compile`` of the task module.

How a non-finite step is detected (``nonfinite_check``):

``"host"``
    Each micro-batch's loss is read on the host before its backward (the official
    ``engine_for_pretraining.py`` behaviour): a non-finite loss never reaches the gradients (or, under
    DDP, the all-reduce), and the step returns host floats. One device synchronisation per micro-batch
    and one for the gradient norm. Pretraining on CPU and the dVAE's training use this.
``"device"``
    Nothing is read on the host: the skip decision is a device tensor, ``~isfinite(loss) |
    ~isfinite(grad_norm)``, handed to the optimizer as ``found_inf`` (the mechanism a GradScaler uses
    with fused optimizers: fused AdamW then leaves the parameters, the moments and its step count
    untouched). The step returns device tensors; the loop reads them back at its logging intervals.
    The losses are averaged over ranks once, after the backward (no collective before it). An optimizer
    without ``found_inf`` support falls back to one host read of the flag. Pretraining on CUDA,
    fine-tuning and linear probing use this.

Every host read goes through :mod:`beit_fast.train.host_reads` (counted).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..utils.amp import autocast_or_null
from .optim import apply_schedule
from . import host_reads

__all__ = ["resolve_amp_dtype", "autocast_or_null", "StepResult", "Engine", "NONFINITE_CHECKS"]

NONFINITE_CHECKS = ("host", "device")
#: Optimizer group options that say how the update is computed, not what it is.
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def demo_cpu_threads(device: torch.device | str) -> None:
    """One intra-op thread for an embedded demo on a CPU unless ``OMP_NUM_THREADS`` says otherwise. Its model is
    tiny: a second thread buys little on an idle machine and costs most when the machine is busy, because the
    threads wait for each other (measured on a 2-core machine at load ~10: 60 tokenizer steps took 27 s with
    one thread, 807 s with two)."""
    if torch.device(device).type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
        logging.getLogger("beit_fast.train").info("demo on CPU: 1 intra-op thread (set OMP_NUM_THREADS to choose)")


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA cards that support it, else fp16 on CUDA, none on CPU."""
    amp = amp.lower()
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use --amp bf16 or none on CPU")
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ValueError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or none")


@dataclass
class StepResult:
    """Metrics of one optimizer step (means over micro-batches and ranks). Host floats from a ``"host"``
    engine; from a ``"device"`` engine ``loss``, ``metric``, ``grad_norm``, ``loss_scale`` and ``skipped``
    are 0-dim device tensors (read them at logging intervals). ``skipped``: no update was made (non-finite
    loss or, without a loss scaler, gradient norm); ``bad`` of a device step: skipped for that reason (an
    fp16 overflow that the loss scaler handles is skipped but not bad)."""

    loss: Any
    metric: Any
    grad_norm: Any
    loss_scale: Any
    lr: float
    min_lr: float
    weight_decay: float
    skipped: Any = False
    bad: Any = None

    @property
    def mlm_acc(self):
        """The pretraining name of :attr:`metric` (MIM accuracy)."""
        return self.metric

    def __post_init__(self) -> None:
        if self.bad is None:
            self.bad = self.skipped


class Engine:
    """Optimizer steps of ``task_module`` (its ``.model`` is the model being trained).

    ``lr_schedule`` / ``wd_schedule``: per-step arrays (the last value holds past their end; ``wd_schedule``
    None: weight decay as the groups have it). ``clip_grad``: max gradient norm (None / 0: no clipping).
    ``prepare``: ``batch -> inputs`` of the task module (default: every tensor of the batch moved to the
    device). ``parallel``: "none", "ddp" (the engine wraps the task module in DDP) or "fsdp" (already
    ``fully_shard``-ed, before the optimizer was built); ``dist_info`` averages the metrics over ranks and
    makes every rank take the same skip decision. ``compile``: ``torch.compile`` the (wrapped) task module
    with static shapes (``fullgraph`` in one process; under FSDP each of ``model.blocks`` is compiled on its
    own, the torchtitan recipe); ``compile_mode`` is torch.compile's ``mode``; a callable ``compile`` is applied to
    the (wrapped) task module instead.
    """

    def __init__(
        self,
        task_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lr_schedule: np.ndarray,
        wd_schedule: np.ndarray | None = None,
        *,
        clip_grad: float | None = None,
        prepare: Callable[[Any], Sequence[torch.Tensor]] | None = None,
        parallel: str = "none",
        dist_info=None,
        compile: bool | Callable[[nn.Module], Callable] = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        nonfinite_check: str = "host",
    ) -> None:
        if parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be none, ddp or fsdp, got {parallel!r}")
        if nonfinite_check not in NONFINITE_CHECKS:
            raise ValueError(f"nonfinite_check must be one of {NONFINITE_CHECKS}, got {nonfinite_check!r}")
        self.task_module = task_module
        self.model: nn.Module = task_module.model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.lr_schedule = lr_schedule
        self.wd_schedule = wd_schedule
        self.clip_grad = clip_grad or None
        self._prepare = prepare
        self.parallel = parallel
        self.dist_info = dist_info
        self.nonfinite_check = nonfinite_check
        amp_dtype = getattr(task_module, "amp_dtype", None)
        if parallel == "fsdp" and amp_dtype == torch.float16:
            raise ValueError("fp16 with a loss scaler is not supported with FSDP; use bf16")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        if parallel == "ddp":
            from .distributed import wrap_ddp

            self.train_module: nn.Module = wrap_ddp(task_module, self.device)
        else:
            self.train_module = task_module
        self.compiled = bool(compile)
        if callable(compile):  # the caller's compiler (e.g. a benchmark's), applied to the (wrapped) task module
            self._loss_fn = compile(self.train_module)
        else:
            self._loss_fn = self._compiled(compile_backend, compile_mode) if compile else self.train_module

    def _compiled(self, backend: str, mode: str | None):
        kwargs = {"mode": mode} if mode else {}
        if self.parallel == "fsdp":
            for block in self.model.blocks:
                block.compile(backend=backend, dynamic=False, **kwargs)
            return self.train_module
        return torch.compile(self.train_module, backend=backend, fullgraph=self.parallel == "none", dynamic=False,
                             **kwargs)

    # -- the pieces of a step -------------------------------------------------------------------------------
    @property
    def amp_dtype(self) -> torch.dtype | None:
        return getattr(self.task_module, "amp_dtype", None)

    @amp_dtype.setter
    def amp_dtype(self, value: torch.dtype | None) -> None:
        self.task_module.amp_dtype = value

    def autocast(self):
        return autocast_or_null(self.device.type, self.amp_dtype)

    def apply_schedule(self, step: int) -> None:
        """Set step ``step``'s lr and weight decay on the optimizer's groups."""
        step = min(step, len(self.lr_schedule) - 1)
        wd = None if self.wd_schedule is None else self.wd_schedule[min(step, len(self.wd_schedule) - 1)]
        apply_schedule(self.optimizer, self.lr_schedule[step], wd)

    def prepare(self, batch) -> Sequence[torch.Tensor]:
        """The task module's inputs for one micro-batch (on the device)."""
        if self._prepare is not None:
            return self._prepare(batch)
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def compute_loss(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, metric)`` of the (wrapped, compiled) task module."""
        return self._loss_fn(*inputs)

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist_info is None:
            return values
        from .distributed import all_reduce_mean

        return all_reduce_mean(values, self.dist_info)

    def _scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def _clip(self) -> torch.Tensor:
        """Unscale (fp16), clip, and return the total gradient norm (a device tensor). Without a clip the
        norm is only computed (for the log and the non-finite check): no pass rescales the gradients."""
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    # -- the step ----------------------------------------------------------------------------------------------
    def train_step(self, batch, step: int) -> StepResult:
        """One optimizer step on one batch."""
        return self.train_accumulated([batch], step)

    def train_accumulated(self, batches, step: int) -> StepResult:
        """One optimizer step on ``len(batches)`` micro-batches (gradient accumulation, ``--update_freq``).

        Each micro-batch's loss is divided by the count (official ``loss / update_freq``), so the update
        is that of the mean of the micro-batch losses; gradients are synchronised across ranks only on
        the last micro-batch. The loss of each micro-batch is averaged over ranks before anything else, so
        a non-finite loss on any rank makes every rank skip the step (``"host"``: at once, with no further
        micro-batch; ``"device"``: at the update, the losses averaged over ranks once, after the backward).
        """
        n = len(batches)
        if n < 1:
            raise ValueError("train_accumulated needs at least one micro-batch")
        from .distributed import no_grad_sync

        self.apply_schedule(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        sched = (max(lrs), min(lrs), max((g["weight_decay"] for g in self.optimizer.param_groups), default=0.0))
        host = self.nonfinite_check == "host"
        stats = []
        for i, batch in enumerate(batches):
            inputs = self.prepare(batch)
            with no_grad_sync(self.train_module, skip=i < n - 1):
                loss, metric = self.compute_loss(*inputs)
                reduced = torch.stack([loss.detach().float(), metric.detach().float()])
                if host:
                    reduced = host_reads.values(self._reduce(reduced))
                    if not math.isfinite(reduced[0]):
                        self.optimizer.zero_grad(set_to_none=True)
                        return StepResult(reduced[0], math.nan, math.nan, self._scale(), *sched, True)
                self.scaler.scale(loss / n if n > 1 else loss).backward()
            stats.append(reduced)
        grad_norm = self._clip()
        if host:
            return self._finish_on_host(stats, grad_norm, sched)
        return self._finish_on_device(stats, grad_norm, sched)

    def _finish_on_host(self, stats: list, grad_norm: torch.Tensor, sched: tuple) -> StepResult:
        grad_norm_value = host_reads.values(grad_norm)
        loss_value, metric_value = (float(np.mean([s[k] for s in stats])) for k in (0, 1))
        if not self.scaler.is_enabled() and not math.isfinite(grad_norm_value):
            # Without a loss scaler nothing else would stop a non-finite update from wrecking the weights.
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, metric_value, grad_norm_value, 1.0, *sched, True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss_value, metric_value, grad_norm_value, self._scale(), *sched)

    def _finish_on_device(self, stats: list, grad_norm: torch.Tensor, sched: tuple) -> StepResult:
        stats = self._reduce(torch.stack(stats))  # [micro-batches, 2]: one collective, after the backward
        loss, metric = stats.mean(0) if len(stats) > 1 else stats[0]
        bad_loss = ~torch.isfinite(stats[:, 0]).all()
        skip = bad_loss | ~torch.isfinite(grad_norm)
        self._step_unless(skip)
        if self.scaler.is_enabled():
            self.scaler.update()  # from the overflow check its unscale_ recorded: lowers the scale after one
            scale = self.scaler._get_scale_async().detach().clone()
        else:
            scale = torch.ones((), device=grad_norm.device)
        bad = bad_loss if self.scaler.is_enabled() else skip
        return StepResult(loss, metric, grad_norm.detach(), scale, *sched, skip, bad)

    def _step_unless(self, skip: torch.Tensor) -> None:
        """The optimizer step, made on the device only where ``skip`` (bool 0-dim tensor) is False."""
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):  # fused AdamW & co: found_inf
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif not host_reads.values(skip):  # no device-side skip in this optimizer: one host read
            self.optimizer.step()

    # -- checkpoint state ----------------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        """Collective under FSDP: the full model state dict (on rank 0; ``{}`` elsewhere under FSDP)."""
        if self.parallel == "fsdp":
            from .distributed import full_model_state_dict

            return full_model_state_dict(self.task_module)
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        if self.parallel == "fsdp":
            from .distributed import load_full_model_state_dict

            load_full_model_state_dict(self.task_module, state)
        else:
            self.model.load_state_dict(state)

    def state_dict(self) -> dict:
        """Optimizer and loss-scaler state, in ``optimizer.state_dict()`` layout whatever the parallelism
        (collective under FSDP, full on rank 0)."""
        if self.parallel == "fsdp":
            from .distributed import full_optimizer_state_dict

            optimizer = full_optimizer_state_dict(self.task_module, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.parallel == "fsdp":
            from .distributed import load_full_optimizer_state_dict

            load_full_optimizer_state_dict(self.task_module, self.optimizer, state["optimizer"])
        else:
            # The checkpoint holds the state; how this engine runs the optimizer (fused: the device-side skip
            # needs it) stays this engine's, whatever the run that saved it used.
            impl = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, flags in zip(self.optimizer.param_groups, impl):
                group.update(flags)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
