"""OpenAI's DALL-E dVAE encoder, the tokenizer of the BEiT paper (BEIT_SPEC.md section 3).

:class:`DalleEncoder` re-creates the architecture of ``dall_e.encoder.Encoder`` (github.com/openai/DALL-E,
``dall_e/encoder.py`` and ``dall_e/utils.py``) with the *same module and parameter names*, so its
``state_dict()`` has exactly the keys of the released model (``blocks.input.w``,
``blocks.group_1.block_1.res_path.conv_1.b``, ..., ``blocks.output.conv.w``) and
``load_state_dict(strict=True)`` works on a state dict of that layout.

Facts taken from the original source:

* ``Conv2d`` stores ``w`` ``[n_out, n_in, kw, kw]`` and ``b`` ``[n_out]``, created float32 (init
  ``w ~ N(0, 1 / sqrt(n_in * kw**2))``, ``b = 0``), padding ``(kw - 1) // 2``.
* Half precision in the original is only a *forward-time* cast: ``Conv2d(use_float16=True)`` casts input
  and weights to fp16 when its weights live on CUDA; the output conv has ``use_float16=False``. The
  ``Encoder.use_mixed_precision`` attribute is stored but not used by the encoder's forward. The
  stored parameters are fp32. **We always compute in fp32** on every device, so tokens computed on CUDA
  can differ from the original's fp16 path at near-ties of the argmax (that is the only deviation).
* ``EncoderBlock``: ``id_path`` (1x1 conv if ``n_in != n_out`` else ``nn.Identity``) ``+ post_gain *
  res_path``, ``post_gain = 1 / n_layers**2``, ``n_layers = group_count * n_blk_per_group = 8``;
  ``res_path`` = ReLU, 3x3 conv to ``n_out // 4``, ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 to ``n_out``.
* ``Encoder``: 7x7 input conv 3 -> n_hid; groups at 1x/2x/4x/8x n_hid with 2 blocks each, MaxPool(2)
  after groups 1-3; output ReLU + 1x1 conv to ``vocab_size``. Tokens are the argmax of those logits.

Loading the released ``encoder.pkl`` (a whole ``dall_e.encoder.Encoder`` object saved with
``torch.save``) does not need the ``dall_e`` package (nor ``attrs``): :func:`load_dalle_encoder` uses a
*restricted* unpickler that maps ``dall_e.encoder.Encoder``, ``dall_e.encoder.EncoderBlock`` and
``dall_e.utils.Conv2d`` to stand-in classes defined here, allows only the torch / collections globals a
pickled module needs, and refuses everything else. Because the file is a pickled *object*, ``torch.load``
has to run with ``weights_only=False`` for it (explicitly, only for this legacy file): the allow-list
above is what keeps that from executing arbitrary globals. A plain state dict (``.pt``/``.pth``) of the
same layout is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import importlib
import os
import pickle
import types
import warnings
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import VisualTokenizer

__all__ = ["DalleEncoder", "DalleTokenizer", "load_dalle_encoder", "dalle_state_dict_from_file"]


class _Conv2d(nn.Module):
    """``dall_e.utils.Conv2d`` without attrs: parameters ``w``/``b``, 'same' padding, always fp32."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"kernel width must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32)
        w.normal_(std=1 / (n_in * kw**2) ** 0.5)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros((n_out,), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}"


