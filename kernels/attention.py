"""Flash-style attention with BEiT's relative position bias (Triton), forward and backward.

    out = softmax(q @ k^T * scale + bias) @ v        q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]

The [Nq, Nk] scores never reach HBM. The bias is one of
  * none;
  * dense: a tensor broadcastable to [B, H, Nq, Nk] (BEiT: [H, N, N], shared by the batch), read with its
    own strides (stride 0 over broadcast dims, no copy);
  * table: BEiT's relative position bias table [T, H] and its int index [Nq, Nk], gathered *inside* the
    kernels (bias[h, i, j] = table[index[i, j], h]): no [H, N, N] bias is ever formed.

Kernels (see KERNELS.md, section 3, for the reasoning behind the tiles):
  ``_attn_fwd_kernel``   one program per (b, h, block of BLOCK_M queries): online softmax over key
                         blocks in fp32 (exp2 domain), writes out and the row log-sum-exp (log2 units).
  ``_attn_bwd_dq_kernel`` one program per (h, block of queries, group of batch elements): for each
                         batch element of its group, in order, it computes delta = rowsum(dO * O) (stored
                         for the next kernel), recomputes P from q, k and the log-sum-exp, dP = dO @ v^T,
                         dS = P * (dP - delta), dq = scale * dS @ k, and adds dS (fp32) into its own slab
                         partial[g, h, its rows, :] (the group's first element writes, the others
                         read-modify-write; the slab stays in L2). Result: partial[g] = sum over the batch
                         elements b of group g of dS[b] (no [B, H, N, N] tensor).
  ``_attn_bwd_dkdv_kernel`` one program per (b, h, block of keys): recomputes P^T, dv = P^T @ dO,
                         dk = scale * dS^T @ q over all query blocks (the table path reads index^T).
  ``_table_grad_kernel`` one program per block of table rows t: dtable[t, :] = sum over groups and over
                         the positions (i, j) with index[i, j] == t of partial[g, :, i, j] (a precomputed
                         position list, fixed order). A dense bias instead gets partial.sum(0) reduced to
                         its broadcast shape by the caller.
No kernel uses atomics and every reduction has a fixed order (a program owns every element it writes):
results are bitwise repeatable for a given launch configuration. The autotuner's choice may differ between
processes; ``deterministic=True`` (or ``AUTOTUNE = False``) uses fixed configurations, and the batch
grouping depends on shapes and the SM count only, never on the configuration. Under the interpreter each
kernel runs one fixed configuration (no autotuner object).

Dtypes: q, k, v in fp16 / bf16 / fp32; products accumulate in fp32, softmax statistics are fp32, P and dS
are rounded to the input dtype before their tensor-core products (as FlashAttention does), the bias
gradient is accumulated in fp32 from the unrounded dS.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import dot_input_precision, is_interpreted, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)

BIAS_NONE, BIAS_DENSE, BIAS_TABLE = 0, 1, 2

MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------------------------------
# Helpers (inlined into the kernels)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    if DOT_UPCAST:  # the interpreter cannot multiply bf16: upcast there only
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _rtne_bf16(x):
    """x (fp32) rounded to the nearest bf16 value, still as fp32. Only used under the interpreter, whose
    fp32 -> bf16 conversion truncates (the GPU's rounds to nearest even): with it the interpreter computes
    what the GPU computes."""
    bits = x.to(tl.uint32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def _cast(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even on every backend."""
    if FIX_BF16:
        x = _rtne_bf16(x)
    return x.to(dtype)


@triton.jit
def _bias_tile(bias_base, table_base, index_ptr, rows, cols, s_r, s_c, mask, BIAS_MODE: tl.constexpr):
    """The bias (fp32, natural units) at [rows[:, None], cols[None, :]], 0 where mask is False.

    Dense: bias_base points at this (b, h) slice and (s_r, s_c) are its strides along rows / cols.
    Table: index_ptr is an int16/int32 [rows, cols] matrix with strides (s_r, s_c); table_base points at
    this head's row of the [H, T] (transposed, fp32) table."""
    offs = rows[:, None] * s_r + cols[None, :] * s_c
    if BIAS_MODE == 1:
        b = tl.load(bias_base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        idx = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int32)
        b = tl.load(table_base + idx, mask=mask, other=0.0)
    return b


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, BIAS, TABLE, INDEX,
    sm_scale,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_ob, s_oh, s_on,
    s_bb, s_bh, s_bm, s_bn, T,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BIAS_MODE: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    bias_base = BIAS + b * s_bb + h * s_bh
    table_base = TABLE + h * T
    qk_scale = sm_scale * LOG2E

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_UPCAST, DOT_PREC) * qk_scale
        if BIAS_MODE != 0:
            s += _bias_tile(bias_base, table_base, INDEX, offs_m, offs_n,
                            s_bm, s_bn, m_ok[:, None] & n_ok[None, :], BIAS_MODE) * LOG2E
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose scores so far are all -inf (a -inf bias) keeps a finite reference point
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = _dot(_cast(p, v.dtype, FIX_BF16), v, acc * alpha[:, None], DOT_UPCAST, DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_dv[None, :],
             _cast(out, O.dtype.element_ty, FIX_BF16), mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, m_i + tl.log2(l_i), mask=m_ok)


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


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
# GPU: autotuned per (Nq, Nk, head dims, bias mode, dtype) among the entries valid for the card's
# architecture family ("archs": 80 = sm_8x, 90 = sm_9x; other cards use the sm_80 entries). Every entry
# is compiled by tests/test_kernel_compile.py for its families (shared memory within the card, tensor-core
# instructions, no register spills; an entry that spilled on sm_80 is marked 90 only). Reasoning (KERNELS.md
# section 3): at N = 197 a 64- or 128-row query tile and 16-128-key blocks keep the padding waste at
# 1.05-1.3x per dimension; Triton puts all warps of a chained dot along M, so 4 warps per 64 rows (one
# Hopper warpgroup, wgmma m64) and 8 per 128.
GPU_FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, archs=(90,)),
]
GPU_DQ_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, archs=(90,)),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=1, archs=(90,)),
    dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=1, archs=(80,)),
]
# dk/dv: BLOCK_N keys per program (rows of the transposed scores), BLOCK_M queries per step.
GPU_DKDV_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2, archs=(80, 90)),
    dict(BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=2, archs=(80, 90)),
    dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, archs=(90,)),
]
# deterministic=True (or AUTOTUNE = False): one fixed configuration per kernel (no timing-dependent
# choice): the first entry of each list above (valid on both families), with one pipeline stage for the
# forward so that fp32 inputs with head dim 128 fit an A100's shared memory too.
AUTOTUNE = True
DETERMINISTIC_FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
DETERMINISTIC_DQ = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)
DETERMINISTIC_DKDV = dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2)
GPU_TABLE_GRAD = dict(BLOCK_T=16, BLOCK_C=16, num_warps=4, num_stages=1)
# Interpreter (CPU tests): one configuration per kernel. Python overhead is per program and per block
# step, so blocks are large (BEiT's N = 197 still spans 4 of them; tests that want several blocks at
# small N patch these).
INTERP_FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
INTERP_DQ = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
INTERP_DKDV = dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=1)
INTERP_TABLE_GRAD = dict(BLOCK_T=256, BLOCK_C=64, num_warps=4, num_stages=1)
# Programs the dq kernel aims for (it picks its number of batch groups from this): several per SM, so
# that its long programs (a whole batch group each) balance across the SMs.
GPU_DQ_PROGRAMS_PER_SM = 8
INTERP_DQ_PROGRAMS = 8
# Batch elements per group of the dq kernel; None: derived from the programs target above.
BATCH_PER_GROUP: int | None = None

