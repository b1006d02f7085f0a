"""Fused BEiT patch embedding + mask-token substitution.

``patch_embed_mask(pixels, weight, bias, mask_token, bool_masked_pos)`` returns exactly what
``patch_embed_mask_reference`` returns:

    x = conv2d(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2)      # [B, N, D]
    w = bool_masked_pos.unsqueeze(-1).type_as(x)
    x = x * (1 - w) + mask_token * w

(BEiT's ``PatchEmbed`` followed by the mask substitution of ``VisionTransformerForMaskedImageModeling``).
With the Triton backend this is one kernel that reads the pixels patch by patch (no im2col copy), runs the
GEMM with fp32 accumulation, adds the bias and writes the mask token at masked positions; masked patches
are never read and tiles made only of masked patches skip the GEMM. The backward gives gradients for
weight, bias, mask_token and, when they require grad, the pixels.

Dtypes: fp32, fp16, bf16; every floating-point input must have the dtype of ``pixels`` and the output has
that dtype too, except ``mask_token``, which may also stay float32 under fp16/bf16 pixels: it is then
rounded to the output dtype where written, and its gradient (an fp32 sum over every masked position of
the batch) is returned in float32, as the eager model's fp32 mask-token blend gives it. Autocast does not apply inside this op: under ``torch.autocast`` pass already-cast
tensors (e.g. ``weight.to(pixels.dtype)``; the cast is differentiable, gradients reach fp32 master
weights). Both backends behave this way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._util import (
    autocast_off,
    check_float_dtype,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .backend import resolve_backend, triton_available

__all__ = ["patch_embed_mask", "patch_embed_mask_reference"]


def patch_embed_mask_reference(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask_token: Tensor,
    bool_masked_pos: Tensor | None,
) -> Tensor:
    """Plain PyTorch definition (the official BEiT code path). Returns [B, N, D]."""
    P = weight.shape[-1]
    x = F.conv2d(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2)
    if bool_masked_pos is None:
        return x
    w = bool_masked_pos.unsqueeze(-1).type_as(x)
    return (x * (1 - w) + mask_token * w).to(x.dtype)


def _check_inputs(pixels, weight, bias, mask_token, bool_masked_pos):
    """Validate shapes/dtypes/devices (metadata only: no data access, no host sync).

    Returns (mask_token as [D], bool_masked_pos as [B, N] or None)."""
    check_tensor("pixels", pixels)
    check_tensor("weight", weight)
    check_tensor("bias", bias, allow_none=True)
    check_tensor("mask_token", mask_token)
    check_tensor("bool_masked_pos", bool_masked_pos, allow_none=True)
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be [B, C, H, W], got shape {tuple(pixels.shape)}")
    check_float_dtype("pixels", pixels)
    check_same_dtype("pixels", pixels, weight=weight, bias=bias)
    if mask_token.dtype not in (pixels.dtype, torch.float32):
        raise TypeError(f"mask_token must have the dtype of pixels ({pixels.dtype}) or float32, "
                        f"got {mask_token.dtype}")
    check_same_device(pixels=pixels, weight=weight, bias=bias, mask_token=mask_token,
                      bool_masked_pos=bool_masked_pos)
    B, C, H, W = pixels.shape
    if weight.dim() != 4 or weight.shape[1] != C or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must be [D, C, P, P] with C = {C} (pixels {tuple(pixels.shape)}), got shape {tuple(weight.shape)}"
        )
    D, _, P, _ = weight.shape
    if P < 1 or D < 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} has an empty dimension")
    if H % P != 0 or W % P != 0:
        raise ValueError(
            f"image size {H}x{W} (pixels {tuple(pixels.shape)}) is not a multiple of the patch size {P}"
        )
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    if mask_token.numel() != D or any(s != 1 for s in mask_token.shape[:-1]) or mask_token.dim() == 0:
        raise ValueError(f"mask_token must have shape ({D},) (or (1, 1, {D})), got {tuple(mask_token.shape)}")
    mask_token = mask_token.reshape(D)
    N = (H // P) * (W // P)
    if bool_masked_pos is not None:
        if bool_masked_pos.dtype != torch.bool:
            raise TypeError(f"bool_masked_pos must be a bool tensor, got dtype {bool_masked_pos.dtype}")
        shp = tuple(bool_masked_pos.shape)
        if shp == (B, H // P, W // P):
            bool_masked_pos = bool_masked_pos.reshape(B, N)
        elif shp != (B, N):
            raise ValueError(
                f"bool_masked_pos must have shape ({B}, {N}) (or ({B}, {H // P}, {W // P})), got {shp}"
            )
    return mask_token, bool_masked_pos


# --------------------------------------------------------------------------------------------------
# torch.library registration (the Triton path): opaque to torch.compile, with fake + autograd rules
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("beit_fast::patch_embed_mask", mutates_args=())
def _patch_embed_mask_op(
    pixels: Tensor, weight: Tensor, bias: Optional[Tensor], mask_token: Tensor, mask: Optional[Tensor]
) -> Tensor:
    from beit_fast.kernels.patch_embed import patch_embed_mask_forward

    with autocast_off(pixels.device):
        return patch_embed_mask_forward(pixels, weight, bias, mask_token, mask)


@_patch_embed_mask_op.register_fake
def _(pixels, weight, bias, mask_token, mask):
    B, C, H, W = pixels.shape
    D, _, P, _ = weight.shape
    return pixels.new_empty((B, (H // P) * (W // P), D))


@torch.library.custom_op("beit_fast::patch_embed_mask_backward", mutates_args=())
def _patch_embed_mask_backward_op(
    grad: Tensor,
    pixels: Tensor,
    weight: Tensor,
    mask: Optional[Tensor],
    need_pixels: bool,
    need_weight: bool,
    need_bias: bool,
    need_token: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from beit_fast.kernels.patch_embed import patch_embed_mask_backward

    with autocast_off(pixels.device):
        outs = patch_embed_mask_backward(grad.to(pixels.dtype).contiguous(), pixels, weight, mask,
                                         need_pixels, need_weight, need_bias, need_token)
    return tuple(o if o is not None else pixels.new_empty((0,)) for o in outs)


@_patch_embed_mask_backward_op.register_fake
def _(grad, pixels, weight, mask, need_pixels, need_weight, need_bias, need_token):
    D = weight.shape[0]
    return (
        pixels.new_empty(pixels.shape) if need_pixels else pixels.new_empty((0,)),
        pixels.new_empty(weight.shape) if need_weight else pixels.new_empty((0,)),
        pixels.new_empty((D,)) if need_bias else pixels.new_empty((0,)),
        pixels.new_empty((D,), dtype=torch.float32) if (need_token and mask is not None) else pixels.new_empty((0,)),
    )


def _pe_setup_context(ctx, inputs, output):
    pixels, weight, bias, mask_token, mask = inputs
    ctx.has_bias = bias is not None
    ctx.has_mask = mask is not None
    ctx.save_for_backward(pixels, weight, mask)


def _pe_backward(ctx, grad):
    pixels, weight, mask = ctx.saved_tensors
    n_px, n_w, n_b, n_t, _ = ctx.needs_input_grad
    n_b = n_b and ctx.has_bias
    n_t = n_t and ctx.has_mask
    if not (n_px or n_w or n_b or n_t):
        return None, None, None, None, None
    d_px, d_w, d_b, d_t = torch.ops.beit_fast.patch_embed_mask_backward(
        grad, pixels, weight, mask, n_px, n_w, n_b, n_t
    )
    return (d_px if n_px else None, d_w if n_w else None, d_b if n_b else None, d_t if n_t else None, None)


_patch_embed_mask_op.register_autograd(_pe_backward, setup_context=_pe_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def patch_embed_mask(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask_token: Tensor,
    bool_masked_pos: Tensor | None,
    backend: str | None = None,
) -> Tensor:
    """Patch embedding (Conv2d with stride = kernel = P) plus BEiT's mask-token substitution.

    Args:
        pixels: [B, C, H, W], fp32/fp16/bf16, H and W multiples of P.
        weight: [D, C, P, P] (a ``nn.Conv2d`` weight), same dtype as pixels.
        bias: [D] or None.
        mask_token: [D] (or BEiT's [1, 1, D]).
        bool_masked_pos: [B, N] bool (or [B, H/P, W/P]) with N = (H/P)*(W/P) in row-major patch order;
            True = masked. None = no substitution (mask_token then gets no gradient).
        backend: "auto" | "reference" | "triton" | None (the global setting, see ``beit_fast.ops.backend``).

    Returns:
        [B, N, D] in pixels.dtype, equal to ``patch_embed_mask_reference`` (the Triton path accumulates
        in fp32 and rounds once; it writes the mask token itself at masked rows, so a non-finite conv
        value at a masked position does not leak into the output as it would through ``x * 0``).
    """
    mask_token, mask = _check_inputs(pixels, weight, bias, mask_token, bool_masked_pos)
    which = resolve_backend(backend, pixels, weight, bias, mask_token, mask)
    if which == "reference":
        with autocast_off(pixels.device):
            return patch_embed_mask_reference(pixels, weight, bias, mask_token, mask)
    return torch.ops.beit_fast.patch_embed_mask(
        pixels.contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        mask_token.contiguous(),
        mask.contiguous() if mask is not None else None,
    )


triton_available()  # resolve the backend status once, at import (see backend._triton_status)
