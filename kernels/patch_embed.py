"""Fused BEiT patch embedding + mask-token substitution (Triton), forward and backward.

Computes, for pixels [B, C, H, W], weight [D, C, P, P], bias [D], mask_token [D], mask [B, N] (bool):

    out[b, n, :] = mask_token                                   if mask[b, n]
                 = sum_k A[b*N + n, k] * weight2d[:, k] + bias  otherwise

where A is the (never materialised) im2col matrix of non-overlapping P x P patches, row-major patch order
(n = ph * (W/P) + pw), and k = c*P*P + i*P + j indexes weight.reshape(D, C*P*P). This is exactly
``conv2d(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2)`` followed by the mask blend.

Kernels (all accumulate in fp32, load/store in the tensor dtype):

* ``_pe_fwd_kernel``: one [BLOCK_M patches x BLOCK_N features] output tile per program. The A tile is
  gathered straight from the pixel tensor (row offset of the patch + column offset of (c, i, j));
  masked patches are never read (masked loads), a tile whose patches are all masked skips the K loop,
  and masked rows get the mask token in the epilogue.
* ``_pe_bwd_params_kernel``: dW[d, k] = sum_{unmasked rows} g[r, d] * A[r, k], split over rows into
  fp32 partial sums (summed on the host side, deterministic); the same pass reduces the bias gradient
  (unmasked rows) and the mask-token gradient (masked rows).
* ``_pe_bwd_pixels_kernel``: dA = g @ W2d for unmasked rows (zero for masked rows), scattered straight
  back to pixel positions (non-overlapping patches: every pixel is written exactly once).

The launchers are plain functions on tensors; autograd / torch.library registration lives in
``beit_fast/ops/patch_embed.py``. The kernels live in ``patch_embed_forward.py`` and
``patch_embed_backward.py``; this module holds the configurations, the launch-argument builders and the
launchers, and the kernels stay importable from it.
"""
from __future__ import annotations

import torch
import triton

from ._common import dot_input_precision, is_interpreted, multiprocessor_count
from .patch_embed_backward import _pe_bwd_params_kernel, _pe_bwd_pixels_kernel
from .patch_embed_forward import _pe_fwd_kernel


# --------------------------------------------------------------------------------------------------
# Configurations (one per kernel and mode; no autotuning, so the ahead-of-time compile check covers
# exactly what runs)
# --------------------------------------------------------------------------------------------------
# GPU: 128x128x64 tiles, 8 warps (two Hopper warpgroups -> wgmma m64), 3 stages: 96 KB of shared
# memory for 16-bit operands, inside the A100 (163 KB) and H100 (227 KB) limits.
GPU_FWD = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
GPU_BWD_PARAMS = dict(BLOCK_M=64, BLOCK_D=128, BLOCK_K=128, num_warps=8, num_stages=3)
GPU_BWD_PIXELS = dict(BLOCK_M=128, BLOCK_K=128, BLOCK_D=64, GROUP_M=8, num_warps=8, num_stages=3)
# Interpreter (CPU tests): large-ish blocks keep the per-program Python overhead low; the row blocks
# are small enough that test shapes still span several tiles / splits.
INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
INTERP_BWD_PARAMS = dict(BLOCK_M=16, BLOCK_D=64, BLOCK_K=64, num_warps=4, num_stages=1)
INTERP_BWD_PIXELS = dict(BLOCK_M=32, BLOCK_K=64, BLOCK_D=32, GROUP_M=2, num_warps=4, num_stages=1)
# Target number of programs for the row-split weight-gradient reduction.
GPU_PARAMS_TARGET_PROGRAMS_PER_SM = 2
INTERP_PARAMS_TARGET_PROGRAMS = 4




def _geometry(pixels: torch.Tensor, weight: torch.Tensor):
    B, C, H, W = pixels.shape
    D, _, P, _ = weight.shape
    NPH, NPW = H // P, W // P
    NP = NPH * NPW
    M = B * NP
    K = C * P * P
    return B, C, H, W, D, P, NPW, NP, M, K