_TUNE_KEY = ["N_Q", "N_K", "HEAD_D", "HEAD_DV", "BIAS_MODE"]


def arch_family(capability_major: int) -> int:
    """90 for sm_9x (Hopper: wgmma), else 80 (the configurations checked for sm_80)."""
    return 90 if capability_major == 9 else 80


@functools.lru_cache(maxsize=None)
def _device_family(device_index: int) -> int:
    return arch_family(torch.cuda.get_device_capability(device_index)[0])


def configs_for(dicts, family: int) -> list[dict]:
    """The entries of a configuration list valid for an architecture family, without their "archs" tag."""
    return [{k: v for k, v in d.items() if k != "archs"} for d in dicts if family in d["archs"]]


def _autotuned(kernel, dicts, key):
    configs, archs = [], {}
    for d in dicts:
        d = dict(d)
        nw, ns, fam = d.pop("num_warps"), d.pop("num_stages"), d.pop("archs")
        c = triton.Config(d, num_warps=nw, num_stages=ns)
        archs[id(c)] = fam
        configs.append(c)

    def prune(configs, named_args, **kwargs):
        dev = named_args["Q"].device
        fam = _device_family(dev.index if dev.index is not None else torch.cuda.current_device())
        return [c for c in configs if fam in archs[id(c)]]

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_INTERPRETED = is_interpreted(_attn_fwd_kernel)
if _INTERPRETED:  # one configuration under the interpreter: no autotuner object at all
    _FWD_TUNED = _DQ_TUNED = _DKDV_TUNED = None
