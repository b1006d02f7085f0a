"""The patch-embedding forward kernel (``_pe_fwd_kernel``); launched by ``patch_embed.py``, whose docstring
describes the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


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
