"""Reading the DALL-E encoder weights (:func:`dalle_state_dict_from_file`; the encoder is
:mod:`beit_fast.tokenizer.dalle`).

Loading the released ``encoder.pkl`` (a whole ``dall_e.encoder.Encoder`` object saved with
``torch.save``) does not need the ``dall_e`` package (nor ``attrs``), and never reaches Python's normal
unpickler. Only an allow-list of exactly what the file holds is accepted: stand-in classes defined here for
``dall_e.encoder.Encoder`` / ``EncoderBlock`` and ``dall_e.utils.Conv2d`` (and, so that a decoder file is
named in the error, the decoder's classes), the ``torch.nn`` modules they contain (``Sequential``,
``ReLU``, ``MaxPool2d``, ``Identity``, ``Upsample``), tensors and plain containers. Anything else - e.g.
``torch.storage._load_from_bytes``, which would hand the rest of the file to a normal unpickler - is
refused.

* A zip-format file (``torch.save`` since torch 1.6) is read by the package's one safe reader,
  :func:`beit_fast.utils.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``), with that allow-list.
* The released ``encoder.pkl`` is in torch's older (legacy) format, in which pickled modules reference
  their classes through a kind of record that ``weights_only`` cannot read. :func:`_read_legacy_file` reads
  that format itself with :class:`_RestrictedUnpickler` (``find_class`` admits the allow-list only; tensors
  are rebuilt by the functions here, without torch's rebuild functions or backward hooks), and fills the
  tensors from the raw storage records that follow the pickle.

The weights are then read off the unpickled objects' ``_parameters`` / ``_modules`` dicts (no method of
an unpickled object is called). A plain state dict (``.pt``/``.pth``) of the same layout loads the same way.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, UnsafeCheckpointError, is_zip_format, load_checkpoint
from ..utils.limits import check_tensors_hold_their_bytes, tensor_layout_problem


class _PickledDalleModule(nn.Module):
    """Base of the stand-ins for ``dall_e`` classes found in a pickle. Unpickling calls ``cls.__new__``
    and then ``nn.Module.__setstate__`` with the saved ``__dict__`` (attrs fields, ``_parameters``,
    ``_modules``, ...), so the stand-ins need no constructor; their ``forward`` mirrors the original's
    fp32 path so a loaded object is also usable as is."""

    _dall_e_name = "?"

    def __init__(self):  # pragma: no cover - never constructed directly, only unpickled
        raise TypeError(f"{type(self).__name__} is a stand-in for unpickling only")


class _PickledConv2d(_PickledDalleModule):
    _dall_e_name = "dall_e.utils.Conv2d"

    def forward(self, x: Tensor) -> Tensor:
        kw = int(self.w.shape[-1])
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(kw - 1) // 2)


class _PickledEncoderBlock(_PickledDalleModule):
    _dall_e_name = "dall_e.encoder.EncoderBlock"

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _PickledEncoder(_PickledDalleModule):
    _dall_e_name = "dall_e.encoder.Encoder"

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x.float())


class _PickledDecoder(_PickledDalleModule):
    _dall_e_name = "dall_e.decoder.Decoder"


class _PickledDecoderBlock(_PickledDalleModule):
    _dall_e_name = "dall_e.decoder.DecoderBlock"


#: The safe loader's allow-list for ``encoder.pkl``: (class, name in the file). The decoder's classes are
#: there only so that a decoder.pkl passed by mistake is named in the error instead of "unsupported global".
_DALLE_ALLOWED: list[tuple[type, str]] = [
    (_PickledEncoder, "dall_e.encoder.Encoder"),
    (_PickledEncoderBlock, "dall_e.encoder.EncoderBlock"),
    (_PickledConv2d, "dall_e.utils.Conv2d"),
    (_PickledDecoder, "dall_e.decoder.Decoder"),
    (_PickledDecoderBlock, "dall_e.decoder.DecoderBlock"),
] + [(cls, f"{cls.__module__}.{cls.__qualname__}")
     for cls in (nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Upsample)]


# --- the legacy (pre-zip) torch file format, read with a restricted unpickler --------------------------
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _StorageType:
    """What a storage class name in the file resolves to: only its dtype (never called)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Tensor, storage_offset: int, size, stride, *_ignored) -> Tensor:
    """``torch._utils._rebuild_tensor(_v2)`` for our flat storages: a view (filled after the pickle);
    ``requires_grad``, backward hooks and metadata are ignored."""
    if not isinstance(storage, Tensor) or storage.dim() != 1:
        raise pickle.UnpicklingError("a tensor record does not refer to a storage")
    size, stride = tuple(int(v) for v in size), tuple(int(v) for v in stride)
    if len(size) != len(stride) or any(n < 0 for n in size):
        raise pickle.UnpicklingError(f"a tensor record has a malformed shape {size} / stride {stride}")
    needed = int(storage_offset) + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0
    if storage_offset < 0 or any(st < 0 for st in stride) or needed > storage.numel():
        raise pickle.UnpicklingError("a tensor record reaches past its storage")
    t = storage.as_strided(size, stride, storage.storage_offset() + int(storage_offset))
    problem = tensor_layout_problem(t)
    if problem is not None:
        raise pickle.UnpicklingError(f"a tensor record of shape {size} has {problem}: it claims more elements than "
                                     "its storage holds")
    return t