else:
    _FWD_TUNED = _autotuned(_attn_fwd_kernel, GPU_FWD_CONFIGS, _TUNE_KEY)
    _DQ_TUNED = _autotuned(_attn_bwd_dq_kernel, GPU_DQ_CONFIGS, _TUNE_KEY + ["BIAS_GRAD"])
    _DKDV_TUNED = _autotuned(_attn_bwd_dkdv_kernel, GPU_DKDV_CONFIGS, _TUNE_KEY)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------------
# The index plan: compact index, its transpose, and the table-gradient position list (cached)
# --------------------------------------------------------------------------------------------------
_PLAN_CACHE: dict[tuple, tuple] = {}
_PLAN_CACHE_SIZE = 64


def index_plan(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(compact [Nq, Nk], compact^T [Nk, Nq], positions [T, C])`` for ``index`` (int, [Nq, Nk]) into a
    table of ``num_rows`` rows: int16 copies of the index (int32 when T > 32767) and, for every table row
    t, the flat positions i * Nk + j with index[i, j] == t in increasing order, padded with -1 to the
    largest count C.

    Computed once per index tensor (and version): the entry keeps a reference to ``index`` so its memory
    cannot be reused by another tensor while cached. Validating the values and sizing C read the index
    on the host: one synchronisation per new index, none afterwards. Raises ValueError for values
    outside [0, num_rows)."""
    key = (index.device, index.data_ptr(), index._version, tuple(index.shape), tuple(index.stride()), num_rows)
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit[1:]
    for (dev, _, _, shape, _, rows), entry in list(_PLAN_CACHE.items()):
        # another tensor with the same values (fine-tuning: one index buffer per block, all equal): share its
        # plan instead of keeping a copy per block (about 6 MB each at N = 577)
        if (dev, shape, rows) == key[:1] + key[3:4] + key[5:] and torch.equal(entry[0], index):
            _PLAN_CACHE[key] = (index,) + entry[1:]
            return entry[1:]
    nq, nk = index.shape
    flat = index.reshape(-1).to(torch.int64)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(
                f"relative position index values must be in [0, {num_rows}) (the table has {num_rows} rows); "
                f"found values in [{lo}, {hi}]"
            )
    small = torch.int16 if num_rows <= torch.iinfo(torch.int16).max else torch.int32
    compact = index.to(small).contiguous()
    compact_t = compact.t().contiguous()
    counts = torch.bincount(flat, minlength=num_rows)
    width = max(1, int(counts.max())) if flat.numel() else 1
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    positions = torch.full((num_rows, width), -1, dtype=torch.int32, device=flat.device)
    positions[flat[order], rank] = order.to(torch.int32)
    if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = (index, compact, compact_t, positions)
    return compact, compact_t, positions


# --------------------------------------------------------------------------------------------------
# Launch-argument builders (shared by the launchers and the ahead-of-time compile check, which calls
# them on meta tensors with one configuration)
# --------------------------------------------------------------------------------------------------
def _dims(q, v):
    hd, hdv = q.shape[-1], v.shape[-1]
    return dict(HEAD_D=hd, HEAD_DV=hdv, BLOCK_D=max(16, next_pow2(hd)), BLOCK_DV=max(16, next_pow2(hdv)))


def _numerics(dtype, interpret):
    return dict(DOT_UPCAST=bool(interpret), DOT_PREC="ieee" if interpret else dot_input_precision(dtype),
                FIX_BF16=bool(interpret) and dtype == torch.bfloat16)


def _bias_args(bias4, table_t, index, dummy, shape, transposed=False):
    """(mode, bias, table, index, strides (b, h, query, key), T). A dense bias is read through its view
    expanded to ``shape`` [B, H, Nq, Nk] (stride 0 over broadcast dims). For a table, the "bias strides"
    are the index's: (0, 0, row stride, 1), or for the transposed index (keys as rows) (0, 0, 1, row stride)."""
    if bias4 is not None:
        return BIAS_DENSE, bias4, dummy, dummy, tuple(bias4.expand(shape).stride()), 0
    if table_t is not None:
        strides = (0, 0, 1, index.stride(0)) if transposed else (0, 0, index.stride(0), 1)
        return BIAS_TABLE, dummy, table_t, index, strides, table_t.shape[1]
    return BIAS_NONE, dummy, dummy, dummy, (0, 0, 0, 0), 0


def fwd_launch(q, k, v, o, lse, bias4, table_t, index, scale, interpret, cfg=None):
    """``(kernel, grid, args, constexprs, opts)``; cfg None: the autotuned kernel (GPU) or the interpreter
    configuration."""
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index, q, (B, H, NQ, NK))
    args = [q, k, v, o, lse, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            *sb, T, H, NQ, NK]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, **_numerics(q.dtype, interpret))
    return _spec(_attn_fwd_kernel, _FWD_TUNED, lambda m: (B * H, triton.cdiv(NQ, m["BLOCK_M"])),
                 args, constexprs, INTERP_FWD if interpret else cfg)


