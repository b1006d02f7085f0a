"""The checkpoint files of a training run's output folder (written and read by :mod:`beit_fast.utils.checkpoint`).

:class:`Checkpointer` writes ``checkpoint-last.pt`` and publishes the same bytes as numbered / best checkpoints;
the state records what it was published as, and :meth:`Checkpointer.restore_copies` re-does a copy that a crash
(or a full disk) cut short, when the run resumes. :class:`OutputDirLock` keeps a second run out of a folder in
use (a lock left by a killed run is stale and taken over). :func:`find_resume_checkpoint` picks the newest
checkpoint that verifies, loads and is complete; :func:`prune_checkpoints` keeps the newest numbered ones.
"""
from __future__ import annotations

import errno
import filecmp
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ..utils.checkpoint import (
    _NUMBERED, BEST_NAME, LAST_NAME, LOCK_NAME, PUBLISHED_KEY, CheckpointError, CheckpointSaveError,
    OutputDirInUseError, atomic_save, atomic_write_text, copy_atomic, validate_checkpoint,
)
from ..utils.run_files import RunFileError, is_publishable_name, open_run_file, write_error

__all__ = ["numbered_checkpoints", "list_checkpoints", "existing_checkpoints", "remove_run_outputs",
           "find_resume_checkpoint", "prune_checkpoints", "remove_stale_temp_files", "Checkpointer", "OutputDirLock",
           "trim_jsonl"]

log = logging.getLogger("beit_fast.utils.checkpoint")


def numbered_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(N, path of checkpoint-N.pt), ...]`` of a folder, highest N first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NUMBERED.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Resume candidates, newest first: ``checkpoint-last.pt`` (always written with, or after, the
    numbered ones), then ``checkpoint-N.pt`` by decreasing N. ``checkpoint-best.pt`` is not a candidate:
    resuming from it would rewind the run."""
    out = Path(output_dir)
    candidates = [out / LAST_NAME] if (out / LAST_NAME).is_file() else []
    return candidates + [p for _, p in numbered_checkpoints(out)]


def existing_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint file of a run in ``output_dir`` (last, numbered, best)."""
    out = Path(output_dir)
    return list_checkpoints(out) + ([out / BEST_NAME] if (out / BEST_NAME).is_file() else [])


def remove_run_outputs(output_dir: str | os.PathLike, extra: Iterable[str] = ("log.jsonl",)) -> list[Path]:
    """Delete the checkpoints (and the ``extra`` files, e.g. the log) of a previous run in ``output_dir``:
    what an explicit overwrite of the folder means. Returns the deleted paths."""
    out = Path(output_dir)
    removed = []
    for p in existing_checkpoints(out) + [out / name for name in extra]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def find_resume_checkpoint(
    output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None, *, trust_pickle: bool = False,
) -> tuple[Path | None, dict | None]:
    """The newest valid checkpoint of ``output_dir`` and its loaded state, or ``(None, None)``.

    A candidate that fails :func:`validate_checkpoint` (checksums, safe loading, required keys, finite
    weights) is skipped with a warning (``warn(message)``, default :func:`warnings.warn`) and the next older
    one is tried.
    """
    warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
    for path in list_checkpoints(output_dir):
        try:
            return path, validate_checkpoint(path, trust_pickle=trust_pickle)
        except CheckpointError as e:
            warn(f"{e}; falling back to an older checkpoint")
    return None, None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete numbered checkpoints but the ``keep_last`` highest-numbered (0: keep all); returns the
    deleted paths. ``checkpoint-last.pt`` and ``checkpoint-best.pt`` are never touched."""
    if keep_last <= 0:
        return []
    removed = []
    for _, path in numbered_checkpoints(output_dir)[keep_last:]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def remove_stale_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.checkpoint-*.tmp`` files left by a save that was killed (they are never read). Only call
    it while holding the folder's :class:`OutputDirLock`: a live run's temporary file looks the same."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in out.glob(".checkpoint-*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _publisher(name: str) -> Callable:
    """How ``name`` gets the bytes of checkpoint-last.pt: ``checkpoint-best.pt`` as a hard link (no second copy of
    the same state; see :func:`beit_fast.train.checkpoint_writer.link_atomic`), numbered ones as independent copies."""
    if name == BEST_NAME:
        from .checkpoint_writer import link_atomic

        return link_atomic
    return copy_atomic


class Checkpointer:
    """The checkpoints of one output folder.

    :meth:`save` writes ``checkpoint-last.pt`` atomically, then publishes the same bytes as
    ``checkpoint-N.pt`` and/or ``checkpoint-best.pt`` (atomic copies; each state is serialised once) and
    prunes numbered ones beyond ``keep_last``. The state records the names it is published as
    (``published_as``), so :meth:`restore_copies` can re-do a copy that a kill or a full disk cut short
    when the run resumes from that state: no numbered or best checkpoint is lost at that boundary.
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int = 0) -> None:
        self.dir = Path(output_dir)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / LAST_NAME

    @property
    def best(self) -> Path:
        return self.dir / BEST_NAME

    def save(self, state: dict, numbered: str | int | None = None, best: bool = False) -> Path:
        """Write ``state`` as ``checkpoint-last.pt`` (+ numbered / best copies). :class:`CheckpointSaveError`
        if a file cannot be written: the files written before stay complete and valid."""
        names = ([f"checkpoint-{numbered}.pt"] if numbered is not None else []) + ([BEST_NAME] if best else [])
        try:
            atomic_save({**state, PUBLISHED_KEY: names}, self.last)
        except CheckpointSaveError as e:
            raise CheckpointSaveError(f"{e}; the previous {LAST_NAME} is unchanged") from None
        self._publish(self.last, names)
        return self.last

    def _publish(self, src: Path, names: Iterable[str]) -> list[Path]:
        written = []
        for name in names:
            try:
                written.append(_publisher(name)(src, self.dir / name))
            except CheckpointSaveError as e:
                raise CheckpointSaveError(f"{e}; {src.name} is complete and {name} is written from it when the "
                                          "run is resumed") from None
            if _NUMBERED.match(name):
                for path in prune_checkpoints(self.dir, self.keep_last):
                    log.debug("removed %s (--keep_last %d)", path.name, self.keep_last)  # routine: not a line per epoch
        return written

    def restore_copies(self, state: Mapping, source: str | os.PathLike) -> list[Path]:
        """Re-publish ``source`` (the file ``state`` was loaded from) under the names its save published it
        as (``checkpoint-N.pt``, ``checkpoint-best.pt``; any other name is ignored with a warning), where that
        copy is missing or differs (a crash or a full disk between writing
        ``checkpoint-last.pt`` and finishing its copies). Returns the files written."""
        source = Path(source)
        names = state.get(PUBLISHED_KEY, ())
        refused = [n for n in names if not is_publishable_name(n)] if isinstance(names, (list, tuple)) else [names]
        if refused:  # a checkpoint is data: it names only the copies the project itself writes
            log.warning("%s asks to be re-published as %s: ignored (only checkpoint-N.pt and %s are)", source.name,
                        ", ".join(repr(n)[:60] for n in refused[:4]), BEST_NAME)
        names = [n for n in names if is_publishable_name(n)] if isinstance(names, (list, tuple)) else []
        todo = [n for n in names if (self.dir / n).resolve() != source.resolve()
                and not _same_bytes(source, self.dir / n)]
        written = self._publish(source, todo)
        for path in written:
            log.info("re-wrote %s from %s (its copy was cut short when the run stopped)", path.name, source.name)
        return written


