"""Patch timm's ``Beit`` (``timm.models.beit.Beit``, the ``beit_*`` / ``beitv2_*`` models) with beit_fast's
fused attention, on one instance.

What is replaced: ``blocks[i].attn.forward`` (timm's ``beit.Attention``) -> the qkv projection exactly as
timm computes it (``F.linear`` with ``cat(q_bias, k_bias, v_bias)``, or timm's ``qkv_bias_separate``
form), then ``beit_fast.ops.attention_with_bias(q, k, v, bias, scale=attn.scale)`` where ``bias`` is the
block's own relative position bias table gathered by timm's ``_get_rel_pos_bias()`` plus the shared bias
the model passes in. timm itself hands the bias to ``F.scaled_dot_product_attention`` as ``attn_mask``
when its ``fused_attn`` flag is on (timm's default), and runs its eager math otherwise. The patch stands in
for timm's fused path only, so timm's flag keeps its meaning: with ``attn.fused_attn = False`` (e.g. set
by ``timm.layers.set_fused_attn(False)`` before building the model, or per block) timm's own eager
attention runs, and with it everything that reads attention maps from it (``timm.utils.AttentionExtract``
hooks ``attn_drop`` or traces ``attn.softmax``, which exist only on that path). timm's forward also runs in
training with ``attn_drop_rate > 0`` (the fused op has no dropout). The replacement keeps timm's
signature (``inspect.signature(attn.forward)``).

``activation_checkpointing=True`` calls timm's own ``model.set_grad_checkpointing(True)`` (every block
recomputed in the backward); ``revert_beit_fast`` restores the previous setting.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import _VALID_NAMES as _ATTENTION_NAMES
from ..ops.attention import attention_with_bias
from .patching import _begin_patch

__all__ = ["apply_beit_fast_to_timm", "SUPPORTED_TIMM_MODELS"]

SUPPORTED_TIMM_MODELS = ("timm.models.beit.Beit",)


def _timm_beit_class() -> type | None:
    try:
        from timm.models.beit import Beit
    except Exception:
        return None
    return Beit


def _attention_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm beit.Attention.forward through attention_with_bias (timm's fused path; see the module docstring)."""
    if not self.fused_attn or (self.training and self.attn_drop.p > 0):
        return type(self).forward(self, x, shared_rel_pos_bias=shared_rel_pos_bias)
    B, N, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if self.relative_position_bias_table is not None:
        bias = self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = bias + shared_rel_pos_bias
    elif shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias
    out = attention_with_bias(q, k, v, bias, scale=self.scale, backend=self._beit_fast_attention)
    out = out.transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(out))


def apply_beit_fast_to_timm(
    model: nn.Module, attention: str | None = "auto", activation_checkpointing: bool = False
) -> nn.Module:
    """Patch a ``timm.models.beit.Beit`` instance in place; returns the same model.

    Args:
        attention: an ``attention_with_bias`` backend ("auto", "math", "sdpa", ...) for every block's fused
            attention path (blocks whose ``fused_attn`` flag is off run timm's eager attention), or None
            to keep timm's. Default "auto".
        activation_checkpointing: True turns timm's gradient checkpointing on (``set_grad_checkpointing``);
            False leaves the model's current setting as it is.

    Raises TypeError (naming the type) for anything but timm's ``Beit``; ValueError for an unknown backend.
    Undo with ``revert_beit_fast(model)``.
    """
    beit_cls = _timm_beit_class()
    if beit_cls is None or not isinstance(model, beit_cls):
        cls = type(model)
        raise TypeError(
            f"apply_beit_fast_to_timm does not support {cls.__module__}.{cls.__qualname__}; supported: "
            f"{', '.join(SUPPORTED_TIMM_MODELS)} (timm's beit_* / beitv2_* models; for transformers' BEiT use "
            "apply_beit_fast_to_hf)"
        )
    if attention is False:
        attention = None
    if attention is not None and attention not in _ATTENTION_NAMES:
        raise ValueError(
            f"attention must be None (keep timm's attention) or one of {_ATTENTION_NAMES}, got {attention!r}"
        )
    if not isinstance(activation_checkpointing, bool):
        raise TypeError(f"activation_checkpointing must be a bool, got {activation_checkpointing!r}")

    state = _begin_patch(model, "timm", {"attention": attention, "activation_checkpointing": activation_checkpointing})
    if attention is not None:
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            state.set(attn, "_beit_fast_attention", attention)
            state.set_method(attn, _attention_forward, "beit.Attention.forward -> attention_with_bias",
                             f"blocks.{i}.attn")
    if activation_checkpointing:
        # grad_checkpointing is a plain instance attribute of Beit: record it, then let timm set it
        state.set(model, "grad_checkpointing", model.grad_checkpointing)
        model.set_grad_checkpointing(True)
        state.replaced.setdefault("grad checkpointing (timm set_grad_checkpointing)", []).append("blocks")
    return model