def _rebuild_parameter(data: Tensor, *_ignored) -> Tensor:
    """``torch._utils._rebuild_parameter``: a frozen Parameter, backward hooks ignored."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("a parameter record does not hold a tensor")
    return nn.Parameter(data, requires_grad=False)


def _legacy_allowed() -> dict[str, Any]:
    allowed: dict[str, Any] = {name: cls for cls, name in _DALLE_ALLOWED}
    allowed.update({
        "collections.OrderedDict": OrderedDict, "builtins.set": set, "__builtin__.set": set,
        "torch.device": torch.device, "torch.Size": torch.Size,
        "torch._utils._rebuild_tensor": _rebuild_tensor, "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
    })
    allowed.update({f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Python's unpickler restricted to :func:`_legacy_allowed`: ``find_class`` refuses every other global,
    and the persistent records (module classes, storages) are resolved here. Storages are allocated empty,
    within ``max_bytes`` in all (the file size: a record cannot make us allocate more than the file holds)."""

    def __init__(self, file, max_bytes: int) -> None:
        super().__init__(file)
        self.allowed = _legacy_allowed()
        self.storages: dict[str, Tensor] = {}
        self.budget = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self.allowed:
            return self.allowed[key]
        raise pickle.UnpicklingError(f"refusing to unpickle global '{key}': it is not part of a pickled DALL-E "
                                     "encoder")

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0].decode("ascii") if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes) else \
            (pid[0] if isinstance(pid, tuple) and pid else None)
        if kind == "module" and len(pid) >= 2 and pid[1] in [cls for cls, _ in _DALLE_ALLOWED]:
            return pid[1]
        if kind == "storage" and len(pid) == 6 and isinstance(pid[1], _StorageType):
            _, storage_type, key, _location, numel, view = pid
            if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"malformed storage record {pid!r:.200}")
            if key not in self.storages:
                nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
                if nbytes > self.budget:
                    raise pickle.UnpicklingError("storage records claim more bytes than the file holds")
                self.budget -= nbytes
                self.storages[key] = torch.zeros(numel, dtype=storage_type.dtype)
            flat = self.storages[key]
            if view is None:
                return flat
            _view_key, offset, size = view
            return flat[int(offset): int(offset) + int(size)]
        raise pickle.UnpicklingError(f"refusing the persistent record {pid!r:.200}")


class _NoGlobals(pickle.Unpickler):
    """For the plain values around the main pickle (magic number, protocol, system info, storage keys)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle global '{module}.{name}'")


def _read_legacy_file(path: str) -> Any:
    """Read a legacy-format torch file (magic number, protocol, system info, the pickle, the storage keys,
    then each storage's raw bytes) with :class:`_RestrictedUnpickler`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if _NoGlobals(f).load() != _LEGACY_MAGIC or _NoGlobals(f).load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path} is not a torch file (bad magic number or protocol)")
        sys_info = _NoGlobals(f).load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise ValueError(f"{path}: only little-endian torch files are supported")
        unpickler = _RestrictedUnpickler(f, max_bytes=size)
        obj = unpickler.load()
        keys = _NoGlobals(f).load()
        if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages):
            raise ValueError(f"{path} is corrupt: its storage list does not match its tensors")
        for key in keys:
            flat = unpickler.storages[key]
            numel = int.from_bytes(f.read(8), "little")
            data = f.read(numel * flat.element_size())
            if numel != flat.numel() or len(data) != numel * flat.element_size():
                raise ValueError(f"{path} is truncated or corrupt (storage {key!r})")
            if numel:
                flat.copy_(torch.frombuffer(bytearray(data), dtype=flat.dtype))
    return obj