def batch_groups(B: int, H: int, NQ: int, interpret: bool, num_sms: int | None = None, device=None) -> tuple[int, int]:
    """(number of groups G, batch elements per group) of the dq kernel: enough programs to fill the GPU
    (counted with a nominal 64-row query block, so the grouping, and with it the summation order of the
    bias gradient, does not depend on the autotuner's choice)."""
    if BATCH_PER_GROUP is not None:
        per = max(1, min(B, int(BATCH_PER_GROUP)))
    else:
        if interpret:
            target = INTERP_DQ_PROGRAMS
        else:
            if num_sms is None:
                num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
            target = GPU_DQ_PROGRAMS_PER_SM * num_sms
        groups = max(1, min(B, triton.cdiv(target, H * triton.cdiv(NQ, 64))))
        per = triton.cdiv(B, groups)
    return triton.cdiv(B, per), per


def dq_launch(q, k, v, o, do, lse, delta, dq, part, bias4, table_t, index, scale, groups, per_group,
              bias_grad, interpret, cfg=None):
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index, q, (B, H, NQ, NK))
    args = [q, k, v, o, do, lse, delta, dq, part if part is not None else lse, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            *sb, T, B, H, NQ, NK, per_group]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, BIAS_GRAD=bool(bias_grad), **_numerics(q.dtype, interpret))
    return _spec(_attn_bwd_dq_kernel, _DQ_TUNED, lambda m: (H, triton.cdiv(NQ, m["BLOCK_M"]), groups),
                 args, constexprs, INTERP_DQ if interpret else cfg)


def dkdv_launch(q, k, v, do, lse, delta, dk, dv, bias4, table_t, index_t, scale, interpret, cfg=None):
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index_t, q, (B, H, NQ, NK), transposed=True)
    args = [q, k, v, do, lse, delta, dk, dv, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            *sb, T, H, NQ, NK]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, **_numerics(q.dtype, interpret))
    return _spec(_attn_bwd_dkdv_kernel, _DKDV_TUNED, lambda m: (B * H, triton.cdiv(NK, m["BLOCK_N"])),
                 args, constexprs, INTERP_DKDV if interpret else cfg)


def table_grad_launch(part, positions, out, interpret):
    G, H, NQ, NK = part.shape
    T, C = positions.shape
    cfg = dict(INTERP_TABLE_GRAD if interpret else GPU_TABLE_GRAD)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    args = [part, positions, out, G, H, NQ * NK, T, C, out.stride(0), out.stride(1)]
    constexprs = dict(BLOCK_H=max(2, next_pow2(H)), **cfg)
    return _table_grad_kernel, (triton.cdiv(T, cfg["BLOCK_T"]),), args, constexprs, opts


def _spec(kernel, tuned, grid_fn, args, constexprs, cfg):
    """A launch spec with a fixed configuration (cfg: a config dict) or the autotuned kernel (cfg None)."""
    if cfg is None:
        return tuned, grid_fn, args, constexprs, {}
    cfg = dict(cfg)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    constexprs = dict(constexprs, **cfg)
    return kernel, grid_fn(constexprs), args, constexprs, opts