# --------------------------------------------------------------------------------------------------
# Launch-argument builders (shared by the launchers and by the ahead-of-time compile check, which calls
# them on meta tensors)
# --------------------------------------------------------------------------------------------------
def fwd_launch(pixels, weight2d, bias, mask_token, mask_u8, out, P, interpret):
    B, C, H, W = pixels.shape
    D, K = weight2d.shape
    NPW = W // P
    NP = (H // P) * NPW
    M = B * NP
    cfg = dict(INTERP_FWD if interpret else GPU_FWD)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    has_bias = bias is not None
    has_mask = mask_u8 is not None
    args = [
        pixels, weight2d, bias if has_bias else weight2d, mask_token, mask_u8 if has_mask else pixels, out,
        M, NP, NPW, D, K,
        *pixels.stride(),
        *weight2d.stride(),
        out.stride(0), out.stride(1),
    ]
    constexprs = dict(
        P=P, HAS_BIAS=has_bias, HAS_MASK=has_mask, **cfg,
        EVEN_K=(K % cfg["BLOCK_K"] == 0),
        DOT_UPCAST=bool(interpret),
        DOT_PREC=dot_input_precision(pixels.dtype),
    )
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    return _pe_fwd_kernel, grid, args, constexprs, opts


def bwd_params_launch(grad, pixels, mask_u8, dw_part, db_part, dt_part, P, need_w, need_b, need_t,
                      split, rows_per_split, interpret):
    B, C, H, W = pixels.shape
    M, D = grad.shape
    K = C * P * P
    NPW = W // P
    NP = (H // P) * NPW
    cfg = dict(INTERP_BWD_PARAMS if interpret else GPU_BWD_PARAMS)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    has_mask = mask_u8 is not None
    dummy = grad
    args = [
        grad, pixels, mask_u8 if has_mask else pixels,
        dw_part if need_w else dummy, db_part if need_b else dummy, dt_part if need_t else dummy,
        M, NP, NPW, D, K, rows_per_split,
        grad.stride(0), grad.stride(1),
        *pixels.stride(),
        *(dw_part.stride() if need_w else (0, 0, 0)),
        (db_part if need_b else (dt_part if need_t else grad)).stride(0),
    ]
    constexprs = dict(
        P=P, HAS_MASK=has_mask, NEED_W=need_w, NEED_B=need_b, NEED_T=need_t, **cfg,
        DOT_UPCAST=bool(interpret),
        DOT_PREC=dot_input_precision(pixels.dtype),
    )
    grid = (triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(K, cfg["BLOCK_K"]) if need_w else 1, split)
    return _pe_bwd_params_kernel, grid, args, constexprs, opts


def bwd_pixels_launch(grad, weight2d, mask_u8, dpx, P, interpret):
    B, C, H, W = dpx.shape
    M, D = grad.shape
    K = weight2d.shape[1]
    NPW = W // P
    NP = (H // P) * NPW
    cfg = dict(INTERP_BWD_PIXELS if interpret else GPU_BWD_PIXELS)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    has_mask = mask_u8 is not None
    args = [
        grad, weight2d, mask_u8 if has_mask else grad, dpx,
        M, NP, NPW, D, K,
        grad.stride(0), grad.stride(1),
        *weight2d.stride(),
        *dpx.stride(),
    ]
    constexprs = dict(
        P=P, HAS_MASK=has_mask, **cfg,
        EVEN_D=(D % cfg["BLOCK_D"] == 0),
        DOT_UPCAST=bool(interpret),
        DOT_PREC=dot_input_precision(grad.dtype),
    )
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    return _pe_bwd_pixels_kernel, grid, args, constexprs, opts


def params_split(M: int, D: int, K: int, need_w: bool, interpret: bool, device=None, num_sms=None):
    """Row split of the weight-gradient reduction: enough programs to fill the GPU, never more row
    blocks than there are rows. Depends on shapes only (no data)."""
    cfg = INTERP_BWD_PARAMS if interpret else GPU_BWD_PARAMS
    tiles = triton.cdiv(D, cfg["BLOCK_D"]) * (triton.cdiv(K, cfg["BLOCK_K"]) if need_w else 1)
    if interpret:
        target = INTERP_PARAMS_TARGET_PROGRAMS
    else:
        if num_sms is None:
            num_sms = multiprocessor_count(device)
        target = GPU_PARAMS_TARGET_PROGRAMS_PER_SM * num_sms
    row_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))
    split = max(1, min(row_blocks, triton.cdiv(target, tiles)))
    rows_per_split = triton.cdiv(row_blocks, split) * cfg["BLOCK_M"]
    split = max(1, triton.cdiv(M, rows_per_split))
    return split, rows_per_split


# --------------------------------------------------------------------------------------------------
# Launchers (expect validated, contiguous inputs of one dtype; see beit_fast/ops/patch_embed.py)
# --------------------------------------------------------------------------------------------------
def _launch(spec):
    kernel, grid, args, constexprs, opts = spec
    kernel[grid](*args, **constexprs, **opts)


def patch_embed_mask_forward(pixels, weight, bias, mask_token, mask):
    """pixels [B,C,H,W], weight [D,C,P,P], bias [D] | None, mask_token [D], mask [B,N] bool | None.
    Returns [B, N, D] in pixels.dtype."""
    B, C, H, W, D, P, NPW, NP, M, K = _geometry(pixels, weight)
    out = torch.empty((B, NP, D), dtype=pixels.dtype, device=pixels.device)
    if M == 0 or D == 0:
        return out
    interpret = is_interpreted(_pe_fwd_kernel)
    mask_u8 = mask.reshape(M).view(torch.uint8) if mask is not None else None
    _launch(fwd_launch(pixels, weight.reshape(D, K), bias, mask_token, mask_u8, out.view(M, D), P, interpret))
    return out


def patch_embed_mask_backward(grad, pixels, weight, mask, need_pixels, need_weight, need_bias, need_token):
    """grad [B,N,D] (contiguous, pixels.dtype). Returns (d_pixels, d_weight, d_bias, d_token); entries
    that are not needed are None. Parameter gradients are reduced in fp32; weight and bias gradients are
    returned in the dtype of ``pixels``, the mask-token gradient in float32 (the token may be kept in fp32
    under low-precision pixels; autograd casts it to the token's dtype otherwise)."""
    B, C, H, W, D, P, NPW, NP, M, K = _geometry(pixels, weight)
    dev, dt = pixels.device, pixels.dtype
    need_token = need_token and mask is not None
    g2 = grad.reshape(M, D)
    mask_u8 = mask.reshape(M).view(torch.uint8) if mask is not None else None
    d_px = d_w = d_b = d_t = None

    if need_pixels:
        d_px = torch.empty_like(pixels)
        if M > 0 and D > 0:
            interpret = is_interpreted(_pe_bwd_pixels_kernel)
            _launch(bwd_pixels_launch(g2, weight.reshape(D, K), mask_u8, d_px, P, interpret))
        elif M > 0:
            d_px.zero_()

    if need_weight or need_bias or need_token:
        if M == 0 or D == 0:
            d_w = torch.zeros((D, K), dtype=torch.float32, device=dev) if need_weight else None
            d_b = torch.zeros((D,), dtype=torch.float32, device=dev) if need_bias else None
            d_t = torch.zeros((D,), dtype=torch.float32, device=dev) if need_token else None
        else:
            interpret = is_interpreted(_pe_bwd_params_kernel)
            split, rows_per_split = params_split(M, D, K, need_weight, interpret, device=dev)
            dw_part = torch.empty((split, D, K), dtype=torch.float32, device=dev) if need_weight else None
            db_part = torch.empty((split, D), dtype=torch.float32, device=dev) if need_bias else None
            dt_part = torch.empty((split, D), dtype=torch.float32, device=dev) if need_token else None
            _launch(bwd_params_launch(g2, pixels, mask_u8, dw_part, db_part, dt_part, P, need_weight,
                                      need_bias, need_token, split, rows_per_split, interpret))
            d_w = (dw_part[0] if split == 1 else dw_part.sum(0)) if need_weight else None
            d_b = (db_part[0] if split == 1 else db_part.sum(0)) if need_bias else None
            d_t = (dt_part[0] if split == 1 else dt_part.sum(0)) if need_token else None
        if d_w is not None:
            d_w = d_w.to(dt).view(D, C, P, P)
        if d_b is not None:
            d_b = d_b.to(dt)
    return d_px, d_w, d_b, d_t
