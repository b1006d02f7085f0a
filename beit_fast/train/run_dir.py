"""A training run's output folder: claiming it (one run per folder) and choosing the checkpoint to resume.

Shared by every training run (pretraining, fine-tuning). Errors are :class:`~beit_fast.utils.checkpoint.CheckpointError`
(the same message on every rank of a distributed run; the CLIs print them as ``error: ...``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..utils.checkpoint import LAST_NAME, CheckpointError, load_checkpoint, validate_checkpoint
from .checkpoint_folder import (
    OutputDirLock, existing_checkpoints, find_resume_checkpoint, list_checkpoints, remove_run_outputs,
    remove_stale_temp_files,
)

__all__ = ["claim_output_dir", "choose_resume_state"]

log = logging.getLogger("beit_fast.train")


def _same_error_everywhere(error: CheckpointError | None, dist_info) -> None:
    """Raise ``error`` (rank 0's) on every rank: the original on rank 0 (and in one process), its message
    elsewhere."""
    if dist_info is not None and dist_info.active and dist_info.world_size > 1:
        from .distributed import broadcast_object

        message = broadcast_object(None if error is None else str(error), dist_info)
        if message is not None and error is None:
            raise CheckpointError(message)
    if error is not None:
        raise error


def claim_output_dir(out: str | os.PathLike, *, resume: str = "", overwrite: bool = False,
                     dist_info=None) -> OutputDirLock | None:
    """Rank 0 creates and locks ``out`` (a second run on it is refused, naming the live one; a lock left by a
    killed run is taken over), clears temporary files of interrupted saves, and refuses a fresh run (no
    ``resume``) into a folder holding another run's checkpoints unless ``overwrite``, which deletes them.
    Every rank raises the same :class:`CheckpointError` on failure. Returns the held lock (rank 0) or None."""
    out = Path(out)
    lock, error = None, None
    if dist_info is None or dist_info.is_main:
        try:
            lock = _claim(out, resume, overwrite)
        except CheckpointError as e:
            error = e
    _same_error_everywhere(error, dist_info)
    return lock


def _claim(out: Path, resume: str, overwrite: bool) -> OutputDirLock:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.unlink(missing_ok=True)  # left by a killed process of the same pid (or planted: never followed)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"--output_dir {out} is not writable: {e}") from None
    lock = OutputDirLock(out)
    stale = lock.acquire()
    try:
        if stale:
            log.warning("took over a stale lock on %s, left by a run that is no longer running (%s)", out, stale)
        for path in remove_stale_temp_files(out):
            log.warning("removed %s, left by a save that was interrupted", path.name)
        _refuse_fresh_run(out, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_fresh_run(out: Path, resume: str, overwrite: bool) -> None:
    """A fresh run into a folder that holds another run's checkpoints would overwrite that run's
    checkpoint-best.pt and log and mix numbered checkpoints of both runs: refused, or cleared on request."""
    found = existing_checkpoints(out)
    if resume or not found:
        return
    if overwrite:
        for path in remove_run_outputs(out):
            log.warning("--overwrite_output_dir: deleted %s of the previous run", path.name)
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    what = f"{len(found)} checkpoint files ({names})"
    newest = list_checkpoints(out)
    if newest:
        try:  # the pickle only (tensors stay on disk): cheap even for large checkpoints
            state = load_checkpoint(newest[0], verify=False, mmap=True)
            epochs = (state.get("args") or state.get("finetune_config") or {}).get("epochs")
            done = epochs is not None and int(state.get("epoch", -1)) >= int(epochs)
            what += (f"; {newest[0].name} is at step {state.get('step')}, epoch {state.get('epoch')} of {epochs}: "
                     f"{'the run is complete' if done else 'the run is unfinished'}")
        except Exception:  # noqa: BLE001 - only for the message
            pass
    raise CheckpointError(
        f"--output_dir {out} holds another run's checkpoints: {what}. Continue that run with --resume auto "
        "(Python: resume='auto'; a finished run says so and stops), or pass --overwrite_output_dir (Python: "
        "overwrite_output_dir=True) to delete its checkpoints and log.jsonl and start over, or choose another "
        "--output_dir")


def choose_resume_state(resume: str, out: str | os.PathLike, *, trust_pickle: bool = False,
                        dist_info=None) -> dict | None:
    """The checkpoint every rank resumes from, loaded and validated: rank 0 picks it (``"auto"``: the newest
    valid one of ``out``, an unloadable one skipped with a warning; else the path ``resume``), every rank
    loads that same file. None: nothing to resume (``auto`` on a fresh folder). The state gets ``_path``
    and ``_restore_copies`` (resuming from the newest state: re-publish the numbered / best copies a crash
    may have cut short; not when rewinding to an older checkpoint on purpose)."""
    out = Path(out)
    path, state, error = None, None, None
    if dist_info is None or dist_info.is_main:
        try:
            path, state = _pick(resume, out, trust_pickle)
        except CheckpointError as e:
            error = e
    _same_error_everywhere(error, dist_info)
    if dist_info is not None and dist_info.active and dist_info.world_size > 1:
        from .distributed import broadcast_object

        path = broadcast_object(None if path is None else str(path), dist_info)
    if path is None:
        return None
    if state is None:
        try:
            state = validate_checkpoint(path, trust_pickle=trust_pickle)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (rank {dist_info.rank}; multi-node runs need --output_dir on a shared "
                                  "file system)") from None
    state["_path"] = str(path)
    state["_restore_copies"] = resume == "auto" or Path(path).resolve() == (out / LAST_NAME).resolve()
    return state


def _pick(resume: str, out: Path, trust_pickle: bool) -> tuple[str | None, dict | None]:
    if resume != "auto":
        return resume, validate_checkpoint(resume, trust_pickle=trust_pickle)
    path, state = find_resume_checkpoint(out, warn=log.warning, trust_pickle=trust_pickle)
    if path is None:
        candidates = list_checkpoints(out)
        if candidates:
            raise CheckpointError(f"--resume auto: none of the {len(candidates)} checkpoints in {out} can be loaded "
                                  "(see the warnings above); move them away to start from scratch, or pass "
                                  "--resume PATH")
        log.info("--resume auto: no checkpoint in %s yet, starting from scratch", out)
        return None, None
    return str(path), state
