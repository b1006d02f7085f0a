"""``nn.Module`` wrappers around the fused ops of :mod:`beit_fast.ops`.

* :class:`FusedLinearCrossEntropyLoss` - head GEMM + softmax cross-entropy in one op, for masked rows only
  (``masked_linear_cross_entropy``); no ``[rows, vocab]`` logits are kept for the backward.
* :class:`PatchEmbedMask` - BEiT's patch embedding (``Conv2d(C, D, P, stride=P)``) with the mask-token
  substitution fused in (``patch_embed_mask``); its parameters are ``proj.weight`` / ``proj.bias``, the
  state-dict names of BEiT's, timm's and our ``PatchEmbed``.
* :class:`RelPosBiasAttention` - multi-head self-attention with q/v biases (no k bias) and a relative
  position bias, computed by ``attention_with_bias``; parameter names of the official fine-tuning
  ``Attention`` (and timm's ``beit.Attention``). It is the model's ``Attention`` (one implementation)
  with timm's non-persistent index buffer and backend "auto" by default.

Unlike the functional ops (which compute in the dtype of the tensors they are given and ignore
autocast), these modules follow ``torch.autocast``: inside an autocast region the floating inputs and
parameters are cast to the autocast dtype first (casts are differentiable, so fp32 master weights get
their gradients), which is what the equivalent ``nn.Linear`` / ``nn.Conv2d`` would compute under autocast.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .beit import Attention
from ..ops.backend import VALID_BACKENDS
from ..ops.cross_entropy import masked_linear_cross_entropy
from ..ops.patch_embed import patch_embed_mask

__all__ = ["FusedLinearCrossEntropyLoss", "PatchEmbedMask", "RelPosBiasAttention"]

_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``t``'s device type (and ``t`` is floating), else t's."""
    dev = t.device.type
    if t.is_floating_point() and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _check_ops_backend(backend) -> None:
    if backend is not None and backend not in VALID_BACKENDS:
        raise ValueError(
            f"unknown beit_fast backend {backend!r}; valid: None (global setting) or one of {VALID_BACKENDS}"
        )


