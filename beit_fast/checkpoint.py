"""Checkpoint files: written atomically so a crash mid-save never leaves a broken file behind.

* :func:`atomic_save` - ``torch.save`` to a temporary file in the same folder, fsync, rename over the
  target, fsync the folder: a reader (or a resumed run) sees the old file or the new one, never half of
  one, even if the process is killed (SIGKILL) or the machine loses power during the save. A killed save
  leaves only a hidden ``.NAME.*.tmp`` file, which :func:`remove_stale_temp_files` clears.
* :func:`copy_atomic` - publish an existing checkpoint under another name (numbered, best) without
  serialising it again: an independent copy, written atomically as well.
* :func:`find_resume_checkpoint` - the newest checkpoint of an output folder that loads and looks
  complete, skipping (with a warning) any that does not.
* :func:`prune_checkpoints` - keep the last K numbered checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "atomic_save", "load_checkpoint", "extract_model_state", "CheckpointError", "REQUIRED_KEYS",
    "validate_checkpoint", "list_checkpoints", "find_resume_checkpoint", "prune_checkpoints",
    "copy_atomic", "remove_stale_temp_files", "LAST_NAME", "BEST_NAME",
]

LAST_NAME = "checkpoint-last.pt"
BEST_NAME = "checkpoint-best.pt"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
#: What a training checkpoint of this package must hold to be resumable.
REQUIRED_KEYS = ("model", "optimizer", "step", "model_config")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded or is not a complete training checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` an independent copy of ``src``, atomically (copy to a temporary name, fsync, rename).

    A copy rather than a hard link, so that the numbered and best checkpoints do not share storage with
    ``checkpoint-last.pt``: damage to one file (in-place edits, bad blocks) cannot take the others along.
    """
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as g:
            shutil.copyfileobj(g, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(dst.parent)
    return dst


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by this package (or an official one); clear error if missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Our checkpoints hold numpy RNG state and plain python values: weights_only would refuse them.
    return torch.load(path, map_location=map_location, weights_only=False)


def validate_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """Load ``path`` and check it is a complete training checkpoint; :class:`CheckpointError` (naming the
    file and the reason) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = load_checkpoint(path)
    except Exception as e:  # truncated zip, pickle errors, bad magic number, ...
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a beit_fast training checkpoint (missing {missing})")
    return state


def extract_model_state(checkpoint: dict) -> dict:
    """The model state dict of a checkpoint: official files keep it under ``model`` (or ``module``)."""
    for key in ("model", "module", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


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


def find_resume_checkpoint(
    output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None,
) -> tuple[Path | None, dict | None]:
    """The newest valid checkpoint of ``output_dir`` and its loaded state, or ``(None, None)``.

    A candidate that cannot be loaded or lacks :data:`REQUIRED_KEYS` is skipped with a warning
    (``warn(message)``, default :func:`warnings.warn`) and the next older one is tried.
    """
    warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
    for path in list_checkpoints(output_dir):
        try:
            return path, validate_checkpoint(path)
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
    """Delete ``.checkpoint-*.tmp`` files left by a save that was killed (they are never read)."""
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


def trim_jsonl(path: str | os.PathLike, key: str, last: int) -> None:
    """Keep the JSON-lines records of ``path`` whose ``key`` is <= ``last`` (a resumed run logs the later
    ones again; a line cut off by a kill, or one without ``key``, is dropped). Rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)[key] <= last:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
