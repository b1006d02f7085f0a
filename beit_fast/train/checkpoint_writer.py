"""Checkpoints off the training's critical path.

Writing a checkpoint of BEiT-B (weights and AdamW's moments, about 1 GB) with an fsync takes seconds, while
every rank waits. :class:`BackgroundSaver` takes a snapshot of the state in host memory
(:func:`snapshot_to_host`: device tensors copied, host tensors cloned, since the training goes on updating
them in place) and writes it on a thread while the training continues, with the same files as a synchronous
save: written to a temporary name, fsynced, renamed (:class:`beit_fast.train.checkpoint_folder.Checkpointer`), so a kill
at any moment leaves the previous complete file. One write at a time: the next save first waits for the one
before and reports its failure. :func:`link_atomic` publishes ``checkpoint-best.pt`` as a hard link to
``checkpoint-last.pt`` (no second gigabyte written; the files are only ever replaced by a rename, never
changed in place, so a link never sees a later save).
"""
from __future__ import annotations

import errno
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["snapshot_to_host", "BackgroundSaver", "link_atomic"]


def snapshot_to_host(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) whose tensors are host copies owned by the copy."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):  # dict, OrderedDict (state dicts)
        return type(obj)((k, snapshot_to_host(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [snapshot_to_host(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot_to_host(v) for v in obj)
    return obj


class BackgroundSaver:
    """Runs one save at a time on a thread. :meth:`submit` starts ``save()`` (after waiting for the previous
    one); :meth:`wait` blocks until it is done and returns its exception (None: it succeeded), once."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], Any]) -> None:
        error = self.wait()
        if error is not None:
            raise error

        def run() -> None:
            try:
                save()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        # Not a daemon: an interpreter that exits (end of a run, an error) still finishes the file first.
        self._thread = threading.Thread(target=run, name="beit_fast-checkpoint-writer")
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> BaseException | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` a hard link to ``src``, atomically: a link under a temporary name in ``dst``'s folder, then
    renamed over ``dst`` (a kill leaves ``dst`` as it was, plus a ``.name.*.tmp`` that
    :func:`beit_fast.train.checkpoint_folder.remove_stale_temp_files` removes), then the folder fsynced. Where the file
    system has no hard links, an atomic copy (:func:`beit_fast.utils.checkpoint.copy_atomic`)."""
    from ..utils.checkpoint import _fsync_dir, _write_error, copy_atomic

    src, dst = Path(src), Path(dst)
    for _ in range(16):
        tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.link(src, tmp)
            break
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                return copy_atomic(src, dst)
            raise _write_error(dst, e) from None
    else:
        raise _write_error(dst, FileExistsError(errno.EEXIST, "no free temporary name"))
    try:
        os.replace(tmp, dst)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _write_error(dst, e) from None
    _fsync_dir(dst.parent)
    return dst
