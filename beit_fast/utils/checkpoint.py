"""Checkpoint files: the one place where the package reads and writes them.

Reading
  :func:`load_checkpoint` is the one reader of every torch file the package opens (training checkpoints,
  pretrained weights, tokenizers, the DALL-E ``encoder.pkl``, files to convert). It verifies the zip
  checksums torch writes into each record (a flipped byte is an error naming the file, not NaN losses
  later), then loads with ``torch.load(weights_only=True)``: tensors and plain Python values only, plus an
  explicit allow-list (stand-ins that build only the previous checkpoint format's uint32 RNG key, at most
  1024 words: no callable that allocates a size the file chooses; the DALL-E stand-in classes, passed by
  that loader). Anything else - a crafted file that would run code, an
  official checkpoint with its ``argparse.Namespace`` - raises :class:`UnsafeCheckpointError`, unless the
  caller opts in with ``trust_pickle=True`` (CLI: ``--trust-pickle``), which reads the file with Python's
  full unpickler after a warning.

Writing
  :func:`atomic_save` / :func:`copy_atomic` write to a temporary file in the same folder, fsync, rename:
  a reader sees the old file or the new one, never half of one, even after ``kill -9`` or a power loss.
  Files get the user's umask (``0666 & ~umask``, not ``mkstemp``'s 0600). A write that fails (disk full,
  permissions) raises :class:`CheckpointSaveError` naming the file and the cause; the previous file is
  left as it was and no temporary file is left behind.

Output folders of training runs (:mod:`beit_fast.train.checkpoint_folder`, built on the above)
  :class:`~beit_fast.train.checkpoint_folder.Checkpointer` writes ``checkpoint-last.pt`` and publishes the same bytes as numbered / best
  checkpoints; the state records what it was published as, and :meth:`Checkpointer.restore_copies` re-does
  a copy that a crash (or a full disk) cut short, when the run resumes. ``OutputDirLock`` keeps a
  second run out of a folder in use (a lock left by a killed run is stale and taken over).
  ``find_resume_checkpoint`` picks the newest checkpoint that verifies, loads and is complete.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "atomic_save", "atomic_write_text", "copy_atomic", "load_checkpoint", "extract_model_state", "validate_checkpoint",
    "verify_checksums", "is_zip_format", "CheckpointError", "UnsafeCheckpointError", "CheckpointSaveError",
    "OutputDirInUseError", "REQUIRED_KEYS", "LAST_NAME", "BEST_NAME", "LOCK_NAME",
]

log = logging.getLogger("beit_fast.utils.checkpoint")

LAST_NAME = "checkpoint-last.pt"
BEST_NAME = "checkpoint-best.pt"
LOCK_NAME = "run.lock"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
#: What a training checkpoint of this package must hold to be resumable.
REQUIRED_KEYS = ("model", "optimizer", "step", "model_config")
#: The key under which a saved state lists the other names it was published as (numbered, best).
PUBLISHED_KEY = "published_as"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded or is not a complete training checkpoint."""


class UnsafeCheckpointError(CheckpointError, ValueError, pickle.UnpicklingError):
    """A file holding pickled Python objects that the safe loader refuses (unpickling them could run code)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, ...); the previous file is unchanged."""


class OutputDirInUseError(CheckpointError):
    """Another live run holds the output folder's lock."""


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
class _LegacyRngKey:
    """Stand-ins that read the previous checkpoint format's numpy RNG state (``np.random.get_state()``: a
    ``uint32 [624]`` MT19937 key) and nothing else. The names ``numpy.ndarray`` / ``numpy.dtype`` /
    ``numpy._core.multiarray._reconstruct`` resolve to these: no callable reachable from a file allocates
    a size the file chooses (``numpy.ndarray((2**31,), dtype('O'))`` is refused before any allocation)."""

    #: The longest key accepted (MT19937's is 624 words).
    MAX_WORDS = 1024

    @staticmethod
    def ndarray(*_args) -> None:
        """What ``numpy.ndarray`` resolves to: only an argument of ``_reconstruct``, never called."""
        raise pickle.UnpicklingError("refusing numpy.ndarray(...): the safe loader builds numpy arrays only as the "
                                     "previous checkpoint format's uint32 RNG key")

    @staticmethod
    def dtype(name: Any = None, align: Any = False, copy: Any = True) -> Any:
        import numpy as np

        if name != "u4":
            raise pickle.UnpicklingError(f"refusing numpy.dtype({name!r}): the safe loader reads only uint32 "
                                         "numpy arrays (the previous checkpoint format's RNG key)")
        return np.dtype("u4")

    @classmethod
    def reconstruct(cls, subtype: Any, shape: Any, typecode: Any) -> Any:
        """``_reconstruct(ndarray, (0,), b'b')``, as numpy pickles every array: an empty key."""
        if subtype is not cls.ndarray or tuple(shape) != (0,) or typecode not in (b"b", "b"):
            raise pickle.UnpicklingError("refusing numpy _reconstruct(...) of anything but an empty ndarray")
        import numpy as np

        return np.ndarray.__new__(_legacy_key_array(), (0,), np.uint8)


