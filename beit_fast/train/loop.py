"""The one training loop: epochs of engine steps, with everything a run needs around them.

:class:`TrainLoop` drives an :class:`~beit_fast.train.engine.Engine` over a loader whose sampler can start
mid-epoch (:class:`beit_fast.data.pretraining.ResumableSampler`) and owns, for every kind of training:

* progress (a tqdm bar per epoch), a JSON-lines log ``log.jsonl`` (step records every ``log_freq`` steps
  and/or one record per epoch) and the same scalars as TensorBoard events (``log_dir``);
* checkpoints through :class:`~beit_fast.train.checkpoint_folder.Checkpointer` (``checkpoint-last.pt`` at every epoch end,
  every ``save_ckpt_steps`` steps and at a stop; numbered ones every ``save_ckpt_freq`` epochs and at the end,
  pruned to ``keep_last``; ``checkpoint-best.pt`` at each new best epoch score) and exact resume
  (:meth:`TrainLoop.restore`: weights, optimizer, scaler, RNG states of every rank, the epoch's running sums);
* the non-finite policy: a skipped step (see the engine) is never logged as a loss; after ``max_bad_steps``
  consecutive ones the run saves a checkpoint and stops with :class:`NonFiniteLossError` (engines that check
  on the host are checked every step, those that check on the device when their results are read: every
  ``log_freq`` steps and at epoch ends);
* a graceful stop on SIGTERM / SIGINT (the step in progress is finished, a checkpoint written), and the same
  stop on every rank of a distributed run (the ranks agree every ``log_freq`` steps and at epoch ends);
* no host read of a device value between logging intervals with a ``"device"`` engine (the reads go through
  :mod:`beit_fast.train.host_reads`).

What differs between tasks - what goes into a checkpoint besides the training state, what a step record adds,
what happens at an epoch end (pretraining: the epoch's mean loss is the score; fine-tuning: an evaluation,
top-1 the score) - comes from a :class:`LoopHooks` object.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils.logs import bar_disable
from ..utils.run_files import RunFileError, open_run_file, write_error
from .checkpoint_folder import Checkpointer
from .distributed import GracefulStop, any_rank
from . import feed
from .loop_state import LoopCheckpoints
from .meters import BadStepRun, Meter, Window

__all__ = ["LoopConfig", "LoopHooks", "EpochEnd", "TrainLoop", "NonFiniteLossError"]

log = logging.getLogger("beit_fast.train")

#: The share of a logging window's time spent waiting for data above which the loop warns (once a run).
DATA_BOUND_SHARE = 0.2


class NonFiniteLossError(RuntimeError):
    """``max_bad_steps`` consecutive steps had a non-finite loss (or gradient norm); a checkpoint was saved."""


@dataclass
class LoopConfig:
    """``steps_per_epoch`` optimizer steps of ``update_freq`` micro-batches of ``batch_size`` (per process)
    per epoch; ``images_per_step``: the global batch (for images/s). ``log_freq``: read the step results every N steps (a step record in the
    log when ``step_records``); ``score``: the name of the epoch score that picks checkpoint-best.pt
    (``higher_is_better`` or lower). ``save``: write checkpoints at all (needs an output folder).
    ``handle_signals``: SIGTERM / SIGINT stop the run gracefully (else they act as usual)."""

    epochs: int
    steps_per_epoch: int
    update_freq: int = 1
    batch_size: int = 1
    images_per_step: int = 0
    log_freq: int = 10
    step_records: bool = True
    save: bool = True
    save_ckpt_freq: int = 1
    save_ckpt_steps: int = 0
    keep_last: int = 0
    max_bad_steps: int = 3
    stop_after_steps: int = 0
    progress: bool = True
    handle_signals: bool = True
    seed: int = 0
    metric_name: str = "mlm_acc"
    score: str = "loss"
    higher_is_better: bool = False
    nonfinite_hint: str = "Lower the lr, or use amp bf16/none."

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass
class EpochEnd:
    """What a task says at an epoch end: its ``score`` (None: none this epoch), a ``record`` for the log
    (None: none) and the ``message`` to log (``{best}`` is replaced by " (best so far)" or "")."""

    score: float | None = None
    record: dict | None = None
    message: str = ""


class LoopHooks:
    """The task-specific parts of a run (the defaults do nothing)."""

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's loader iterator is made (e.g. the data set's epoch for its augmentation seeds)."""

    def checkpoint_extras(self) -> dict:
        """Added to every checkpoint (model config, the run's flags, ...)."""
        return {}

    def step_record_extras(self) -> dict:
        """Added to every step record."""
        return {}

    def end_epoch(self, epoch: int, train_loss: float) -> EpochEnd:
        """After epoch ``epoch`` (1-based), whose good steps' mean loss was ``train_loss``."""
        return EpochEnd(score=train_loss)