_HELD_LOCKS: set[str] = set()  # lock files held by this process (POSIX locks are per process)


class OutputDirLock:
    """An exclusive lock on a run's output folder (``run.lock``), held for the whole run.

    A POSIX record lock (``fcntl.lockf``) on ``run.lock``, which holds the holder's pid, host, start time and
    command (for the message a second run gets). The kernel releases the lock when the process ends, however
    it ends; a clean release also deletes the file. So a ``run.lock`` that nobody holds was left by a run
    that was killed: it is stale and taken over (:meth:`acquire` returns what that run wrote into it).
    Forked data workers do not inherit the lock.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self._key = ""

    @staticmethod
    def _read(fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace").strip()

    @staticmethod
    def describe(text: str) -> str:
        try:
            info = json.loads(text)
            return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: "
                    f"{info.get('command')}")
        except (ValueError, AttributeError):
            return text[:200] or "unknown process"

    def acquire(self) -> str | None:
        """Take the lock; :class:`OutputDirInUseError` if a live run holds it. Returns the description of
        a stale holder (a run that died without releasing it), else None."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            log.warning("cannot lock %s on this platform: make sure no other run uses this folder", self.path)
            return None
        key = str(self.path.resolve())
        if key in _HELD_LOCKS:  # POSIX locks belong to the process: a second lock here would succeed
            raise OutputDirInUseError(f"--output_dir {self.path.parent} is in use by another run in this process "
                                      f"(pid {os.getpid()}; lock file {self.path})")
        for _ in range(20):
            fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT, "lock file")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EACCES, errno.EAGAIN)
                holder = self._read(fd) if busy else ""
                os.close(fd)
                if busy:
                    raise OutputDirInUseError(
                        f"--output_dir {self.path.parent} is in use by another run ({self.describe(holder)}; lock "
                        f"file {self.path}). Wait for it to finish or stop it, or use another --output_dir") from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                    log.warning("cannot lock %s (%s): make sure no other run uses this folder", self.path,
                                e.strerror)
                    return None
                raise CheckpointError(f"cannot lock {self.path}: {e.strerror or e}") from None
            # Locked - but a run releasing the lock deletes the file: make sure ours is still the one there.
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            own = os.fstat(fd)
            if st is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                break
            os.close(fd)
        else:
            raise CheckpointError(f"cannot lock {self.path}: it keeps being replaced")
        stale = self._read(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        self._fd, self._key = fd, key
        _HELD_LOCKS.add(key)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as e:
            self.release()
            raise write_error(self.path, e, "lock file") from None
        return self.describe(stale) if stale else None

    def release(self) -> None:
        """Delete the lock file, then unlock it (a run waiting on the old file sees it is gone). Idempotent."""
        if self._fd is None:
            return
        import fcntl  # present: acquire() got this far

        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
            _HELD_LOCKS.discard(self._key)

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def trim_jsonl(path: str | os.PathLike, key: str, last: int) -> None:
    """Keep the JSON-lines records of ``path`` whose ``key`` is <= ``last`` (a resumed run logs the later
    ones again; a line cut off by a kill, or one without ``key``, is dropped). Rewritten atomically (under a
    ``mkstemp`` name); a symbolic link, FIFO or directory in place of the log is refused
    (:func:`beit_fast.utils.run_files.open_run_file`)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    kept = []
    with os.fdopen(open_run_file(path, os.O_RDONLY, "log"), encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if json.loads(line)[key] <= last:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
    try:
        atomic_write_text(path, "".join(kept))
    except CheckpointSaveError as e:
        raise RunFileError(str(e)) from None
