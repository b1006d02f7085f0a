"""One BEiT pretraining step: tokenize, mask, predict the masked tokens, update.

This is the eager reference step (the official ``engine_for_pretraining.py`` semantics): logits for
masked positions only, mean cross-entropy over all masked positions of the batch, MIM accuracy,
AdamW under per-step lr/wd schedules, gradient clipping, autocast with a loss scaler for fp16.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "resolve_amp_dtype", "mim_loss_reference", "StepResult", "PretrainEngine", "FastPretrainEngine",
    "tokenize", "token_agreement",
]

IGNORE_INDEX = -100


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA cards that support it, else fp16 on CUDA, none on CPU."""
    amp = amp.lower()
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use --amp bf16 or none on CPU")
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ValueError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or none")


def mim_loss_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over masked positions (fp32) and MIM accuracy: ``logits [M, V]``, ``labels [M]``."""
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


@torch.no_grad()
def tokenize(tokenizer: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token ids ``int64[B, h*w]``; ``dtype`` None: the tokenizer's own fp32 path, else its encoder under
    autocast to ``dtype`` with channels-last activations (argmax taken in fp32)."""
    if dtype is None:
        return tokenizer.get_codebook_indices(images)
    x = tokenizer._prepare_images(images).contiguous(memory_format=torch.channels_last)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.autocast(x.device.type, dtype=dtype):
            logits = tokenizer.encode_logits(x)
    finally:
        tokenizer.train(was_training)
    return logits.float().argmax(dim=1).flatten(1)


@torch.no_grad()
def token_agreement(tokenizer: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of positions whose token id in ``dtype`` equals the fp32 one (1.0 = identical)."""
    return (tokenize(tokenizer, images, dtype) == tokenize(tokenizer, images)).float().mean().item()


@dataclass
class StepResult:
    """Host-side metrics of one step; ``skipped`` when the loss was not finite and no update was made."""

    loss: float
    mlm_acc: float
    grad_norm: float
    loss_scale: float
    lr: float
    min_lr: float
    weight_decay: float
    skipped: bool = False


class PretrainEngine:
    """Runs training steps for a model and a frozen tokenizer.

    ``batch = (images [B,3,H,W] float, tokenizer_images [B,3,h,w] float, bool_masked_pos [B,N] bool)``.
    The lr of each parameter group at step t is ``lr_schedule[t] * group["lr_scale"]``; groups with
    weight decay get ``wd_schedule[t]``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lr_schedule: np.ndarray,
        wd_schedule: np.ndarray,
        amp_dtype: torch.dtype | None = None,
        clip_grad: float | None = 3.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.device = device
        self.lr_schedule = lr_schedule
        self.wd_schedule = wd_schedule
        self.amp_dtype = amp_dtype
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.tokenizer_dtype: torch.dtype | None = None  # None: fp32 tokenizer (see choose_tokenizer_precision)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_schedule(self, step: int) -> None:
        step = min(step, len(self.lr_schedule) - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[step]) * group.get("lr_scale", 1.0)
            if group["weight_decay"] > 0:
                group["weight_decay"] = float(self.wd_schedule[step])

    def choose_tokenizer_precision(
        self, tokenizer_images: torch.Tensor, dtype: torch.dtype = torch.bfloat16, min_agreement: float = 0.99
    ) -> float:
        """Run the tokenizer in ``dtype`` (channels-last) from now on if, on these images, its token ids
        agree with fp32 on at least ``min_agreement`` of the positions; returns the measured agreement."""
        agreement = token_agreement(self.tokenizer, tokenizer_images.to(self.device), dtype)
        self.tokenizer.to(memory_format=torch.channels_last)
        self.tokenizer_dtype = dtype if agreement >= min_agreement else None
        return agreement

    @torch.no_grad()
    def tokenize(self, tokenizer_images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Visual tokens of every patch, ``int64[B, N]``, row-major."""
        tokens = tokenize(self.tokenizer, tokenizer_images, self.tokenizer_dtype).flatten(1)
        if tokens.shape != bool_masked_pos.shape:
            raise ValueError(
                f"tokenizer grid ({tokens.shape[1]} tokens) does not match the mask ({bool_masked_pos.shape[1]} "
                "patches): the tokenizer view must be input_size / patch_size * 8 pixels wide"
            )
        return tokens

    def compute_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over masked positions and MIM accuracy (0-dim tensors)."""
        with self.autocast():
            logits = self.model(images, bool_masked_pos)
        return mim_loss_reference(logits, tokens[bool_masked_pos])

    def train_step(self, batch, step: int) -> StepResult:
        images, tokenizer_images, bool_masked_pos = (t.to(self.device, non_blocking=True) for t in batch)
        bool_masked_pos = bool_masked_pos.flatten(1).bool()
        self.set_schedule(step)
        tokens = self.tokenize(tokenizer_images, bool_masked_pos)
        self.model.train()
        loss, acc = self.compute_loss(images, bool_masked_pos, tokens)
        loss_value = loss.item()
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        wd = max((g["weight_decay"] for g in self.optimizer.param_groups), default=0.0)
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_value):
            return StepResult(loss_value, float("nan"), float("nan"), self.scaler.get_scale(), max(lrs), min(lrs), wd, True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(
            loss_value, acc.item(), grad_norm.item(), self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            max(lrs), min(lrs), wd,
        )

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class FastPretrainEngine(PretrainEngine):
    """The same step through the fast path, with static shapes so it compiles to one graph.

    The model's fast switches (fused patch embedding + mask, fused attention, activation checkpointing)
    are set with ``model.configure_fast_path``. The head and loss run as one fused linear +
    cross-entropy over exactly ``num_masked`` rows per image: masked positions first (row-major), padded
    with ignored rows for images the official mask generator left short of the target. The loss is the
    mean over real masked rows, i.e. the reference's ``F.cross_entropy(lm_head(x[mask]), tokens[mask])``.
    """

    def __init__(self, *args, num_masked: int, compile: bool = True, ops_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_masked = int(num_masked)
        self.ops_backend = ops_backend
        self._loss_fn = torch.compile(self._fast_loss, fullgraph=True, dynamic=False) if compile else self._fast_loss

    def _fast_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .ops.cross_entropy import masked_linear_cross_entropy

        with self.autocast():
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

    def compute_loss(self, images, bool_masked_pos, tokens):
        if int(bool_masked_pos.shape[1]) < self.num_masked:
            raise ValueError(f"num_masked {self.num_masked} exceeds the {bool_masked_pos.shape[1]} patches")
        # Rows past num_masked would be dropped silently; checked on the device, without a host sync.
        torch._assert_async((bool_masked_pos.sum(1) <= self.num_masked).all(),
                            "an image has more masked patches than num_masked")
        return self._loss_fn(images, bool_masked_pos, tokens)
