"""Fused linear + softmax cross-entropy for BEiT's masked-token head (|V| = 8192).

``masked_linear_cross_entropy(hidden, weight, bias, labels, ...)`` equals
``masked_linear_cross_entropy_reference``, which is precisely:

    h = hidden.reshape(-1, D).float(); y = labels.reshape(-1)
    logits = F.linear(h, weight.float(), bias.float() if bias is not None else None)   # fp32
    "none": F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none").reshape(labels.shape)
            (0 at ignored rows)
    "sum":  F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    "mean": F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum") / max(count, 1)
            with count = number of rows whose label != ignore_index. This is F.cross_entropy's "mean"
            whenever count > 0; with no counted rows it is 0.0 with zero gradients (F.cross_entropy
            would give NaN).
    accuracy (return_accuracy=True): (#counted rows with logits.argmax(-1) == label) / max(count, 1),
            a 0-dim fp32 tensor without grad (ties: lowest index, like torch.argmax).

The loss is always fp32 (computed with fp32 log-sum-exp); gradients have the dtype of the input they
belong to.

Triton backend: see ``beit_fast/kernels/cross_entropy.py`` (chunked cuBLAS GEMMs + one Triton kernel
that does the online softmax, loss, accuracy and writes the logits gradient in place; the full [rows, V]
logits are never stored, only one chunk at a time in the input dtype). Logits, and hence the argmax for
the accuracy, are formed in the input dtype there (bf16 logits under bf16 training, fp32 accumulation
inside the GEMM), as F.linear would do under autocast; the reference forms them in fp32.

Label range: a label outside [0, V) that is not ``ignore_index`` raises ValueError for CPU tensors
(checked eagerly; costs no device sync). On CUDA it is NOT checked on the host, which would need a
device->host sync: the reference path then hits F.cross_entropy's device-side assert, the Triton path
returns NaN for that row's loss and gradient (so the mean is NaN: visible, never silently wrong).

Autocast does not apply inside this op: pass hidden, weight and bias in one dtype (e.g.
``weight.to(hidden.dtype)``, a differentiable cast).
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
    is_compiling,
)
from .backend import resolve_backend, triton_available

__all__ = ["masked_linear_cross_entropy", "masked_linear_cross_entropy_reference"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_label_range(labels: Tensor, V: int, ignore_index: int) -> None:
    """Eager label check, only for CPU tensors (no device sync)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {V}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} bad labels)"
        )


def _check_inputs(hidden, weight, bias, labels, ignore_index, reduction):
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("bias", bias, allow_none=True)
    check_tensor("labels", labels)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [M, D] or [B, N, D], got shape {tuple(hidden.shape)}")
    check_float_dtype("hidden", hidden)
    check_same_dtype("hidden", hidden, weight=weight, bias=bias)
    if labels.dtype != torch.long:
        raise TypeError(f"labels must be int64 (torch.long), got dtype {labels.dtype}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(
            f"weight must be [V, D] with D = {D} (hidden {tuple(hidden.shape)}), got shape {tuple(weight.shape)}"
        )
    V = weight.shape[0]
    if V < 1 or D < 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} has an empty dimension")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)} "
            f"(expected {tuple(hidden.shape[:-1])})"
        )
    return V, D


def masked_linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_accuracy: bool = False,
):
    """Plain PyTorch definition in fp32 (see the module docstring for the exact formula)."""
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D).float()
    y = labels.reshape(-1)
    logits = F.linear(h, weight.float(), bias.float() if bias is not None else None)
    counted = y != ignore_index
    count = counted.sum().to(torch.float32)
    denom = count.clamp(min=1.0)
    if reduction == "none":
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    elif reduction == "sum":
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    else:
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum") / denom
    if not return_accuracy:
        return loss
    with torch.no_grad():
        correct = ((logits.argmax(-1) == y) & counted).sum().to(torch.float32)
        accuracy = correct / denom
    return loss, accuracy


