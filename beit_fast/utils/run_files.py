"""The fixed names of a run's output folder, opened safely.

A run writes files under fixed names (``run.lock``, ``log.jsonl``, ``args.json``, checkpoints). Whoever
can write into the folder could plant something under those names: a symbolic link to another file (which
the run would then truncate and overwrite), a FIFO (an ``open`` that never returns), a directory. So every
fixed name is opened with :func:`open_run_file`: ``O_NOFOLLOW`` (a symbolic link is refused, not followed),
``O_NONBLOCK`` while opening (a FIFO cannot hang the open), then an ``fstat`` check that it is a regular file.
What fails is a :class:`RunFileError` (a :class:`~beit_fast.utils.checkpoint.CheckpointError`: the CLIs print it as
``error: ...`` and exit non-zero) naming the path and the cause; :func:`write_error` words a failed write
(disk full, read-only file system) the same way. Checkpoints are written under temporary names from
``mkstemp`` (``O_EXCL``) and renamed (:func:`beit_fast.utils.checkpoint.atomic_save`), which never follows a link.

:func:`is_publishable_name` is the fixed set of names a checkpoint may ask to be re-published under
(``checkpoint-N.pt``, ``checkpoint-best.pt``): a checkpoint is data, it cannot name ``args.json`` or a
tokenizer.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .checkpoint import _NUMBERED, BEST_NAME, CheckpointError

__all__ = ["RunFileError", "open_run_file", "write_error", "is_publishable_name"]


class RunFileError(CheckpointError):
    """A fixed file of a run's output folder that cannot be opened or written safely."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_run_file(path: str | os.PathLike, flags: int, what: str = "run file") -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)`` that must give a regular file (mode
    0666 less the umask when created); returns the descriptor (blocking again). :class:`RunFileError`
    naming ``path`` if it is a symbolic link, a FIFO, a directory, ... or cannot be opened."""
    path = Path(path)
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | extra, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and path.is_symlink()):
            raise RunFileError(f"the {what} {path} is a symbolic link: refused (a run writes its own files and "
                               "never follows a link planted under their names; remove it)") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            kind = _kind(os.lstat(path).st_mode) if path.exists() else "not a regular file"
            raise RunFileError(f"the {what} {path} is {kind}, not a regular file: remove it") from None
        raise RunFileError(f"cannot open the {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunFileError(f"the {what} {path} is {_kind(st.st_mode)}, not a regular file: remove it")
        if extra & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_error(path: str | os.PathLike, e: OSError, what: str = "run file") -> RunFileError:
    """A :class:`RunFileError` for a failed write of ``path`` (disk full, read-only file system, ...)."""
    return RunFileError(f"could not write the {what} {path}: {e.strerror or e}")


def is_publishable_name(name: object) -> bool:
    """Whether a checkpoint may ask to be (re-)published as ``name``: ``checkpoint-N.pt`` or
    ``checkpoint-best.pt`` only."""
    return isinstance(name, str) and (name == BEST_NAME or _NUMBERED.match(name) is not None)
