"""The loss stage: each model and its training loss as ONE ``nn.Module``.

* :class:`MIMLoss` - pretraining: ``forward(images, bool_masked_pos, tokens) -> (loss, mlm_acc)``, the eager
  reference (``F.cross_entropy`` over the masked positions) or the fast static-shape form (the fused linear +
  cross-entropy over ``num_masked`` rows per image).
* :class:`ClassificationLoss` - fine-tuning: ``forward(images, targets) -> (loss, acc)`` with hard labels
  (label smoothing applied here) or the soft targets of mixup / cutmix; built by :func:`build_finetune_loss`.

A training engine calls the model only through these modules, so a DDP or FSDP2 wrapper around one sees
every forward, and ``torch.compile`` compiles one as a single graph (forward, loss and, through autograd,
the backward). Both return 0-dim tensors and never read a value on the host (no ``.item()``, no
data-dependent shapes in the fast forms): a training step can run without any device synchronisation,
checking ``torch.isfinite(loss)`` on the device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.amp import autocast_or_null

__all__ = [
    "IGNORE_INDEX", "mim_loss_reference", "MIMLoss", "soft_target_cross_entropy", "classification_loss",
    "ClassificationLoss", "build_finetune_loss",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------
def mim_loss_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over masked positions (fp32) and MIM accuracy: ``logits [M, V]``, ``labels [M]``."""
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