class _EncoderBlock(nn.Module):
    """``dall_e.encoder.EncoderBlock``: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = _Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", _Conv2d(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()),
            ("conv_2", _Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()),
            ("conv_3", _Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", _Conv2d(self.n_hid, n_out, 1)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(VisualTokenizer):
    """The DALL-E dVAE encoder (defaults = the released model: 8192 tokens, n_hid 256, 4 groups x 2 blocks).

    ``forward(x)`` returns fp32 logits ``[B, vocab_size, h/8, w/8]`` (like the original, minus its fp16
    CUDA path); :meth:`get_codebook_indices` returns their argmax as ``[B, (h/8)*(w/8)]``.
    ``input_size`` (112 in BEiT) is only metadata for the rest of the project: any multiple of 8 works.
    A freshly built encoder is randomly initialised as in the original; load weights with
    :func:`load_dalle_encoder` or :func:`beit_fast.tokenizer.build_tokenizer`.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        input_size: int = 112,
    ):
        super().__init__()
        if group_count < 1 or n_blk_per_group < 1 or n_hid < 1 or vocab_size < 1:
            raise ValueError("group_count, n_hid, n_blk_per_group and vocab_size must be >= 1")
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.downsample = 2 ** (group_count - 1)

        n_layers = group_count * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", _Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g in range(group_count):
            n_out = (2**g) * n_hid
            layers: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                layers.append((f"block_{i + 1}", _EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers)))
            if g < group_count - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            n_in = n_out
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", _Conv2d(n_in, vocab_size, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    # --- construction from a state dict ---------------------------------------------------------------
    @staticmethod
    def config_from_state_dict(sd: Mapping[str, Tensor]) -> dict[str, int]:
        """Infer ``group_count, n_hid, n_blk_per_group, input_channels, vocab_size`` from a state dict of
        the ``dall_e`` layout; raises ``ValueError`` if it is not one."""
        for k in ("blocks.input.w", "blocks.output.conv.w"):
            if k not in sd:
                sample = ", ".join(list(sd.keys())[:5])
                raise ValueError(
                    f"not a DALL-E encoder state dict: key {k!r} is missing (first keys: {sample or 'none'})"
                )
        w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
        group_count = len({k.split(".")[1] for k in sd if k.startswith("blocks.group_")})
        n_blk = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
        if group_count < 1 or n_blk < 1 or w_in.dim() != 4 or w_out.dim() != 4:
            raise ValueError("not a DALL-E encoder state dict: no blocks.group_*.block_* parameters")
        return dict(group_count=group_count, n_hid=int(w_in.shape[0]), n_blk_per_group=n_blk,
                    input_channels=int(w_in.shape[1]), vocab_size=int(w_out.shape[0]))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], input_size: int = 112) -> "DalleEncoder":
        """Build an encoder of the right size for ``sd`` and load it strictly (weights cast to fp32)."""
        model = cls(**cls.config_from_state_dict(sd), input_size=input_size)
        sd32 = OrderedDict((k, v.detach().to(torch.float32)) for k, v in sd.items())
        missing, unexpected = model.load_state_dict(sd32, strict=False)
        if missing or unexpected:
            raise ValueError(
                "state dict does not match the DALL-E encoder layout: "
                f"missing {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}"
            )
        return model

    # --- compute --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"input shape {tuple(x.shape)} is not 4d")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"input has {x.shape[1]} channels but model built for {self.input_channels}")
        return self.blocks(x.float())

    def encode_logits(self, images: Tensor) -> Tensor:
        return self.forward(images)


#: Alias: the DALL-E encoder *is* the tokenizer (keeps the released state dict keys unprefixed).
DalleTokenizer = DalleEncoder


# ==========================================================================================================
# Loading the released encoder.pkl without the dall_e package
# ==========================================================================================================
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


_DALLE_STANDINS: dict[tuple[str, str], type] = {
    ("dall_e.encoder", "Encoder"): _PickledEncoder,
    ("dall_e.encoder", "EncoderBlock"): _PickledEncoderBlock,
    ("dall_e.utils", "Conv2d"): _PickledConv2d,
}
_other_standins: dict[tuple[str, str], type] = {}


def _standin_for(module: str, name: str) -> type:
    """Stand-in for any ``dall_e.*`` class. Classes other than the encoder's (e.g. the Decoder) get an
    inert stand-in so that the layout check can say what the file actually holds."""
    key = (module, name)
    if key in _DALLE_STANDINS:
        return _DALLE_STANDINS[key]
    if key not in _other_standins:
        _other_standins[key] = type(f"_Pickled_{name}", (_PickledDalleModule,), {"_dall_e_name": f"{module}.{name}"})
    return _other_standins[key]