def _read_dalle_file(path: str) -> Any:
    """The objects of ``path`` (zip format: the safe reader; legacy format: :func:`_read_legacy_file`)."""
    try:
        if is_zip_format(path):
            return load_checkpoint(path, "cpu", allow=_DALLE_ALLOWED)
        return _read_legacy_file(path)
    except UnsafeCheckpointError as e:
        detail = str(e).split("refuses (", 1)[-1].split("): unpickling", 1)[0]
        raise pickle.UnpicklingError(
            f"refusing to load {path}: it holds objects that are not part of a pickled DALL-E encoder ({detail}); "
            "only the dall_e encoder classes, the torch.nn modules it uses, tensors and plain containers are "
            "allowed") from None
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise pickle.UnpicklingError(f"refusing to load {path}: {e}") from None
        raise ValueError(f"{path} cannot be loaded (not a torch file, or corrupt: {e})") from None
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    except (EOFError, OverflowError, TypeError, AttributeError, IndexError, KeyError, RuntimeError,
            RecursionError) as e:
        raise ValueError(f"{path} cannot be loaded (not a torch file, or corrupt: {type(e).__name__}: {e})") from None


#: Deepest module nesting read from a file (the released encoder: 5 levels).
_MAX_MODULE_DEPTH = 16


def _module_tensors(module: nn.Module, prefix: str = "", _seen: tuple[int, ...] = ()) -> "OrderedDict[str, Tensor]":
    """The parameters and buffers of an unpickled module tree, read off its ``_parameters`` /
    ``_buffers`` / ``_modules`` dicts (no method of the unpickled objects is called: no hooks run). A
    module that contains itself (a reference cycle) or a tree deeper than ``_MAX_MODULE_DEPTH`` is refused."""
    if id(module) in _seen:
        raise ValueError(f"malformed pickled module: {prefix.rstrip('.') or 'the root'} contains itself (a reference "
                         "cycle)")
    if len(_seen) >= _MAX_MODULE_DEPTH:
        raise ValueError(f"malformed pickled module: nested deeper than {_MAX_MODULE_DEPTH} levels")
    _seen = (*_seen, id(module))
    out: OrderedDict[str, Tensor] = OrderedDict()
    state = vars(module)
    for attr in ("_parameters", "_buffers"):
        entries = state.get(attr) or {}
        if not isinstance(entries, Mapping):
            raise ValueError(f"malformed pickled module ({attr} is a {type(entries).__name__})")
        for name, t in entries.items():
            if isinstance(t, Tensor):
                out[prefix + str(name)] = t.detach()
    children = state.get("_modules") or {}
    if not isinstance(children, Mapping):
        raise ValueError(f"malformed pickled module (_modules is a {type(children).__name__})")
    for name, child in children.items():
        if isinstance(child, nn.Module):
            out.update(_module_tensors(child, f"{prefix}{name}.", _seen))
    return out


def _unwrap_state_dict(obj: Any, path: str) -> "OrderedDict[str, Tensor]":
    if isinstance(obj, _PickledEncoder):
        return _module_tensors(obj)
    if isinstance(obj, _PickledDalleModule):
        raise ValueError(f"{path} holds a pickled {obj._dall_e_name}, not the DALL-E encoder (dall_e.encoder.Encoder)")
    if isinstance(obj, nn.Module):
        obj = _module_tensors(obj)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "encoder"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping) and "blocks.input.w" not in obj:
                obj = obj[wrapper]
                break
        if obj and all(isinstance(k, str) for k in obj):
            for prefix in ("module.", "encoder."):
                if all(k.startswith(prefix) for k in obj):
                    obj = {k[len(prefix):]: v for k, v in obj.items()}
        tensors = OrderedDict((k, v) for k, v in obj.items() if isinstance(v, Tensor))
        if len(tensors) != len(obj):
            bad = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
            raise ValueError(f"{path}: not a DALL-E encoder state dict (non-tensor entries {bad})")
        return tensors
    raise ValueError(f"{path}: expected a pickled dall_e Encoder or a state dict, found {type(obj).__name__}")


def dalle_state_dict_from_file(path: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """Read a DALL-E encoder state dict (on CPU) from the released ``encoder.pkl`` or a plain state dict
    file of the same layout. Raises ``FileNotFoundError`` (naming the path) if there is no such file, and
    ``ValueError`` for tensors that claim more than the file holds (stride-0 or overlapping views, more bytes
    than the file: :func:`beit_fast.utils.limits.check_tensors_hold_their_bytes`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DALL-E encoder weights not found: {path!r} (expected OpenAI's encoder.pkl "
                                "or a state dict file with the same keys)")
    sd = _unwrap_state_dict(_read_dalle_file(path), path)
    check_tensors_hold_their_bytes(sd, path, file_bytes=os.path.getsize(path))
    return sd