class FusedLinearCrossEntropyLoss(nn.Module):
    """``cross_entropy(hidden @ head_weight.T + head_bias, labels)`` without materialising the logits.

    ``forward(hidden [M, D] or [B, N, D], head_weight [V, D], head_bias [V] or None, labels (int64,
    hidden.shape[:-1]))`` returns the fp32 loss, or ``(loss, accuracy)`` when ``return_accuracy=True``
    (accuracy: fraction of counted rows whose argmax equals the label, 0-dim fp32, no gradient).
    Rows whose label is ``ignore_index`` do not count. ``reduction``: "mean" (over counted rows; 0.0
    with zero gradients when no row counts, where ``F.cross_entropy`` gives NaN), "sum" or "none".
    ``backend``: "auto" | "reference" | "triton" | None (the global ``beit_fast.ops`` setting).

    The argument order is (hidden, weight, bias, labels). Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss.forward`` takes ``(lin_weight, _input, target, bias)``: same
    tensors, different order.

    Dtype: the computation runs in the autocast dtype inside an autocast region, otherwise in
    ``hidden.dtype``; weight and bias are cast to it (a differentiable cast). Not supported: class
    weights, label smoothing, double backward.
    """

    def __init__(
        self, ignore_index: int = -100, reduction: str = "mean", backend: str | None = None,
        return_accuracy: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        _check_ops_backend(backend)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.return_accuracy = bool(return_accuracy)

    def forward(
        self, hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None, labels: torch.Tensor
    ):
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        dtype = _compute_dtype(hidden)
        return masked_linear_cross_entropy(
            hidden.to(dtype), head_weight.to(dtype), head_bias.to(dtype) if head_bias is not None else None,
            labels, ignore_index=self.ignore_index, reduction=self.reduction,
            return_accuracy=self.return_accuracy, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"return_accuracy={self.return_accuracy}")


class PatchEmbedMask(nn.Module):
    """Patch embedding with BEiT's mask-token substitution fused in.

    ``forward(x [B, C, H, W], bool_masked_pos=None, mask_token=None) -> [B, N, D]``, N = (H/P)(W/P) in
    row-major patch order. With ``bool_masked_pos`` ([B, N] or [B, H/P, W/P], bool; True = masked) the
    rows of masked patches are replaced by ``mask_token`` ([D] or [1, 1, D]; the model owns it, as in
    BEiT), i.e. ``x * (1 - w) + mask_token * w``; without it this is ``proj(x).flatten(2).transpose(1, 2)``.

    ``img_size=None`` accepts any H, W that are multiples of P (a ``ValueError`` otherwise: Conv2d would
    silently drop the remainder); with an ``img_size`` the input must have exactly that size, like
    BEiT's ``PatchEmbed``. ``backend``: as for ``patch_embed_mask`` ("auto", "reference", "triton" or
    None for the global setting). Under autocast the op runs in the autocast dtype.
    """

    def __init__(
        self, img_size: int | tuple[int, int] | None = 224, patch_size: int = 16, in_chans: int = 3,
        embed_dim: int = 768, bias: bool = True, backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_ops_backend(backend)
        if img_size is not None:
            img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            if img_size[0] % patch_size or img_size[1] % patch_size:
                raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
            self.patch_shape = (img_size[0] // patch_size, img_size[1] // patch_size)
            self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        else:
            self.patch_shape = None
            self.num_patches = None
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.backend = backend
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, img_size: int | tuple[int, int] | None = None, backend: str | None = None
    ) -> "PatchEmbedMask":
        """A PatchEmbedMask that *shares* ``conv``'s parameters (e.g. ``model.patch_embed.proj``)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        k, s = conv.kernel_size, conv.stride
        if k[0] != k[1] or tuple(s) != tuple(k) or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) \
                or conv.groups != 1:
            raise ValueError(
                "conv must be a patch projection: square kernel, stride == kernel, no padding, dilation 1, "
                f"groups 1; got kernel {k}, stride {s}, padding {conv.padding}, dilation {conv.dilation}, "
                f"groups {conv.groups}"
            )
        with torch.device("meta"):
            module = cls(img_size, k[0], conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                         backend=backend)
        module.proj = conv
        return module

    def forward(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.img_size is not None and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the module's "
                             f"{self.img_size[0]}x{self.img_size[1]}")
        if bool_masked_pos is not None and mask_token is None:
            raise ValueError("bool_masked_pos was given without a mask_token")
        dtype = _compute_dtype(x)
        w, b = self.proj.weight, self.proj.bias
        if mask_token is None:
            mask_token = w.new_zeros(w.shape[0])  # unused without a mask (and gets no gradient)
        return patch_embed_mask(
            x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None, mask_token.reshape(-1).to(dtype),
            bool_masked_pos, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, backend={self.backend!r}"


class RelPosBiasAttention(Attention):
    """BEiT self-attention through ``attention_with_bias``: :class:`beit_fast.model.beit.Attention` with timm's
    buffer layout and "auto" as the default backend.

    Parameters and their names are those of the official fine-tuning ``Attention`` and of timm's
    ``beit.Attention``: ``qkv.weight`` (no bias), ``q_bias``, ``v_bias`` (the k bias is zero),
    ``proj.weight`` / ``proj.bias`` and, with a ``window_size``, a per-module
    ``relative_position_bias_table [(2Wh-1)(2Ww-1)+3, heads]``. Its ``relative_position_index`` is a
    non-persistent buffer (as in timm): timm state dicts load with ``strict=True``; official fine-tuned
    ones after dropping their ``relative_position_index`` entries (``beit_fast.interop.official_to_timm``).

    ``forward(x [B, N, D], rel_pos_bias=None)``: ``rel_pos_bias`` is an extra additive bias broadcastable
    to ``[B, heads, N, N]`` (BEiT's shared ``RelativePositionBias()`` output, ``[heads, N, N]``), added to
    the module's own table bias. ``backend``: an ``attention_with_bias`` backend ("auto", "math",
    "sdpa", "flex", "xformers", "triton"). No attention dropout.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, window_size: tuple[int, int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, window_size, persistent_index=False, backend=backend)

    @property
    def backend(self) -> str:
        """The attention backend (the same setting as ``attn_backend``)."""
        return self.attn_backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.attn_backend = name