_LEGACY_KEY_ARRAY: type | None = None


def _legacy_key_array() -> type:
    """The ndarray subclass the previous format's RNG key is built as (created on first use: numpy is
    imported lazily). Its constructor refuses (only :meth:`_LegacyRngKey.reconstruct` makes one, empty) and
    its ``__setstate__`` accepts a 1-D uint32 array of at most ``MAX_WORDS`` words whose bytes are all there."""
    global _LEGACY_KEY_ARRAY
    if _LEGACY_KEY_ARRAY is None:
        import numpy as np

        class LegacyRngKeyArray(np.ndarray):
            def __new__(cls, *args, **kwargs):
                raise pickle.UnpicklingError("refusing to build a numpy array from a checkpoint")

            def __setstate__(self, state):
                ok = (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                      and len(state[1]) == 1 and isinstance(state[1][0], int)
                      and 0 <= state[1][0] <= _LegacyRngKey.MAX_WORDS and state[2] == np.dtype("u4")
                      and isinstance(state[4], (bytes, bytearray)) and len(state[4]) == 4 * state[1][0])
                if not ok:
                    raise pickle.UnpicklingError("refusing a numpy array that is not the previous checkpoint "
                                                 f"format's RNG key (1-D uint32, at most {_LegacyRngKey.MAX_WORDS} "
                                                 "words)")
                super().__setstate__(state)

        _LEGACY_KEY_ARRAY = LegacyRngKeyArray
    return _LEGACY_KEY_ARRAY


def _previous_format_globals() -> list:
    """What the previous checkpoint format needs beyond tensors and plain values: numpy's RNG state
    (``np.random.get_state()``) holds a uint32 array. The numpy names resolve to :class:`_LegacyRngKey`'s
    stand-ins, which build that array and nothing else (no numpy callable is reachable from a file)."""
    import numpy as np

    key = _legacy_key_array()
    return [(_LegacyRngKey.ndarray, "numpy.ndarray"), (_LegacyRngKey.dtype, "numpy.dtype"),
            type(np.dtype(np.uint32)), (key, "beit_fast.utils.checkpoint.LegacyRngKeyArray"),
            (_LegacyRngKey.reconstruct, "numpy._core.multiarray._reconstruct"),
            (_LegacyRngKey.reconstruct, "numpy.core.multiarray._reconstruct")]


