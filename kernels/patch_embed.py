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
``beit_fast/ops/patch_embed.py``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import dot_input_precision, is_interpreted


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _pe_fwd_kernel(
    px_ptr, w_ptr, bias_ptr, tok_ptr, mask_ptr, out_ptr,
    M, NP, NPW, D, K,
    s_pb, s_pc, s_ph, s_pw,
    s_wd, s_wk,
    s_om, s_od,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D

    # patch -> pixel offset of its top-left corner
    b = rows // NP
    p = rows % NP
    ph = p // NPW
    pw = p % NPW
    row_off = b.to(tl.int64) * s_pb + (ph * P) * s_ph + (pw * P) * s_pw

    if HAS_MASK:
        masked = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        keep = row_ok & (masked == 0)
    else:
        keep = row_ok
    # A tile whose patches are all masked (or out of range) skips the GEMM entirely.
    n_keep = tl.sum(keep.to(tl.int32), axis=0)
    k_stop = tl.where(n_keep > 0, K, 0)

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + offs_k
        c = ks // (P * P)
        r = ks % (P * P)
        k_off = c * s_pc + (r // P) * s_ph + (r % P) * s_pw
        a_ptrs = px_ptr + (row_off[:, None] + k_off[None, :])
        w_ptrs = w_ptr + (cols[None, :] * s_wd + ks[:, None] * s_wk)
        if EVEN_K:
            a = tl.load(a_ptrs, mask=keep[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < K
            a = tl.load(a_ptrs, mask=keep[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_UPCAST:  # the interpreter cannot multiply bf16: upcast there only
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if HAS_MASK:
        tok = tl.load(tok_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.where(masked[:, None], tok[None, :], acc)

    out_ptrs = out_ptr + (rows[:, None].to(tl.int64) * s_om + cols[None, :] * s_od)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pe_bwd_params_kernel(
    g_ptr, px_ptr, mask_ptr, dw_ptr, db_ptr, dt_ptr,
    M, NP, NPW, D, K, ROWS_PER_SPLIT,
    s_gm, s_gd,
    s_pb, s_pc, s_ph, s_pw,
    s_dws, s_dwd, s_dwk,
    s_vs,
    P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    NEED_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)

    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c = ks // (P * P)
    r = ks % (P * P)
    k_off = c * s_pc + (r // P) * s_ph + (r % P) * s_pw

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    tsum = tl.zeros((BLOCK_D,), dtype=tl.float32)

    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        if HAS_MASK:
            masked = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
            keep = row_ok & (masked == 0)
        else:
            keep = row_ok
        g = tl.load(
            g_ptr + (rows[:, None].to(tl.int64) * s_gm + ds[None, :] * s_gd),
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if NEED_W:
            b = rows // NP
            p = rows % NP
            row_off = b.to(tl.int64) * s_pb + ((p // NPW) * P) * s_ph + ((p % NPW) * P) * s_pw
            a = tl.load(px_ptr + (row_off[:, None] + k_off[None, :]), mask=keep[:, None] & k_ok[None, :], other=0.0)
            gt = tl.trans(g)
            if DOT_UPCAST:
                gt = gt.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(gt, a, acc, input_precision=DOT_PREC)
        if NEED_B or NEED_T:
            gf = g.to(tl.float32)
            if NEED_B:
                bsum += tl.sum(tl.where(keep[:, None], gf, 0.0), axis=0)
            if NEED_T:
                tsum += tl.sum(tl.where(masked[:, None], gf, 0.0), axis=0)

    if NEED_W:
        dw_ptrs = dw_ptr + (pid_s.to(tl.int64) * s_dws + ds[:, None] * s_dwd + ks[None, :] * s_dwk)
        tl.store(dw_ptrs, acc, mask=d_ok[:, None] & k_ok[None, :])
    first_k = pid_k == 0
    if NEED_B:
        tl.store(db_ptr + pid_s * s_vs + ds, bsum, mask=d_ok & first_k)
    if NEED_T:
        tl.store(dt_ptr + pid_s * s_vs + ds, tsum, mask=d_ok & first_k)


@triton.jit
def _pe_bwd_pixels_kernel(
    g_ptr, w_ptr, mask_ptr, dpx_ptr,
    M, NP, NPW, D, K,
    s_gm, s_gd,
    s_wd, s_wk,
    s_pb, s_pc, s_ph, s_pw,
    P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K

    if HAS_MASK:
        masked = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        keep = row_ok & (masked == 0)
    else:
        keep = row_ok
    n_keep = tl.sum(keep.to(tl.int32), axis=0)
    d_stop = tl.where(n_keep > 0, D, 0)

    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d_stop, BLOCK_D):
        ds = d0 + offs_d
        g_ptrs = g_ptr + (rows[:, None].to(tl.int64) * s_gm + ds[None, :] * s_gd)
        w_ptrs = w_ptr + (ds[:, None] * s_wd + ks[None, :] * s_wk)
        if EVEN_D:
            g = tl.load(g_ptrs, mask=keep[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            d_ok = ds < D
            g = tl.load(g_ptrs, mask=keep[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=DOT_PREC)

    # scatter back to pixel positions (each pixel belongs to exactly one patch)
    b = rows // NP
    p = rows % NP
    row_off = b.to(tl.int64) * s_pb + ((p // NPW) * P) * s_ph + ((p % NPW) * P) * s_pw
    c = ks // (P * P)
    r = ks % (P * P)
    k_off = c * s_pc + (r // P) * s_ph + (r % P) * s_pw
    tl.store(dpx_ptr + (row_off[:, None] + k_off[None, :]), acc.to(dpx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


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


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
            num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
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
