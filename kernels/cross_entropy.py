"""Fused linear + softmax cross-entropy for the BEiT head (Triton + cuBLAS), forward and backward.

Design (chunked, gradients formed during the forward pass; see KERNELS.md for the reasoning):

for each chunk of rows (the chunk size bounds the transient logits to ``MAX_CHUNK_BYTES``):
    1. logits_chunk = hidden_chunk @ weight.T (+ bias)      cuBLAS, stored in the *input* dtype
                                                           (bf16/fp16 under mixed precision; the full
                                                           [rows, V] logits never exist, in any dtype)
    2. ``_ce_rows_kernel`` (Triton, one row per program): fp32 online log-sum-exp, the row loss
       (lse - logit[label]), argmax == label (accuracy) and, when gradients are wanted, the logits
       gradient  (softmax - onehot) * row_scale  written *in place* over the logits chunk
    3. grad_hidden_chunk = dlogits @ weight; grad_weight += dlogits.T @ hidden_chunk (fp32 accumulator);
       grad_bias += dlogits.sum(0) (fp32)                    cuBLAS

For reduction "mean"/"sum" the gradients are computed in the forward with row_scale = 1 and scaled by
grad_output (/ number of counted rows for "mean") in the backward: a device-side scalar, so there is no
host synchronisation anywhere. For reduction "none" the backward needs per-row scales, so it re-runs
the same loop with row_scale = grad_output.

Ignored rows (label == ignore_index) get loss 0, no accuracy count and a zero gradient row. A label
outside [0, V) that is not ignore_index cannot be detected on the host without a synchronisation on
CUDA; the kernel turns such a row's loss and gradient into NaN so the error is visible, never silent.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import is_interpreted, next_pow2

# Transient logits budget per chunk (bytes). 32 MiB = 2048 rows x 8192 classes in bf16: large enough for
# efficient cuBLAS GEMMs, small enough to stay mostly L2-resident on an H100 (50 MB L2) between the GEMM
# that writes a chunk and the kernels that read it back.
MAX_CHUNK_BYTES = 32 * 1024 * 1024
# Largest vocabulary tile of the row kernel. A row up to this size is held in registers between the
# log-sum-exp and the gradient pass (single-block path); longer rows are streamed twice.
MAX_BLOCK_V = 8192
GPU_NUM_WARPS = 16


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row,
    labels_ptr,
    loss_ptr, correct_ptr,
    scale_ptr,
    V, ignore_index,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    cols = tl.arange(0, BLOCK_V)

    if ONE_BLOCK:
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        s = tl.sum(e, axis=0)
        best_idx = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64)
    else:
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        best = m
        best_idx = tl.sum(tl.zeros((BLOCK_V,), tl.int64), axis=0)
        for v0 in range(0, V, BLOCK_V):
            vs = v0 + cols
            xb = tl.load(base + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
            bm = tl.max(xb, axis=0)
            bi = tl.argmax(xb, axis=0, tie_break_left=True).to(tl.int64) + v0
            better = bm > best  # strict: the earliest block wins ties, like torch.argmax
            best_idx = tl.where(better, bi, best_idx)
            best = tl.where(better, bm, best)
            m_new = tl.maximum(m, bm)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new), axis=0)
            m = m_new
    lse = m + tl.log(s)

    x_label = tl.load(base + label, mask=valid & in_range, other=0.0).to(tl.float32)
    bad = valid & (in_range == 0)
    loss = tl.where(valid, lse - x_label, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    correct = valid & in_range & (best_idx == label)
    tl.store(correct_ptr + row, correct.to(tl.float32))

    if WRITE_GRAD:
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        else:
            scale = 1.0
        scale = tl.where(valid, scale, 0.0)
        scale = tl.where(bad, float("nan"), scale)
        if ONE_BLOCK:
            p = e * (1.0 / s)
            g = (p - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)
        else:
            for v0 in range(0, V, BLOCK_V):
                vs = v0 + cols
                xb = tl.load(base + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
                p = tl.exp(xb - lse)
                g = (p - tl.where(vs == label, 1.0, 0.0)) * scale
                tl.store(base + vs, g.to(logits_ptr.dtype.element_ty), mask=vs < V)


def rows_launch(logits, labels, loss, correct, scale, ignore_index, write_grad, interpret):
    """Launch arguments of the row kernel (shared with the ahead-of-time compile check)."""
    R, V = logits.shape
    block_v = min(next_pow2(V), MAX_BLOCK_V)
    args = [logits, logits.stride(0), labels, loss, correct, scale if scale is not None else loss,
            V, ignore_index]
    constexprs = dict(HAS_SCALE=scale is not None, WRITE_GRAD=bool(write_grad), BLOCK_V=block_v,
                      ONE_BLOCK=block_v >= V)
    opts = {"num_warps": 4 if interpret else GPU_NUM_WARPS, "num_stages": 1}
    return _ce_rows_kernel, (R,), args, constexprs, opts


def chunk_rows(M: int, V: int, elem_size: int) -> int:
    rows = max(1, MAX_CHUNK_BYTES // max(1, V * elem_size))
    if rows >= 64:
        rows = rows // 64 * 64
    return max(1, min(M, rows))


def _has_addmm_out_dtype() -> bool:
    try:
        return hasattr(torch.ops.aten.addmm, "dtype_out")
    except Exception:  # pragma: no cover
        return False


_ADDMM_OUT_DTYPE = _has_addmm_out_dtype()


def _accumulate_weight_grad(gw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """gw (fp32) += dlogits.T @ h, accumulating in fp32 without an fp32 copy of the operands where
    cuBLAS allows it."""
    if dlogits.dtype == torch.float32:
        gw.addmm_(dlogits.t(), h)
    elif dlogits.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(gw, dlogits.t(), h, out_dtype=torch.float32, out=gw)
    else:  # CPU (interpreter tests) or an older torch: per-chunk low-precision product, fp32 sum
        gw.add_(torch.mm(dlogits.t(), h).float())


def linear_ce_chunked(hidden, weight, bias, labels, ignore_index, need_gh, need_gw, need_gb,
                      row_scale=None, compute_grads=True):
    """Core loop. hidden [M, D], weight [V, D], bias [V] | None (all one dtype, contiguous),
    labels [M] int64, row_scale [M] fp32 | None.

    Returns (loss_rows [M] fp32, correct_rows [M] fp32, gh [M, D] hidden.dtype | None,
    gw [V, D] fp32 | None, gb [V] fp32 | None). Gradients are of sum_r row_scale[r] * loss_r
    (row_scale = 1 when None)."""
    M, D = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    want_grad = compute_grads and (need_gh or need_gw or need_gb)
    loss_rows = torch.empty(M, dtype=torch.float32, device=dev)
    correct_rows = torch.empty(M, dtype=torch.float32, device=dev)
    gh = torch.empty_like(hidden) if (want_grad and need_gh) else None
    gw = torch.zeros((V, D), dtype=torch.float32, device=dev) if (want_grad and need_gw) else None
    gb = torch.zeros((V,), dtype=torch.float32, device=dev) if (want_grad and need_gb) else None
    if M == 0:
        return loss_rows, correct_rows, gh, gw, gb

    interpret = is_interpreted(_ce_rows_kernel)
    rows = chunk_rows(M, V, hidden.element_size())
    buf = torch.empty((rows, V), dtype=dt, device=dev)
    wt = weight.t()
    for s in range(0, M, rows):
        e = min(M, s + rows)
        h = hidden[s:e]
        lg = buf[: e - s]
        if bias is not None:
            torch.addmm(bias, h, wt, out=lg)
        else:
            torch.mm(h, wt, out=lg)
        kernel, grid, args, constexprs, opts = rows_launch(
            lg, labels[s:e], loss_rows[s:e], correct_rows[s:e],
            row_scale[s:e] if row_scale is not None else None, ignore_index, want_grad, interpret)
        kernel[grid](*args, **constexprs, **opts)
        if not want_grad:
            continue
        # lg now holds d(loss)/d(logits) for this chunk
        if gh is not None:
            torch.mm(lg, weight, out=gh[s:e])
        if gw is not None:
            _accumulate_weight_grad(gw, lg, h)
        if gb is not None:
            gb.add_(lg.sum(0, dtype=torch.float32))
    return loss_rows, correct_rows, gh, gw, gb
