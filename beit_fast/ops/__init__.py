"""Fused ops of beit_fast, each with a Triton kernel and a plain PyTorch reference behind one dispatch
layer (see ``beit_fast.ops.backend`` and KERNELS.md)."""
from .attention import (
    attention_reference,
    attention_with_bias,
    attention_with_rel_pos_bias,
    available_attention_backends,
)
from .backend import VALID_BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .cross_entropy import masked_linear_cross_entropy, masked_linear_cross_entropy_reference
from .patch_embed import patch_embed_mask, patch_embed_mask_reference

__all__ = [
    "VALID_BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "resolve_backend",
    "patch_embed_mask",
    "patch_embed_mask_reference",
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_reference",
    "attention_with_bias",
    "attention_with_rel_pos_bias",
    "attention_reference",
    "available_attention_backends",
]