def is_zip_format(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in torch's zip format (what ``torch.save`` writes since torch 1.6), told by its
    first bytes as torch does (``zipfile.is_zipfile`` looks at the end and also finds zips *inside* a file)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def verify_checksums(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every record of a torch zip file (torch writes them; ``torch.load`` does not
    check them). :class:`CheckpointError` naming the file if one differs. Files in torch's legacy (non-zip)
    format carry no checksums and pass; records written without checksums (CRC 0) are not checked."""
    path = Path(path)
    errors = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError)
    if not is_zip_format(path):
        return
    try:
        zf = zipfile.ZipFile(path)
    except errors as e:  # e.g. truncated: no central directory
        raise CheckpointError(f"checkpoint {path} cannot be loaded (a damaged or truncated zip archive: "
                              f"{type(e).__name__}: {e})") from None
    with zf:
        for info in zf.infolist():
            if info.CRC == 0 and info.file_size:
                continue
            try:
                with zf.open(info) as f:
                    while f.read(16 << 20):
                        pass
            except errors as e:
                raise CheckpointError(f"checkpoint {path} is corrupt: its record {info.filename} does not match the "
                                      f"checksum written with it ({type(e).__name__}: {e})") from None


def _weights_only_detail(e: BaseException) -> str:
    """The line of torch's weights-only error that says what was refused (its other lines are advice)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    keys = ("global", "unsupported", "trying to", "can only", "only persistent", "blocked", "invalid", "refusing")
    for line in lines:
        if any(k in line.lower() for k in keys) and not line.startswith(("Weights only load failed", "(1)", "(2)")):
            return line
    return lines[0] if lines else type(e).__name__


def _is_refused_object(detail: str) -> bool:
    """Whether torch's weights-only unpickler refused an object it does not allow (vs. bytes that are not
    a pickle at all, e.g. a corrupt or foreign file)."""
    d = detail.lower()
    return any(s in d for s in ("global", "function", "create new object", "build", "reduce", "__setstate__",
                                "persistent_load", "refusing"))  # the last: a pickled module in torch's legacy format


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, trust_pickle: bool = False,
    allow: Sequence[Any] = (), verify: bool = True, mmap: bool = False,
) -> Any:
    """Read a torch file safely: the package's one checkpoint reader.

    * ``verify``: check the zip checksums first (:func:`verify_checksums`). ``mmap``: map the tensors
      instead of reading them (zip format; to look at the small values of a large file).
    * ``torch.load(weights_only=True)``: tensors, containers and plain Python values, plus the previous
      format's numpy RNG arrays and the globals in ``allow`` (e.g. the DALL-E stand-in classes).
    * A file with other pickled objects raises :class:`UnsafeCheckpointError` (naming the object and the
      opt-in), unless ``trust_pickle=True``: then Python's full unpickler reads it, after a warning - it can
      run any code the file contains; only for files you trust.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (naming the file) for one
    that cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if verify:
        verify_checksums(path)
    try:
        with torch.serialization.safe_globals([*_previous_format_globals(), *allow]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = _weights_only_detail(e)
        if not _is_refused_object(detail):
            raise CheckpointError(f"checkpoint {path} cannot be loaded (not a torch checkpoint, or corrupt: "
                                  f"{detail})") from None
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects that the safe loader refuses ({detail}): unpickling them "
                "can run arbitrary code. If you trust the file, pass --trust-pickle (Python: trust_pickle=True)"
            ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _load_trusting_pickle(path, map_location)


def _load_trusting_pickle(path: Path, map_location: str | torch.device) -> Any:
    """The explicit opt-in (``trust_pickle=True`` / ``--trust-pickle``) and nothing else reaches this."""
    warnings.warn(f"--trust-pickle: reading {path} with Python's full unpickler, which can run arbitrary code "
                  "stored in the file; do this only for files you trust", UserWarning, stacklevel=3)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever the file does, name it
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from None


def extract_model_state(checkpoint: dict) -> dict:
    """The model state dict of a checkpoint: official files keep it under ``model`` (or ``module``)."""
    for key in ("model", "module", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def _non_finite(tensors: Mapping[str, Any]) -> list[str]:
    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def validate_checkpoint(
    path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_KEYS, *, trust_pickle: bool = False,
) -> dict:
    """Load ``path`` (:func:`load_checkpoint`: checksums, safe loading) and check it is a complete training
    checkpoint with finite model weights; :class:`CheckpointError` (naming the file and the reason)
    otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_checkpoint(path, trust_pickle=trust_pickle)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a broken file can raise
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a beit_fast training checkpoint (missing {missing})")
    model = state.get("model")
    bad = _non_finite(model) if isinstance(model, Mapping) else []
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: non-finite model weights in {bad[:4]}")
    return state


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the only portable way (and put it back at once)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: BaseException) -> CheckpointSaveError:
    """A clear message for a failed write of ``path`` (disk full, permissions, ...)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):  # torch wraps the OSError of f.write
        cause = cause.__cause__ or cause.__context__
    reason = f"{cause.strerror or cause}" if isinstance(cause, OSError) else f"{type(e).__name__}: {e}"
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f" ({free / 2**20:.1f} MiB free on that file system)"
        except OSError:
            pass
    return CheckpointSaveError(f"could not write {path}: {reason}")


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    # torch's zip writer reports a failed f.write as "[enforce fail at inline_container.cc] ..."
    return isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)
                                            or isinstance(e.__context__, OSError))


def _write_atomically(path: Path, write: Callable[[Any], None]) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if _is_write_failure(e):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path.parent)
    return path


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
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.
    :class:`CheckpointSaveError` if it cannot be written (``path`` is then unchanged)."""
    return _write_atomically(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_save` does a torch file."""
    data = text.encode("utf-8")
    return _write_atomically(Path(path), lambda f: f.write(data))


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` an independent copy of ``src``, atomically (copy to a temporary name, fsync, rename).

    A copy rather than a hard link, so that the numbered and best checkpoints do not share storage with
    ``checkpoint-last.pt``: damage to one file (in-place edits, bad blocks) cannot take the others along.
    """
    src = Path(src)

    def write(f) -> None:
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 16 << 20)

    return _write_atomically(Path(dst), write)