# --------------------------------------------------------------------------------------------------
# torch.library registration (the Triton path)
# --------------------------------------------------------------------------------------------------
def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("beit_fast::masked_linear_cross_entropy", mutates_args=())
def _ce_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, accuracy, count, grad_hidden*, grad_weight*, grad_bias*). The starred gradients are
    precomputed for reduction "mean"/"sum" (of the *summed* loss, fp32 for weight/bias) and empty
    otherwise; the autograd rule scales them by grad_output (/ count for "mean")."""
    from beit_fast.kernels.cross_entropy import linear_ce_chunked

    _check_label_range(labels, weight.shape[0], ignore_index)
    with autocast_off(hidden.device):
        precompute = reduction != "none"
        loss_rows, correct_rows, gh, gw, gb = linear_ce_chunked(
            hidden, weight, bias, labels, ignore_index,
            need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None,
            compute_grads=precompute,
        )
        count = (labels != ignore_index).sum().to(torch.float32)
        denom = count.clamp(min=1.0)
        accuracy = correct_rows.sum() / denom
        if reduction == "none":
            loss = loss_rows
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / denom
    return (
        loss,
        accuracy,
        count,
        gh if gh is not None else _empty(hidden),
        gw if gw is not None else _empty(loss_rows),
        gb if gb is not None else _empty(loss_rows),
    )


@_ce_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, need_grad_hidden, need_grad_weight, need_grad_bias):
    M, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    pre = reduction != "none"
    return (
        hidden.new_empty((M,) if reduction == "none" else (), **f32),
        hidden.new_empty((), **f32),
        hidden.new_empty((), **f32),
        hidden.new_empty((M, D)) if (pre and need_grad_hidden) else hidden.new_empty((0,)),
        hidden.new_empty((V, D), **f32) if (pre and need_grad_weight) else hidden.new_empty((0,), **f32),
        hidden.new_empty((V,), **f32) if (pre and need_grad_bias and bias is not None)
        else hidden.new_empty((0,), **f32),
    )


@torch.library.custom_op("beit_fast::masked_linear_cross_entropy_backward", mutates_args=())
def _ce_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_r grad_rows[r] * loss_r (reduction "none"): recomputes the chunks."""
    from beit_fast.kernels.cross_entropy import linear_ce_chunked

    with autocast_off(hidden.device):
        _, _, gh, gw, gb = linear_ce_chunked(
            hidden, weight, bias, labels, ignore_index,
            need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None,
            row_scale=grad_rows.to(torch.float32).contiguous(),
        )
    return (
        gh if gh is not None else _empty(hidden),
        gw.to(weight.dtype) if gw is not None else _empty(weight),
        gb.to(weight.dtype) if gb is not None else _empty(weight),
    )


@_ce_backward_op.register_fake
def _(hidden, weight, bias, labels, grad_rows, ignore_index, need_grad_hidden, need_grad_weight, need_grad_bias):
    return (
        hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty((0,)),
        weight.new_empty((weight.shape[0],)) if (need_grad_bias and bias is not None) else weight.new_empty((0,)),
    )


def _ce_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, n_h, n_w, n_b = inputs
    loss, accuracy, count, gh, gw, gb = output
    ctx.reduction = reduction
    ctx.ignore_index = ignore_index
    ctx.flags = (n_h, n_w, n_b and bias is not None)
    ctx.dtype = hidden.dtype
    ctx.mark_non_differentiable(accuracy, count, gh, gw, gb)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(count, gh, gw, gb)


def _ce_backward(ctx, g_loss, *unused):
    n_h, n_w, n_b = ctx.flags
    if not (n_h or n_w or n_b):
        return (None,) * 9
    if ctx.reduction == "none":
        hidden, weight, bias, labels = ctx.saved_tensors
        gh, gw, gb = torch.ops.beit_fast.masked_linear_cross_entropy_backward(
            hidden, weight, bias, labels, g_loss, ctx.ignore_index, n_h, n_w, n_b
        )
    else:
        count, gh, gw, gb = ctx.saved_tensors
        scale = g_loss.to(torch.float32)
        if ctx.reduction == "mean":
            scale = scale / count.clamp(min=1.0)
        # a 0-dim fp32 scale does not promote: gh stays in its dtype, multiplied in fp32 opmath
        gh = gh * scale
        gw = (gw * scale).to(ctx.dtype)
        gb = (gb * scale).to(ctx.dtype)
    return (gh if n_h else None, gw if n_w else None, gb if n_b else None) + (None,) * 6


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def masked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_accuracy: bool = False,
    backend: str | None = None,
):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``, fused.

    Args:
        hidden: [M, D] or [B, N, D] (fp32/fp16/bf16).
        weight: [V, D] (the head's ``nn.Linear`` weight), same dtype as hidden.
        bias: [V] or None.
        labels: int64, shape hidden.shape[:-1]; ``ignore_index`` marks rows that do not count.
        reduction: "mean" (over counted rows; 0.0 if none count), "sum" or "none" (shape of labels).
        return_accuracy: also return the fraction of counted rows whose argmax equals the label
            (0-dim fp32, no grad), computed in the same pass.
        backend: "auto" | "reference" | "triton" | None (global setting).

    Returns:
        loss (fp32), or (loss, accuracy) with return_accuracy=True.
    """
    V, D = _check_inputs(hidden, weight, bias, labels, ignore_index, reduction)
    if not is_compiling():
        _check_label_range(labels, V, ignore_index)
    which = resolve_backend(backend, hidden, weight, bias, labels)
    if which == "reference":
        with autocast_off(hidden.device):
            return masked_linear_cross_entropy_reference(
                hidden, weight, bias, labels, ignore_index, reduction, return_accuracy
            )
    grad_on = torch.is_grad_enabled()
    loss, accuracy, _, _, _, _ = torch.ops.beit_fast.masked_linear_cross_entropy(
        hidden.reshape(-1, D).contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        labels.reshape(-1).contiguous(),
        ignore_index,
        reduction,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return (loss, accuracy) if return_accuracy else loss


triton_available()  # resolve the backend status once, at import (see backend._triton_status)
