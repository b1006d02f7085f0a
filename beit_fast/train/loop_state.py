"""The checkpoint side of :class:`beit_fast.train.loop.TrainLoop`: what a checkpoint holds besides the
task's extras (weights, optimizer and loss-scaler state, step, RNG states of every rank, the best epoch score,
the epoch's running sums, the epoch records), writing it on rank 0 in the background (a snapshot in host
memory, written while the training goes on: :mod:`beit_fast.train.checkpoint_writer`; a failed write stops
every rank cleanly at the next save or at the end), and restoring all of it for an exact resume."""
from __future__ import annotations

import logging

from ..utils.checkpoint import CheckpointError, CheckpointSaveError
from .checkpoint_folder import trim_jsonl
from .distributed import all_gather_object, broadcast_object
from ..utils.rng import rng_state, seed_everything, set_rng_state
from .checkpoint_writer import BackgroundSaver, snapshot_to_host
from .meters import Meter

__all__ = ["LoopCheckpoints"]

log = logging.getLogger("beit_fast.train")


class LoopCheckpoints:
    """Checkpoint state, save and restore of a training loop (mixed into :class:`~beit_fast.train.loop.TrainLoop`,
    whose attributes it uses: ``engine``, ``cfg``, ``hooks``, ``progress``, ``ckpt``, ``out``, ``dist_info``,
    ``is_main``, ``world``)."""

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict | None:
        """Collective (every rank calls it at the same point); the state on rank 0, None elsewhere."""
        model_state = self.engine.model_state_dict()
        engine_state = self.engine.state_dict()
        rngs = all_gather_object(rng_state(), self.dist_info) if self.dist_info is not None else [rng_state()]
        if not self.is_main:
            return None
        p, sums = self.progress, self.progress.epoch_meter.totals()
        return {"model": model_state, **engine_state, "step": p.step, "epoch": p.step // self.cfg.steps_per_epoch,
                "rng": rngs[0], "rng_per_rank": rngs, "world_size": self.world, f"best_{self.cfg.score}": p.best,
                "best_epoch": p.best_epoch, "epoch_loss_sum": sums[0], "epoch_loss_count": sums[2],
                "history": list(p.history), **self.hooks.checkpoint_extras()}

    def save(self, numbered: str | None = None, best: bool = False, wait: bool = False) -> None:
        """Write checkpoint-last.pt (+ numbered / best copies) on rank 0, in the background (``wait``: before
        returning); a failed write (disk full, permissions) stops every rank with :class:`CheckpointSaveError`
        at this save or the next one (or :meth:`finish_saves`), the last good file intact."""
        if not (self.cfg.save and (self.ckpt is not None or not self.is_main)):
            return
        state = self.checkpoint_state()
        error = None
        if self.is_main:
            error = self._save_failure(self._saver.wait())  # the previous save's
            if error is None:
                snapshot = snapshot_to_host(state)
                del state
                self._saver.submit(lambda: self.ckpt.save(snapshot, numbered, best))
                if wait:
                    error = self._save_failure(self._saver.wait())
        error = broadcast_object(error, self.dist_info) if self.dist_info is not None else error
        if error:
            raise CheckpointSaveError(error)

    def finish_saves(self) -> None:
        """Collective: wait for the save in progress; :class:`CheckpointSaveError` on every rank if it failed."""
        if not (self.cfg.save and (self.ckpt is not None or not self.is_main)):
            return
        error = self._save_failure(self._saver.wait()) if self.is_main else None
        error = broadcast_object(error, self.dist_info) if self.dist_info is not None else error
        if error:
            raise CheckpointSaveError(error)

    def _save_failure(self, e: BaseException | None) -> str | None:
        """The message of a failed save (None: it succeeded); anything but a failed write is raised."""
        if e is None:
            return None
        if not isinstance(e, CheckpointSaveError):
            raise e
        # disk full, permissions: stop cleanly, the last good file stays
        return (f"{e}. The run stopped at step {self.step}; make room (or fix the permissions) and continue with "
                "--resume auto")

    @property
    def _saver(self) -> BackgroundSaver:
        saver = self.__dict__.get("_background_saver")
        if saver is None:
            saver = self.__dict__["_background_saver"] = BackgroundSaver()
        return saver

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint (:func:`beit_fast.train.run_dir.choose_resume_state`'s): its missing
        copies first, then weights, optimizer, scaler, RNG states and running sums. :class:`CheckpointError`
        if it does not fit this run. None (nothing to resume yet): the log keeps no record of a run that left
        no checkpoint."""
        if state is None:
            self._trim_log()
            return
        path = state.get("_path", "the checkpoint")
        error = None
        if self.is_main and self.ckpt is not None and state.get("_restore_copies"):
            try:
                self.ckpt.restore_copies(state, path)
            except CheckpointSaveError as e:
                error = str(e)
        error = broadcast_object(error, self.dist_info) if self.dist_info is not None else error
        if error:
            raise CheckpointSaveError(error)
        try:
            self.engine.load_model_state_dict(state["model"])
            self.engine.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
        p = self.progress
        p.step = int(state["step"])
        self._restore_rng(state)
        p.best = float(state.get(f"best_{self.cfg.score}", p.best))
        p.best_epoch = state.get("best_epoch")
        p.epoch_meter = Meter.from_totals(float(state.get("epoch_loss_sum", 0.0)), int(state.get("epoch_loss_count", 0)))
        p.history = list(state.get("history") or [])
        log.info("resumed from %s at step %d (epoch %d)", path, p.step, p.step // self.cfg.steps_per_epoch)
        if p.step >= self.cfg.total_steps:
            log.info("the run is complete (step %d of %d, %d epochs) in %s: nothing to train. Give more epochs to "
                     "continue it, or overwrite the output folder to start over", p.step, self.cfg.total_steps,
                     self.cfg.epochs, self.out)
        self._trim_log()

    def _trim_log(self) -> None:
        if self.is_main and self.out is not None:
            trim_jsonl(self.out / "log.jsonl", "step", self.step)

    def _restore_rng(self, state: dict) -> None:
        rank = 0 if self.dist_info is None else self.dist_info.rank
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.world:
            set_rng_state(per_rank[rank])
        elif self.world == 1 and state.get("rng") is not None:
            set_rng_state(state["rng"])
        else:
            log.warning("the checkpoint holds RNG states of another number of processes: reseeding "
                        "(drop path will not follow the original run)")
            seed_everything(self.cfg.seed + rank + 7919 * self.progress.step)
