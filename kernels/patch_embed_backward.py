"""The patch-embedding backward kernels: the parameter gradients (``_pe_bwd_params_kernel``) and the pixel
gradient (``_pe_bwd_pixels_kernel``); launched by ``patch_embed.py``, whose docstring describes the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


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
