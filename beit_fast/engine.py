"""One BEiT pretraining step: tokenize, mask, predict the masked tokens, update.

This is the eager reference step (the official ``engine_for_pretraining.py`` semantics): logits for
masked positions only, mean cross-entropy over all masked positions of the batch, MIM accuracy,
AdamW under per-step lr/wd schedules, gradient clipping, autocast with a loss scaler for fp16.

The model and its loss are one module, :class:`beit_fast.loss.MIMLoss` (``forward(images, bool_masked_pos,
tokens) -> (loss, acc)``), in both the reference and the fast static-shape form. The engine calls the model only
through it, so a DDP or FSDP2 wrapper around it sees every forward (see :mod:`beit_fast.distributed`),
and torch.compile compiles it (or the wrapper) as one graph. Gradient accumulation: :meth:`train_step`
takes a list of micro-batches (``--update_freq``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .loss import IGNORE_INDEX, MIMLoss, autocast_or_null, mim_loss_reference  # noqa: F401 (the loss stage: beit_fast/loss.py)

__all__ = [
    "resolve_amp_dtype", "autocast_or_null", "mim_loss_reference", "StepResult", "MIMLoss", "PretrainEngine", "FastPretrainEngine",
    "tokenize", "token_agreement",
]


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
        with autocast_or_null(x.device.type, dtype):
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
    """Host-side metrics of one optimizer step (averaged over micro-batches and ranks); ``skipped`` when
    the loss or (without a loss scaler) the gradient norm was not finite and no update was made."""

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

    Parallel training: pass ``loss_module`` (a :class:`MIMLoss` over ``model``, already ``fully_shard``-ed
    for FSDP2 before the optimizer was built) and ``parallel="ddp"`` (the engine wraps it in DDP) or
    ``"fsdp"``; ``dist_info`` (:class:`beit_fast.distributed.DistInfo`) makes the logged loss and accuracy
    means over all ranks, and every rank take the same skip decision.
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
        *,
        loss_module: MIMLoss | None = None,
        parallel: str = "none",
        dist_info=None,
    ) -> None:
        if parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be none, ddp or fsdp, got {parallel!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.device = device
        self.lr_schedule = lr_schedule
        self.wd_schedule = wd_schedule
        self.loss_module = loss_module if loss_module is not None else self._default_loss_module(model)
        if self.loss_module.model is not model:
            raise ValueError("loss_module must wrap the engine's model")
        self.amp_dtype = amp_dtype
        self.clip_grad = clip_grad
        if parallel == "fsdp" and amp_dtype == torch.float16:
            raise ValueError("fp16 with a loss scaler is not supported with FSDP; use bf16")
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.tokenizer_dtype: torch.dtype | None = None  # None: fp32 tokenizer (see choose_tokenizer_precision)
        # How often each visual token was a masked (predicted) target so far, int64 [vocab] on the device: the
        # unigram baseline (see unigram_entropy). None when the tokenizer does not say its vocabulary size.
        vocab = getattr(tokenizer, "vocab_size", None)
        self.token_counts: torch.Tensor | None = (
            torch.zeros(int(vocab), dtype=torch.int64, device=device) if vocab else None)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.parallel = parallel
        self.dist_info = dist_info
        if parallel == "ddp":
            from .distributed import wrap_ddp

            self.train_module: nn.Module = wrap_ddp(self.loss_module, device)
        else:
            self.train_module = self.loss_module

    def _default_loss_module(self, model: nn.Module) -> MIMLoss:
        return MIMLoss(model)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.loss_module.amp_dtype

    @amp_dtype.setter
    def amp_dtype(self, value: torch.dtype | None) -> None:
        self.loss_module.amp_dtype = value

    def autocast(self):
        return autocast_or_null(self.device.type, self.amp_dtype)

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

    @torch.no_grad()
    def count_targets(self, tokens: torch.Tensor, bool_masked_pos: torch.Tensor) -> None:
        """Add the masked positions' tokens (``int64 [B, N]``, mask ``bool [B, N]``) to :attr:`token_counts`;
        on the device, without a host sync."""
        if self.token_counts is not None:
            self.token_counts.scatter_add_(0, tokens.reshape(-1), bool_masked_pos.reshape(-1).to(torch.int64))

    def unigram_baseline(self) -> tuple[float, float] | None:
        """``(entropy in nats, largest frequency)`` of the masked targets seen so far (this process's): the
        MIM loss and the MIM accuracy of a model that ignores the image and predicts every masked token by
        the tokens' frequencies alone (the cross-entropy of the marginal distribution is its entropy; the
        best constant guess is the most frequent token). A loss below the entropy, an accuracy above the
        frequency, is learning from the image. None before the first step (or without a vocabulary size).
        Reads the counts back to the host."""
        if self.token_counts is None:
            return None
        counts = self.token_counts.double().cpu()
        total = counts.sum()
        if total <= 0:
            return None
        p = counts[counts > 0] / total
        return float(-(p * p.log()).sum()), float(p.max())

    def unigram_entropy(self) -> float | None:
        """The entropy part of :meth:`unigram_baseline` (nats), or None."""
        baseline = self.unigram_baseline()
        return None if baseline is None else baseline[0]

    def _loss_call(self):
        """What computes (loss, acc): the (DDP-wrapped) loss module, or its compiled form."""
        return self.train_module

    def compute_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over masked positions and MIM accuracy (0-dim tensors)."""
        return self._loss_call()(images, bool_masked_pos, tokens)

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist_info is None:
            return values
        from .distributed import all_reduce_mean

        return all_reduce_mean(values, self.dist_info)

    def train_step(self, batch, step: int) -> StepResult:
        """One optimizer step on one batch."""
        return self.train_accumulated([batch], step)

    def train_accumulated(self, batches, step: int) -> StepResult:
        """One optimizer step on ``len(batches)`` micro-batches (gradient accumulation, ``--update_freq``).

        Each micro-batch's loss is divided by the count (official ``loss / update_freq``), so the update
        is that of the mean of the micro-batch losses; gradients are synchronised across ranks only on
        the last micro-batch. The loss of each micro-batch is averaged over ranks before anything else,
        so a non-finite loss on any rank makes every rank skip the step (no update, no further micro-batch).
        """
        n = len(batches)
        if n < 1:
            raise ValueError("train_accumulated needs at least one micro-batch")
        from .distributed import no_grad_sync

        self.set_schedule(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        wd = max((g["weight_decay"] for g in self.optimizer.param_groups), default=0.0)
        losses, accs = [], []
        for i, batch in enumerate(batches):
            images, tokenizer_images, bool_masked_pos = (t.to(self.device, non_blocking=True) for t in batch)
            bool_masked_pos = bool_masked_pos.flatten(1).bool()
            tokens = getattr(batch, "tokens", None)  # computed by the loader (DevicePretrainLoader.set_tokenizer)
            if tokens is None:
                tokens = self.tokenize(tokenizer_images, bool_masked_pos)
            elif tokens.shape != bool_masked_pos.shape:
                raise ValueError(f"the batch's tokens {tuple(tokens.shape)} do not match its mask "
                                 f"{tuple(bool_masked_pos.shape)}")
            self.count_targets(tokens, bool_masked_pos)
            with no_grad_sync(self.train_module, skip=i < n - 1):
                loss, acc = self.compute_loss(images, bool_masked_pos, tokens)
                stats = self._reduce(torch.stack([loss.detach().float(), acc.detach().float()]))
                loss_value, acc_value = stats.tolist()
                if not math.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    return StepResult(loss_value, float("nan"), float("nan"), self._scale(), max(lrs), min(lrs),
                                      wd, True)
                self.scaler.scale(loss / n if n > 1 else loss).backward()
            losses.append(loss_value)
            accs.append(acc_value)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm_value = grad_norm.item()
        loss_value, acc_value = float(np.mean(losses)), float(np.mean(accs))
        if not self.scaler.is_enabled() and not math.isfinite(grad_norm_value):
            # Without a loss scaler nothing else would stop a non-finite update from wrecking the weights.
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, acc_value, grad_norm_value, 1.0, max(lrs), min(lrs), wd, True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss_value, acc_value, grad_norm_value, self._scale(), max(lrs), min(lrs), wd)

    def _scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    # -- checkpoint state ----------------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        """Collective under FSDP: the full model state dict (on rank 0; ``{}`` elsewhere under FSDP)."""
        if self.parallel == "fsdp":
            from .distributed import full_model_state_dict

            return full_model_state_dict(self.loss_module)
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        if self.parallel == "fsdp":
            from .distributed import load_full_model_state_dict

            load_full_model_state_dict(self.loss_module, state)
        else:
            self.model.load_state_dict(state)

    def state_dict(self) -> dict:
        """Optimizer and loss-scaler state, in ``optimizer.state_dict()`` layout whatever the parallelism
        (collective under FSDP, full on rank 0), and :attr:`token_counts`."""
        if self.parallel == "fsdp":
            from .distributed import full_optimizer_state_dict

            optimizer = full_optimizer_state_dict(self.loss_module, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "token_counts": None if self.token_counts is None else self.token_counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if self.parallel == "fsdp":
            from .distributed import load_full_optimizer_state_dict

            load_full_optimizer_state_dict(self.loss_module, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        counts = state.get("token_counts")
        if self.token_counts is not None and counts is not None and counts.shape == self.token_counts.shape:
            self.token_counts.copy_(counts)


class FastPretrainEngine(PretrainEngine):
    """The same step through the fast path, with static shapes so it compiles to one graph.

    The model's fast switches (fused patch embedding + mask, fused attention, activation checkpointing)
    are set with ``model.configure_fast_path``. The head and loss run as one fused linear +
    cross-entropy over exactly ``num_masked`` rows per image: masked positions first (row-major), padded
    with ignored rows for images the official mask generator left short of the target. The loss is the
    mean over real masked rows, i.e. the reference's ``F.cross_entropy(lm_head(x[mask]), tokens[mask])``.

    Compilation (``compile=True``): single process and DDP compile the module the step calls, i.e.
    ``torch.compile(MIMLoss)`` or ``torch.compile(DDP(MIMLoss))`` - compiled after wrapping, so Dynamo's
    DDP optimizer splits the graph at gradient-bucket boundaries and all-reduces overlap the backward.
    With FSDP2 each Transformer block is compiled on its own (``block.compile()``, the torchtitan recipe),
    and the FSDP hooks, the embedding and the fused head + loss run eagerly between them.
    ``compile_mode``: torch.compile's ``mode`` (None: the default; e.g. "max-autotune-no-cudagraphs" lets
    inductor autotune the GEMMs with their bias/GELU epilogues, "reduce-overhead" adds CUDA graphs).
    ``fp8=True``: the blocks' QKV and MLP linears run as FP8 GEMMs (:func:`beit_fast.fp8.convert_to_fp8_training`;
    CUDA compute capability >= 8.9 and torchao; not with FSDP).
    """

    def __init__(self, *args, num_masked: int, compile: bool = True, ops_backend: str | None = None,
                 compile_backend: str = "inductor", compile_mode: str | None = None, fp8: bool = False,
                 **kwargs) -> None:
        self.num_masked = int(num_masked)
        self.ops_backend = ops_backend
        self.fp8 = bool(fp8)
        if self.fp8:  # before DDP wraps the model; the Parameter objects stay, so the optimizer stays valid
            if kwargs.get("parallel") == "fsdp":
                raise ValueError("fp8 is not supported with FSDP (the linears would have to be converted before "
                                 "sharding); use DDP or one GPU")
            from .fp8 import convert_to_fp8_training

            convert_to_fp8_training(args[0] if args else kwargs["model"])
        super().__init__(*args, **kwargs)
        if self.loss_module.num_masked != self.num_masked:
            raise ValueError(f"loss_module.num_masked {self.loss_module.num_masked} != num_masked {self.num_masked}")
        self.compiled = bool(compile)
        mode = {"mode": compile_mode} if compile_mode else {}
        if not compile:
            self._loss_fn = self.train_module
        elif self.parallel == "fsdp":
            for block in self.model.blocks:
                block.compile(backend=compile_backend, dynamic=False, **mode)
            self._loss_fn = self.train_module
        else:
            self._loss_fn = torch.compile(self.train_module, backend=compile_backend, fullgraph=self.parallel == "none",
                                          dynamic=False, **mode)

    def _default_loss_module(self, model: nn.Module) -> MIMLoss:
        return MIMLoss(model, num_masked=self.num_masked, ops_backend=self.ops_backend)

    def _fast_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The uncompiled, unwrapped static-shape loss (for inspection, e.g. ``torch._dynamo.explain``)."""
        return self.loss_module(images, bool_masked_pos, tokens)

    def _loss_call(self):
        return self._loss_fn

    def compute_loss(self, images, bool_masked_pos, tokens):
        if int(bool_masked_pos.shape[1]) < self.num_masked:
            raise ValueError(f"num_masked {self.num_masked} exceeds the {bool_masked_pos.shape[1]} patches")
        # Rows past num_masked would be dropped silently; checked on the device, without a host sync.
        torch._assert_async((bool_masked_pos.sum(1) <= self.num_masked).all(),
                            "an image has more masked patches than num_masked")
        return self._loss_fn(images, bool_masked_pos, tokens)
