"""The attention backward kernels: dq (with delta and the bias-gradient partial sums), dk/dv, and the table
gradient; launched by ``attention.py``, whose docstring describes the kernels."""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_forward import LOG2E, _bias_tile, _cast, _dot

# --------------------------------------------------------------------------------------------------
# Backward: dq, delta and the bias-gradient partial sums
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, PART, BIAS, TABLE, INDEX,
    sm_scale,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_ob, s_oh, s_on,
    s_dob, s_doh, s_don,
    s_dqb, s_dqh, s_dqn,
    s_bb, s_bh, s_bm, s_bn, T,
    B, H, N_Q, N_K, BATCH_PER_GROUP,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BIAS_MODE: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.program_id(2)
    b0 = g * BATCH_PER_GROUP
    b1 = tl.minimum(B, b0 + BATCH_PER_GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    qk_scale = sm_scale * LOG2E
    table_base = TABLE + h * T
    # This program alone reads and writes partial[g, h, its rows, :] (no atomics, a fixed order: the
    # batch elements of the group one after the other). The slab is small enough to stay in L2.
    part_rows = PART + (g * H + h).to(tl.int64) * N_Q * N_K + offs_m[:, None] * N_K

    first = b0.to(tl.int64)
    for i in range(0, b1 - b0):
        b64 = first + i
        bh = b64 * H + h
        q = tl.load(Q + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        mv = m_ok[:, None] & dv_ok[None, :]
        do = tl.load(DO + b64 * s_dob + h * s_doh + offs_m[:, None] * s_don + offs_dv[None, :], mask=mv, other=0.0)
        o = tl.load(O + b64 * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_dv[None, :], mask=mv, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + bh * N_Q + offs_m, delta, mask=m_ok)
        lse = tl.load(LSE + bh * N_Q + offs_m, mask=m_ok, other=0.0)
        k_base = K + b64 * s_kb + h * s_kh
        v_base = V + b64 * s_vb + h * s_vh
        bias_base = BIAS + b64 * s_bb + h * s_bh

        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, N_K, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N_K
            valid = m_ok[:, None] & n_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :],
                        other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_UPCAST, DOT_PREC) * qk_scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_base, table_base, INDEX, offs_m, offs_n, s_bm, s_bn, valid, BIAS_MODE) * LOG2E
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_UPCAST, DOT_PREC)
            ds = p * (dp - delta[:, None])
            if BIAS_GRAD:
                ptrs = part_rows + offs_n[None, :]
                # the group's first batch element writes, the others add (unwritten memory is never read)
                tl.store(ptrs, tl.load(ptrs, mask=valid & (i > 0), other=0.0) + ds, mask=valid)
            dq = _dot(_cast(ds, k.dtype, FIX_BF16), k, dq, DOT_UPCAST, DOT_PREC)
        tl.store(DQ + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dqn + offs_d[None, :],
                 _cast(dq * sm_scale, DQ.dtype.element_ty, FIX_BF16), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Backward: dk, dv
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, TABLE, INDEX_T,
    sm_scale,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_dob, s_doh, s_don,
    s_dkb, s_dkh, s_dkn,
    s_dvb, s_dvh, s_dvn,
    s_bb, s_bh, s_bm, s_bn, T,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BIAS_MODE: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    qk_scale = sm_scale * LOG2E

    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * s_doh
    row_base = bh.to(tl.int64) * N_Q
    bias_base = BIAS + b * s_bb + h * s_bh
    table_base = TABLE + h * T

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        valid = n_ok[:, None] & m_ok[None, :]  # [keys, queries]
        q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_don + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_UPCAST, DOT_PREC) * qk_scale
        if BIAS_MODE != 0:
            # transposed tile: rows are keys, cols are queries (the table path reads index^T, coalesced)
            st += _bias_tile(bias_base, table_base, INDEX_T, offs_n, offs_m, s_bn, s_bm, valid, BIAS_MODE) * LOG2E
        pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
        dv = _dot(_cast(pt, do.dtype, FIX_BF16), do, dv, DOT_UPCAST, DOT_PREC)
        dpt = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_UPCAST, DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(_cast(dst, q.dtype, FIX_BF16), q, dk, DOT_UPCAST, DOT_PREC)

    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :],
             _cast(dk * sm_scale, DK.dtype.element_ty, FIX_BF16), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_dv[None, :],
             _cast(dv, DV.dtype.element_ty, FIX_BF16), mask=n_ok[:, None] & dv_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Backward: the table gradient (deterministic scatter of the partial sums)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _table_grad_kernel(
    PART, POS, OUT,
    G, H, NN, T, MAXC, s_ot, s_oh,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """OUT[t, h] = sum over g, then over the positions c of row t (in order), of PART[g, h, POS[t, c]]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for c0 in range(0, MAXC, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        pos = tl.load(POS + offs_t[:, None].to(tl.int64) * MAXC + offs_c[None, :],
                      mask=t_ok[:, None] & (offs_c < MAXC)[None, :], other=-1)  # [T, C]
        ok = (pos >= 0)[:, :, None] & h_ok[None, None, :]
        for g in range(0, G):
            rows = (g * H + offs_h).to(tl.int64) * NN  # [H]
            x = tl.load(PART + rows[None, None, :] + pos[:, :, None], mask=ok, other=0.0)  # [T, C, H]
            acc += tl.sum(x, 1)
    tl.store(OUT + offs_t[:, None] * s_ot + offs_h[None, :] * s_oh, acc, mask=t_ok[:, None] & h_ok[None, :])