@dataclass
class _Progress:
    """The running values that a checkpoint carries (besides weights, optimizer and RNG)."""

    step: int = 0
    best: float = math.nan
    best_epoch: int | None = None
    epoch_meter: Meter = field(default_factory=Meter)
    history: list = field(default_factory=list)


class TrainLoop(LoopCheckpoints):
    """Epochs of ``engine`` steps over ``loader`` (whose ``sampler`` is resumable); see the module docstring.

    ``output_dir``: where ``log.jsonl`` and (``checkpointer``, rank 0) the checkpoints go; None: neither.
    ``log_dir``: TensorBoard events (rank 0). ``dist_info``/``device``: a distributed run.
    """

    def __init__(self, engine, loader, sampler, cfg: LoopConfig, hooks: LoopHooks | None = None, *,
                 output_dir: str | Path | None = None, checkpointer: Checkpointer | None = None,
                 log_dir: str | Path | None = None, dist_info=None, device: torch.device | None = None) -> None:
        self.engine, self.loader, self.sampler, self.cfg = engine, loader, sampler, cfg
        self.hooks = hooks or LoopHooks()
        self.out = Path(output_dir) if output_dir is not None else None
        self.ckpt = checkpointer
        self.log_dir = log_dir
        self.dist_info = dist_info
        self.device = device if device is not None else engine.device
        self.is_main = dist_info is None or dist_info.is_main
        self.world = 1 if dist_info is None else dist_info.world_size
        self.progress = _Progress(best=-math.inf if cfg.higher_is_better else math.inf)
        self.step_records: list[dict] = []
        self.epoch_losses: list[float] = []
        self.epoch_metrics: list[float] = []
        self.stop_reason: str | None = None
        self._bad = BadStepRun()
        self._log_file = None
        self._tensorboard = None
        self._windows_read = 0
        self._warned_data_bound = False

    @property
    def step(self) -> int:
        return self.progress.step

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end (or a stop); returns the summary (see :meth:`summary`)."""
        self._open_logs()
        start = time.time()
        stopper = GracefulStop()
        if self.cfg.handle_signals:
            stopper.install()
        try:
            while self.step < self.cfg.total_steps and self.stop_reason is None:
                if not self._run_epoch(stopper):
                    break
            self.finish_saves()
        finally:
            error = self._saver.wait()  # an error on the way out: the file in progress is finished first
            if error is not None:
                log.error("the checkpoint being written failed too: %s", error)
            stopper.restore()
            self._close_logs()
            feed.shutdown_workers(self.loader)
        return self.summary(time.time() - start)

    def summary(self, seconds: float = 0.0) -> dict:
        p = self.progress
        return {"steps": self.step, "minutes": seconds / 60, "checkpoint": str(self.ckpt.last) if self.ckpt else None,
                "step_records": self.step_records, "history": p.history, "interrupted": self.stop_reason,
                "best": p.best if math.isfinite(p.best) else None, "best_epoch": p.best_epoch,
                "epoch_losses": self.epoch_losses, "epoch_metrics": self.epoch_metrics, "world_size": self.world}

    def _open_logs(self) -> None:
        if not self.is_main:
            return
        if self.out is not None:
            # Appended to when resuming (trimmed to the checkpoint's step first); a fresh run starts it empty, so
            # a log left by a run that never saved a checkpoint is not continued. Unbuffered: a failed write
            # (disk full) raises here, with nothing left in a buffer to fail again at close.
            path = self.out / "log.jsonl"
            fresh = self.step == 0
            if fresh and path.is_file() and path.stat().st_size:
                log.warning("%s holds the log of a run that saved no checkpoint: starting it afresh", path)
            self._log_file = open_run_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0),
                                           "log")
        if self.log_dir is not None:
            from ..utils.logs import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(self.log_dir, purge_step=self.step + 1 if self.step else None)

    def _close_logs(self) -> None:
        if self._log_file is not None:
            os.close(self._log_file)
            self._log_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _write(self, record: dict) -> None:
        if self._log_file is not None:
            data = (json.dumps(record) + "\n").encode()
            try:
                if os.write(self._log_file, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write (disk full?)")
            except OSError as e:
                kept = self.ckpt is not None and self.ckpt.last.is_file()
                raise RunFileError(f"{write_error(self.out / 'log.jsonl', e, 'log')}; the run stops at step {self.step}"
                                   + (f", its last checkpoint {self.ckpt.last} is kept" if kept else "")) from None
        if self._tensorboard is not None:
            self._tensorboard.add_scalars(record, record["step"])

    def _run_epoch(self, stopper: GracefulStop) -> bool:
        """One (remaining part of an) epoch; False when the run stops mid-epoch."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        epoch, start_in_epoch = divmod(self.step, cfg.steps_per_epoch)
        self.hooks.start_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_in_epoch * cfg.update_freq * cfg.batch_size)
        bar = tqdm(total=cfg.steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=bar_disable(cfg.progress and self.is_main), dynamic_ncols=True, leave=False)
        window = Window()
        it = iter(self.loader)
        try:
            while self._one_step(it, stopper, window, bar):
                pass
        finally:
            bar.close()
            del it
        if not (self.step > epoch * cfg.steps_per_epoch and self.step % cfg.steps_per_epoch == 0):  # mid-epoch
            if self.stop_reason is None:
                raise RuntimeError(f"the data loader ended epoch {epoch} early, at step {self.step}")
            self.save()
            log.info("stopped after step %d (%s); continue with --resume auto%s", self.step, self.stop_reason,
                     f" (or --resume {self.ckpt.last})" if self.ckpt is not None else "")
            return False
        self._end_epoch(window)
        return True

    def _one_step(self, it, stopper: GracefulStop, window: "Window", bar) -> bool:
        """Fetch a step's micro-batches, run it, account for it; False at the end of the epoch or a stop."""
        cfg = self.cfg
        micro = []
        waited = time.perf_counter()
        for _ in range(cfg.update_freq):
            batch = feed.next_batch(it, stopper, self.world)
            if batch is None or batch is feed.WORKERS_GONE:
                break
            micro.append(batch)
        window.data_wait_s += time.perf_counter() - waited
        if batch is feed.WORKERS_GONE:
            self.stop_reason = f"{stopper.signal_name}, data workers gone"
            return False
        if len(micro) < cfg.update_freq:  # cannot happen with steps_per_epoch as computed
            return False
        result = self.engine.train_accumulated(micro, self.step)
        self.progress.step += 1
        window.add(result)
        self.progress.epoch_meter.add(result)
        self._bad.add(result)
        bar.update(1)
        at_interval = self.step % max(cfg.log_freq, 1) == 0 or self.step % cfg.steps_per_epoch == 0
        if window.host or at_interval:
            self._read(window, bar)
        # Every rank must stop at the same step: a signal seen by any rank stops all of them. The ranks agree
        # at each logging interval (one tiny all-reduce there, none per step: it would wait for the GPU).
        signalled = stopper.requested is not None
        if self.dist_info is not None and self.world > 1:
            signalled = any_rank(signalled, self.dist_info, self.device) if at_interval else False
        if signalled:
            self.stop_reason = stopper.signal_name or "a signal on another rank"
        elif cfg.stop_after_steps and self.step >= cfg.stop_after_steps:
            self.stop_reason = f"--stop_after_steps {cfg.stop_after_steps}"
        if self.stop_reason is not None or self.step % cfg.steps_per_epoch == 0:
            return False
        if cfg.save_ckpt_steps and self.step % cfg.save_ckpt_steps == 0:
            self.save()
        return True

    def _read(self, window: "Window", bar) -> None:
        """Read the window's results (a host sync for device engines): the non-finite policy, the progress
        bar, and a step record at log boundaries when the last step was good."""
        cfg = self.cfg
        last = window.last_values()
        worst, bad_in_window = self._bad.read()
        if bad_in_window:
            if window.host:
                log.warning("step %d: non-finite loss %s or gradient norm %s, update skipped (%d in a row)",
                            self.step, last["loss"], last["grad_norm"], worst)
            else:
                log.warning("steps up to %d: %d non-finite losses or gradient norms, updates skipped (%d in a row "
                            "at most)", self.step, bad_in_window, worst)
        if worst >= cfg.max_bad_steps:
            self.save()
            where = f"state saved to {self.ckpt.last}" if self.ckpt is not None and cfg.save else "nothing saved"
            self.finish_saves()
            raise NonFiniteLossError(f"{worst} consecutive non-finite losses at step {self.step}; {where}. "
                                     f"{cfg.nonfinite_hint}")
        if last["bad"]:
            return
        loss, metric, good = window.means()
        if not good:
            return
        data_wait = window.data_wait_share()
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{metric:.3f}", lr=f"{last['lr']:.2e}", data=f"{data_wait:.0%}")
        if self.step % max(cfg.log_freq, 1) == 0:
            self._warn_if_data_bound(data_wait, window)
        if self.is_main and cfg.step_records and cfg.log_freq and (
                self.step % cfg.log_freq == 0 or self.step == cfg.total_steps):
            elapsed, steps = window.elapsed()
            record = {"step": self.step, "epoch": (self.step - 1) // cfg.steps_per_epoch,
                      **{k: v for k, v in last.items() if k not in ("bad", "metric")}, "loss": loss,
                      cfg.metric_name: metric,
                      "images_per_s": steps * cfg.images_per_step / max(elapsed, 1e-9), "step_time_s": elapsed / steps,
                      "data_wait": data_wait,
                      **self.hooks.step_record_extras()}
            self._write(record)
            self.step_records.append(record)
            window.reset()

    def _warn_if_data_bound(self, share: float, window: "Window") -> None:
        """Once a run: a warning when the loop waited for data for ``DATA_BOUND_SHARE`` or more of the window's
        time, at a logging interval (not the run's first: workers starting, compilation)."""
        self._windows_read += 1
        if self._warned_data_bound or self._windows_read < 2 or share < DATA_BOUND_SHARE or not self.is_main:
            return
        self._warned_data_bound = True
        workers = getattr(self.loader, "num_workers", None)
        log.warning("the loader is the bottleneck: the step waited for data %.0f%% of the time over the last %d steps "
                    "(%s data workers in this process). Give it more workers (--num_workers, more cores), cheaper "
                    "decoding (--jpeg_decoder simplejpeg, --data_pipeline gpu), or smaller images on disk",
                    100 * share, window.steps, workers)

    def _end_epoch(self, window: "Window") -> None:
        p, cfg = self.progress, self.cfg
        epoch_done = self.step // cfg.steps_per_epoch
        loss, metric, good = p.epoch_meter.means()
        epoch_loss = loss if good else math.nan
        self.epoch_losses.append(epoch_loss)
        self.epoch_metrics.append(metric if good else math.nan)
        end = self.hooks.end_epoch(epoch_done, epoch_loss)
        is_best = end.score is not None and math.isfinite(end.score) and (
            end.score > p.best if cfg.higher_is_better else end.score < p.best)
        if is_best:
            p.best, p.best_epoch = end.score, epoch_done
        p.epoch_meter = Meter()
        if end.record is not None:
            p.history.append(end.record)
        last_epoch = self.step == cfg.total_steps
        numbered = str(epoch_done) if cfg.save_ckpt_freq and (epoch_done % cfg.save_ckpt_freq == 0 or last_epoch) \
            else None
        self.save(numbered, best=is_best)
        if self.is_main and end.record is not None:
            self._write(end.record)
        if self._tensorboard is not None:
            self._tensorboard.flush()
        if end.message:
            log.info(end.message.replace("{best}", " (best so far)" if is_best else ""))
        if self.stop_reason is not None:  # at an epoch end: the epoch's checkpoints are written, stop here
            log.info("stopped after step %d (%s); continue with --resume auto", self.step, self.stop_reason)