_TORCH_TOP_ALLOWED = {
    "device", "Size", "Tensor", "dtype", "layout", "memory_format",
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
    "strided", "contiguous_format", "channels_last", "preserve_format",
}
_BUILTINS_ALLOWED = {"set", "frozenset", "dict", "list", "tuple", "object", "slice", "complex", "bytearray"}


class _RestrictedDalleUnpickler(pickle.Unpickler):
    """Unpickler for the legacy ``encoder.pkl``: ``dall_e.*`` -> stand-ins; only the globals that a
    ``torch.save``'d module needs (torch tensor/parameter rebuilders, torch.nn module classes,
    ``collections.OrderedDict``, ``torch.device`` ...) are allowed, anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _standin_for(module, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS_ALLOWED:
            return super().find_class("builtins", name)
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return super().find_class(module, name)
        if module == "copyreg" and name == "_reconstructor":
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild"):
            return super().find_class(module, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return super().find_class(module, name)
        if module == "torch.nn.parameter" and name in ("Parameter", "UninitializedParameter", "Buffer"):
            return super().find_class(module, name)
        if module == "torch.storage" and name in ("_load_from_bytes", "UntypedStorage", "TypedStorage"):
            return super().find_class(module, name)
        if module == "torch" and (name in _TORCH_TOP_ALLOWED or name.endswith("Storage")):
            return super().find_class(module, name)
        if module.startswith("torch.nn.modules."):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        raise pickle.UnpicklingError(
            f"refusing to unpickle global '{module}.{name}': it is not part of a pickled DALL-E encoder "
            "(only dall_e.*, torch.nn modules, torch tensor rebuilders and basic containers are allowed)"
        )


def _restricted_load(file, **kwargs):
    return _RestrictedDalleUnpickler(file, **kwargs).load()


#: A ``pickle_module`` for ``torch.load`` (it needs ``Unpickler`` and ``load``).
_dalle_pickle_module = types.ModuleType("beit_fast_dalle_pickle")
_dalle_pickle_module.Unpickler = _RestrictedDalleUnpickler  # type: ignore[attr-defined]
_dalle_pickle_module.load = _restricted_load  # type: ignore[attr-defined]
_dalle_pickle_module.__version__ = "1"  # type: ignore[attr-defined]


def _unwrap_state_dict(obj: Any, path: str) -> "OrderedDict[str, Tensor]":
    if isinstance(obj, _PickledEncoder):
        return obj.state_dict()
    if isinstance(obj, _PickledDalleModule):
        raise ValueError(f"{path} holds a pickled {obj._dall_e_name}, not the DALL-E encoder (dall_e.encoder.Encoder)")
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
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
    file of the same layout. Raises ``FileNotFoundError`` (naming the path) if there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DALL-E encoder weights not found: {path!r} (expected OpenAI's encoder.pkl "
                                "or a state dict file with the same keys)")
    try:  # a plain state dict: the safe loader suffices
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A whole pickled dall_e.encoder.Encoder (the released encoder.pkl). weights_only=False is needed
        # for this explicitly requested legacy format; the restricted unpickler allow-lists its globals.
        with warnings.catch_warnings():  # legacy-format files compare class sources: ours differ by design
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_dalle_pickle_module)
    return _unwrap_state_dict(obj, path)


def load_dalle_encoder(path: str | os.PathLike, device: str | torch.device | None = None,
                       input_size: int = 112) -> DalleEncoder:
    """Load the DALL-E encoder from ``encoder.pkl`` or a state dict file; fp32, eval mode, frozen."""
    model = DalleEncoder.from_state_dict(dalle_state_dict_from_file(path), input_size=input_size)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)
