"""The "triton" backend of :mod:`beit_fast.ops.attention`: two ``torch.library`` custom ops
(``beit_fast::attention_forward`` / ``beit_fast::attention_backward``) around the launchers of
``beit_fast/kernels/attention.py`` (kernels in ``attention_forward.py`` / ``attention_backward.py``), with
their fake (meta) versions and autograd, so that ``torch.compile(fullgraph=True)`` traces through them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._util import autocast_off
from .attention_backends import _as_4d

def _table_plan(table: Tensor, index: Tensor):
    """(table^T [H, T] fp32 contiguous, compact index, compact index^T, position list) for the kernels."""
    from beit_fast.kernels.attention_plan import index_plan

    compact, compact_t, positions = index_plan(index, table.shape[0])
    return table.t().to(torch.float32).contiguous(), compact, compact_t, positions


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("beit_fast::attention_forward", mutates_args=())
def _triton_forward_op(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], table: Optional[Tensor], index: Optional[Tensor],
    scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] stored [B, Nq, H, Dv]-major, lse [B, H, Nq] fp32): the bias is ``bias``
    (broadcastable to [B, H, Nq, Nk]), or ``table[index]`` (table [T, H], index [Nq, Nk]), or none."""
    from beit_fast.kernels import attention as kernels

    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    table_t = compact = None
    if table is not None:
        table_t, compact, _, _ = _table_plan(table, index)
    with autocast_off(q.device):
        return kernels.attention_forward(q, k, v, None if bias is None else _as_4d(bias), table_t, compact,
                                         scale, deterministic)


@_triton_forward_op.register_fake
def _(q, k, v, bias, table, index, scale, deterministic):
    from beit_fast.kernels.attention import out_strides

    b, h, nq, _ = q.shape
    dv = v.shape[-1]
    out = q.new_empty_strided((b, h, nq, dv), out_strides(b, h, nq, dv))
    return out, q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("beit_fast::attention_backward", mutates_args=())
def _triton_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    table: Optional[Tensor], index: Optional[Tensor], scale: float, bias_grad: bool, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias): dbias is the table's gradient [T, H] (table given), the dense bias's gradient in
    its shape and dtype (bias given), or an empty tensor (no bias, or ``bias_grad`` False)."""
    from beit_fast.kernels import attention as kernels

    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    table_t = compact = compact_t = positions = bias4 = None
    if table is not None:
        table_t, compact, compact_t, positions = _table_plan(table, index)
    if bias is not None:
        bias4 = _as_4d(bias)
    with autocast_off(q.device):
        dq, dk, dv, db = kernels.attention_backward(
            dout, q, k, v, out, lse, bias4, table_t, compact, compact_t, positions, scale, bias_grad,
            bias_batched=bias4 is not None and bias4.shape[0] > 1, deterministic=deterministic,
        )
        if db is None:
            db = q.new_empty((0,))
        elif table is not None:
            db = db.to(table.dtype)
        else:  # per-group partial sums [G, H, Nq, Nk] -> the bias's own (broadcast) shape
            if bias4.shape[0] == 1:
                db = db.sum(0, keepdim=True)
            db = db.sum_to_size(bias4.shape).reshape(bias.shape).to(bias.dtype).contiguous()
    return dq, dk, dv, db


@_triton_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, table, index, scale, bias_grad, deterministic):
    if bias_grad and table is not None:
        db = table.new_empty(table.shape)
    elif bias_grad and bias is not None:
        db = bias.new_empty(bias.shape)
    else:
        db = q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _triton_setup_context(ctx, inputs, output):
    q, k, v, bias, table, index, scale, deterministic = inputs
    out, lse = output
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, bias, table, index)


def _triton_backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, table, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias_grad = (bias is not None and need[3]) or (table is not None and need[4])
    dq, dk, dv, db = torch.ops.beit_fast.attention_backward(
        dout, q, k, v, out, lse, bias, table, index, ctx.scale, bias_grad, ctx.deterministic
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        db if bias is not None and need[3] else None,
        db if table is not None and need[4] else None,
        None, None, None,
    )


_triton_forward_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _triton_attention(q, k, v, bias, scale, table=None, index=None):
    out, _ = torch.ops.beit_fast.attention_forward(
        q, k, v, bias, table, index, float(scale), torch.are_deterministic_algorithms_enabled()
    )
    return out
