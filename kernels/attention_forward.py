"""The attention forward kernel (``_attn_fwd_kernel``) and the in-kernel helpers it shares with the backward
kernels (``attention_backward.py``); launched by ``attention.py``, whose docstring describes the kernels."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)

BIAS_NONE, BIAS_DENSE, BIAS_TABLE = 0, 1, 2


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