class MIMLoss(nn.Module):
    """The model and the masked-image-modeling loss as one module: ``forward(images [B,3,H,W],
    bool_masked_pos [B,N] bool, tokens [B,N] int64) -> (loss, mlm_acc)`` (0-dim tensors).

    ``num_masked=None``: the eager reference, ``F.cross_entropy(model(x, mask), tokens[mask])``.
    ``num_masked=K``: the fast static-shape form, ``model.forward_masked_hidden`` (K rows per image,
    padded rows ignored) into the fused linear + cross-entropy op; the same loss.
    ``amp_dtype``: autocast dtype of the model's forward (None: fp32). This is the module DDP wraps and
    FSDP2 shards as its root, so that their hooks run for either form.
    """

    def __init__(self, model: nn.Module, num_masked: int | None = None, amp_dtype: torch.dtype | None = None,
                 ops_backend: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_masked = None if num_masked is None else int(num_masked)
        self.amp_dtype = amp_dtype
        self.ops_backend = ops_backend

    def _autocast(self, device_type: str):
        return autocast_or_null(device_type, self.amp_dtype)

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_masked is None:
            with self._autocast(images.device.type):
                logits = self.model(images, bool_masked_pos)
            return mim_loss_reference(logits, tokens[bool_masked_pos])
        from ..ops.cross_entropy import masked_linear_cross_entropy

        with self._autocast(images.device.type):
            hidden, index = self.model.forward_masked_hidden(images, bool_masked_pos, self.num_masked)
        real = bool_masked_pos.gather(1, index)
        labels = tokens.gather(1, index).masked_fill(~real, IGNORE_INDEX).reshape(-1)
        head = self.model.lm_head
        dtype = self.amp_dtype or hidden.dtype
        bias = head.bias.to(dtype) if head.bias is not None else None
        return masked_linear_cross_entropy(
            hidden.to(dtype), head.weight.to(dtype), bias, labels, ignore_index=IGNORE_INDEX,
            return_accuracy=True, backend=self.ops_backend,
        )


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------
def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum(-targets * log_softmax(logits))`` (timm ``SoftTargetCrossEntropy``), in
    fp32 whatever the logits' dtype: ``logits [B, C]`` (e.g. bf16 under autocast), ``targets [B, C]``."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes and dtypes only (metadata: no device synchronisation)."""
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits [B, classes], got shape {tuple(logits.shape)}")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)} ([B, classes]), "
                             f"got {tuple(targets.shape)}")
    elif targets.dtype in (torch.int64, torch.int32):
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"class labels must have shape [B] = [{logits.shape[0]}], got {tuple(targets.shape)}")
    else:
        raise TypeError(f"targets must be int64 class labels [B] or float soft targets [B, classes], got "
                        f"dtype {targets.dtype}")


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuning loss and training accuracy, both 0-dim fp32 (the accuracy without gradient).

    ``targets``: int64 class labels ``[B]`` -> ``F.cross_entropy(logits.float(), targets,
    label_smoothing=label_smoothing)``; or float soft targets ``[B, C]`` (mixup / cutmix, with the label
    smoothing already folded in by :func:`beit_fast.finetune.build_mixup`) ->
    :func:`soft_target_cross_entropy`, ``label_smoothing`` unused. These are exactly the two losses of the
    eager fine-tuning step, computed in fp32 from bf16/fp16 logits. Accuracy: argmax of the logits against
    the label (soft targets: against their largest class).
    """
    _check_targets(logits, targets)
    if targets.is_floating_point():
        loss = soft_target_cross_entropy(logits, targets)
        labels = targets.argmax(-1)
    else:
        loss = F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)
        labels = targets
    with torch.no_grad():
        acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


class ClassificationLoss(nn.Module):
    """A classifier and its fine-tuning loss as one module: ``forward(images [B, C, H, W], targets) ->
    (loss, acc)`` (0-dim fp32; :func:`classification_loss` on ``model(images)``).

    ``model``: any module returning logits ``[B, classes]`` (ours, or e.g. a timm model). ``amp_dtype``:
    autocast dtype of the model's forward (None: fp32); the loss is computed in fp32 from its logits.
    ``label_smoothing``: applied to int64 labels; soft targets are taken as they are. No host
    synchronisation and static shapes: ``torch.compile(ClassificationLoss(...), fullgraph=True,
    dynamic=False)`` is one graph (with the model's fast path: see :func:`build_finetune_loss`).
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        label_smoothing = float(label_smoothing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = model
        self.amp_dtype = amp_dtype
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_or_null(images.device.type, self.amp_dtype):
            logits = self.model(images)
        return classification_loss(logits, targets, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"amp_dtype={self.amp_dtype}, label_smoothing={self.label_smoothing}"


def build_finetune_loss(
    model: nn.Module, amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0, fast: bool = True, *,
    attention: str = "auto", activation_checkpointing: str | int = "none",
) -> ClassificationLoss:
    """The fine-tuning loss module for ``model`` (a :class:`beit_fast.model.beit.VisionTransformerForClassification`).

    ``fast=False``: the eager fine-tuning step's forward and loss, with the model as it is configured (its
    default is the eager reference). ``fast=True``: first ``model.configure_fast_path(attention,
    activation_checkpointing)`` - "auto" picks the fastest attention that runs here ("triton": our kernel
    with each block's own table gathered in-kernel), checkpointing "none" / "all" / every k-th block.
    Either way the returned :class:`ClassificationLoss` is uncompiled; the caller (the training engine)
    wraps it (DDP) and compiles it, e.g. ``torch.compile(loss, fullgraph=True, dynamic=False)``: one graph
    for forward + loss, one for the backward, no host synchronisation; same loss and gradients as the eager
    step (tests/test_finetune_fast.py). Pair it with fused AdamW over
    :func:`beit_fast.train.optim.param_groups_layer_decay` (groups with different lr are fine for fused AdamW).
    """
    if fast:
        if not hasattr(model, "configure_fast_path"):
            raise TypeError(f"fast=True needs a beit_fast classifier (with configure_fast_path), got "
                            f"{type(model).__name__}; use fast=False (or ClassificationLoss) for other models")
        model.configure_fast_path(attention=attention, activation_checkpointing=activation_checkpointing)
    return ClassificationLoss(model, amp_dtype=amp_dtype, label_smoothing=label_smoothing)