def _launch(spec):
    kernel, grid, args, constexprs, opts = spec
    kernel[grid](*args, **constexprs, **opts)


# --------------------------------------------------------------------------------------------------
# Launchers (inputs validated by beit_fast/ops/attention.py; q, k, v with unit last-dim stride)
# --------------------------------------------------------------------------------------------------


def out_strides(B: int, H: int, NQ: int, DV: int) -> tuple[int, int, int, int]:
    """Strides of the forward's output [B, H, Nq, Dv]: [B, Nq, H, Dv]-major, so that the caller's
    ``out.transpose(1, 2).reshape(B, Nq, H * Dv)`` (every multi-head attention does it) is a free view."""
    return (NQ * H * DV, DV, H * DV, 1)


def attention_forward(q, k, v, bias4, table_t, index, scale, deterministic=False):
    """q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] (one dtype, last stride 1); bias4: a 4-D view
    broadcastable to [B,H,Nq,Nk] or None; table_t: [H, T] fp32 contiguous or None; index: compact
    [Nq, Nk] int16/int32 (from ``index_plan``) or None.

    Returns (out [B,H,Nq,Dv] in q.dtype, stored [B,Nq,H,Dv]-major so that ``out.transpose(1, 2)`` is
    contiguous; lse [B,H,Nq] fp32 in log2 units)."""
    B, H, NQ, _ = q.shape
    DV = v.shape[-1]
    out = torch.empty_strided((B, H, NQ, DV), out_strides(B, H, NQ, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    interpret = is_interpreted(_attn_fwd_kernel)
    _launch(fwd_launch(q, k, v, out, lse, bias4, table_t, index, scale, interpret,
                       DETERMINISTIC_FWD if deterministic or not AUTOTUNE else None))
    return out, lse


def attention_backward(do, q, k, v, out, lse, bias4, table_t, index, index_t, positions, scale,
                       bias_grad, bias_batched=False, deterministic=False):
    """Gradients of ``attention_forward``. ``do`` has out's shape (any strides with a unit last stride).

    Returns (dq, dk, dv, dbias): dbias is None unless ``bias_grad``; then, for a table, the table gradient
    [T, H] fp32; for a dense bias, the per-group partial sums [G, H, Nq, Nk] fp32 (G = B when
    ``bias_batched``: the bias has a batch dimension and partial[b] is its gradient), to be reduced by the
    caller over the dims the bias broadcasts over."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[-1]
    dev = q.device
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, NK, D), dtype=q.dtype, device=dev)
    dv = torch.empty((B, H, NK, DV), dtype=q.dtype, device=dev)
    has_bias = bias4 is not None or table_t is not None
    bias_grad = bool(bias_grad) and has_bias
    interpret = is_interpreted(_attn_bwd_dq_kernel)
    if B * H == 0 or NQ == 0 or NK == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        dbias = None
        if bias_grad:
            dbias = (torch.zeros((table_t.shape[1], H), dtype=torch.float32, device=dev) if table_t is not None
                     else torch.zeros((B if bias_batched else 1, H, NQ, NK), dtype=torch.float32, device=dev))
        return dq, dk, dv, dbias
    if bias_batched:
        groups, per = B, 1
    else:
        groups, per = batch_groups(B, H, NQ, interpret, device=dev)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=dev)
    part = torch.empty((groups, H, NQ, NK), dtype=torch.float32, device=dev) if bias_grad else None
    _launch(dq_launch(q, k, v, out, do, lse, delta, dq, part, bias4, table_t, index, scale, groups, per,
                      bias_grad, interpret, DETERMINISTIC_DQ if deterministic or not AUTOTUNE else None))
    _launch(dkdv_launch(q, k, v, do, lse, delta, dk, dv, bias4, table_t, index_t, scale, interpret,
                        DETERMINISTIC_DKDV if deterministic or not AUTOTUNE else None))
    dbias = None
    if bias_grad:
        if table_t is not None:
            T = table_t.shape[1]
            dbias = torch.empty((T, H), dtype=torch.float32, device=dev)
            _launch(table_grad_launch(part, positions, dbias, interpret))
        else:
            dbias = part
    return dq, dk, dv, dbias
