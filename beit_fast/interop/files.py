"""Reading and writing state dicts: torch files (through the package's one safe reader), safetensors, HF
model folders (sharded or not)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .formats import StateDict

_WRAPPERS = ("model", "module", "state_dict", "model_state")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state dict found (expected a mapping of names to tensors, possibly under "
                         f"one of the keys {_WRAPPERS})")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _torch_load(path: Path, map_location, trust_pickle: bool):
    """The package's one checkpoint reader; every failure as a ValueError naming the file (an unsafe
    pickle's message names the opt-in, ``trust_pickle=True`` / ``--trust-pickle``)."""
    from ..utils.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, map_location, trust_pickle=trust_pickle)
    except CheckpointError as e:
        if isinstance(e, ValueError):
            raise
        raise ValueError(str(e)) from None


def _load_safetensors(path: Path, map_location) -> StateDict:
    """A ``.safetensors`` file; a truncated, corrupt or crafted one is a ValueError naming it."""
    from safetensors.torch import load_file

    device = str(map_location) if not isinstance(map_location, str) else map_location
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError, RuntimeError, IndexError, OverflowError, ...
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {detail})") from None


def _shards(folder: Path, index_file: Path) -> list[Path]:
    """The shard files of an HF ``*.index.json``: relative paths inside ``folder`` only (a crafted index must
    not make us read ``../outside.safetensors`` or an absolute path), each a regular file that is not itself
    an index (``.``, ``./``, a folder, a nested index or a FIFO would recurse or hang: refused). A shard may
    be a symbolic link (the Hugging Face cache links its snapshot files to ``../../blobs/``): the index is
    what is untrusted, and it can only name files that whoever wrote the folder put there."""
    try:
        index = json.loads(index_file.read_text())
        names = sorted(set(index["weight_map"].values()))
        if not all(isinstance(n, str) for n in names):
            raise TypeError("shard names must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file} is not a valid shard index ({type(e).__name__}: {e})") from None
    shards = []
    for name in names:
        parts = Path(name).parts
        if not name or os.path.isabs(name) or ".." in parts:
            raise ValueError(f"{index_file} names the shard {name!r}, outside {folder}: refusing to read it")
        if not parts or name.endswith(_HF_INDEX) or name.endswith(".index.json"):
            raise ValueError(f"{index_file} names the shard {name!r}, which is not a weights file: refusing it")
        shard = folder / name
        _check_regular_file(shard, f"the shard {name!r} of {index_file}")
        shards.append(shard)
    return shards


def _check_regular_file(path: Path, what: str) -> None:
    """``ValueError`` unless ``path`` (links followed) is a regular file: a FIFO would hang the read, a
    folder would recurse."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{what} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{what} ({path}) is {kind}: refusing to read it")


def load_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trust_pickle: bool = False
) -> StateDict:
    """Read a state dict from a ``.safetensors`` file, a torch file (``.pt``/``.pth``/``.bin``/``.ckpt``) or an
    HF model directory (``model.safetensors`` / ``pytorch_model.bin``, sharded or not).

    Official checkpoints keep the weights under ``"model"`` (also accepted: ``module``, ``state_dict``,
    ``model_state``); a ``module.`` prefix (DDP) is stripped. Torch files are read by
    :func:`beit_fast.utils.checkpoint.load_checkpoint` (checksums, ``weights_only=True``) unless
    ``trust_pickle=True`` (needed for files that pickle other objects, such as official training
    checkpoints with their ``args``; it can run code from the file: only for files you trust). Shards of
    an index must lie inside its folder. A file that cannot be read is a ValueError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in _HF_FILES:
            if (path / name).is_file():
                return load_state_dict(path / name, map_location, trust_pickle)
        for name in _HF_INDEX:
            if (path / name).is_file():
                sd: StateDict = {}
                for shard in _shards(path, path / name):
                    sd.update(load_state_dict(shard, map_location, trust_pickle))
                return sd
        raise FileNotFoundError(f"{path} is a directory without {' or '.join(_HF_FILES + _HF_INDEX)}")
    _check_regular_file(path, "the checkpoint")
    if path.suffix == ".safetensors":
        return _unwrap(_load_safetensors(path, map_location), path)
    return _unwrap(_torch_load(path, map_location, trust_pickle), path)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, format: str | None = None,
    wrap: str | None = None, metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as ``format`` "safetensors" or "pt" (default: from the suffix; ``.safetensors`` ->
    safetensors, else pt). ``wrap="model"`` stores ``{"model": state_dict}`` in a torch file, the official
    checkpoint layout (safetensors files are always flat). safetensors files get the metadata
    ``{"format": "pt"}`` that ``transformers.from_pretrained`` requires, plus ``metadata``. Tensors are
    written contiguous and unshared (safetensors refuses views of one storage, e.g. split q/k/v). Both
    formats are written atomically with the user's umask (:func:`beit_fast.utils.checkpoint.atomic_save`); a failed
    write is a :class:`beit_fast.utils.checkpoint.CheckpointSaveError` naming the file."""
    path = Path(path)
    if format is None:
        format = "safetensors" if path.suffix == ".safetensors" else "pt"
    if format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors', got {format!r}")
    tensors = {k: v.detach() for k, v in state_dict.items()}
    if format == "safetensors":
        from safetensors.torch import save

        from ..utils.checkpoint import _write_atomically

        if wrap is not None:
            raise ValueError("safetensors files hold a flat state dict: wrap is for torch files only")
        meta = {"format": "pt", **(metadata or {})}
        data = save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=meta)
        # the package's atomic writer: temp file + fsync + rename, the user's umask, CheckpointSaveError
        return _write_atomically(path, lambda f: f.write(data))
    from ..utils.checkpoint import atomic_save

    # cloned so that views (split q/k/v) do not drag their whole storage into the file
    obj: Any = {k: v.clone() for k, v in tensors.items()}
    if wrap is not None:
        obj = {wrap: obj}
    return atomic_save(obj, path)
