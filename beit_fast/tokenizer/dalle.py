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

Loading the released ``encoder.pkl`` (without the ``dall_e`` package, never with Python's normal unpickler)
is :mod:`beit_fast.tokenizer.dalle_file`; :func:`load_dalle_encoder` and :func:`dalle_state_dict_from_file`
are importable from here.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.limits import DALLE_LIMITS, check_config_limits, check_parameter_budget
from .base import VisualTokenizer
from .dalle_file import dalle_state_dict_from_file

__all__ = ["DalleEncoder", "DalleTokenizer", "load_dalle_encoder", "dalle_state_dict_from_file"]


class _Conv2d(nn.Module):
    """``dall_e.utils.Conv2d`` without attrs: parameters ``w``/``b``, 'same' padding; fp32 (the encoder's
    input is fp32), or autocast's precision (weights kept there by ``keep_weights_in``)."""

    autocast_lower_precision = True  # a convolution: autocast casts its weights

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
        # No .float() here: autocast casts to its precision anyway (a round trip of a fp16/bf16 value through
        # fp32 is exact), and weights kept in that precision would be copied twice a call.
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

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
        config = dict(group_count=group_count, n_hid=int(w_in.shape[0]), n_blk_per_group=n_blk,
                      input_channels=int(w_in.shape[1]), vocab_size=int(w_out.shape[0]))
        check_config_limits(config, DALLE_LIMITS, "DALL-E encoder state dict")
        return config

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], input_size: int = 112) -> "DalleEncoder":
        """Build an encoder of the right size for ``sd`` and load it strictly (weights cast to fp32). The
        encoder is first built on the meta device (no memory): one much larger than ``sd``
        (:func:`beit_fast.utils.limits.check_parameter_budget`) is refused before it is allocated."""
        config = cls.config_from_state_dict(sd)
        with torch.device("meta"):
            claimed = sum(p.numel() for p in cls(**config, input_size=input_size).parameters())
        check_parameter_budget(claimed, sd.values(), "DALL-E encoder state dict")
        model = cls(**config, input_size=input_size)
        sd32 = OrderedDict((k, v.detach().to(torch.float32)) for k, v in sd.items())
        try:
            missing, unexpected = model.load_state_dict(sd32, strict=False)
        except RuntimeError as e:  # shapes that differ
            raise ValueError(f"state dict does not match the DALL-E encoder layout: {str(e).strip()[:500]}") from None
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


def load_dalle_encoder(path: str | os.PathLike, device: str | torch.device | None = None,
                       input_size: int = 112) -> DalleEncoder:
    """Load the DALL-E encoder from ``encoder.pkl`` or a state dict file; fp32, eval mode, frozen."""
    model = DalleEncoder.from_state_dict(dalle_state_dict_from_file(path), input_size=input_size)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)
