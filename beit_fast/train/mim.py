"""Pretraining on the engine: the visual tokens of a frozen tokenizer, and :class:`PretrainEngine` /
:class:`FastPretrainEngine` over the masked-image-modeling task module (:class:`beit_fast.train.loss.MIMLoss`).

The step is the official ``engine_for_pretraining.py`` one: logits for masked positions only, mean
cross-entropy over all masked positions of the batch, MIM accuracy, AdamW under per-step lr/wd schedules,
gradient clipping, autocast with a loss scaler for fp16 - run by :class:`beit_fast.train.engine.Engine`
(accumulation, clipping, the non-finite policy - ``nonfinite_check`` "host" or "device" -, DDP/FSDP, compile). What
this module adds is the batch preparation: the visual tokens of the tokenizer view (unless the loader
computed them), their counts (the unigram baseline), and the fast step's static-shape checks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..tokenizer.base import tokenize
from . import host_reads
from .engine import Engine
from .loss import MIMLoss

__all__ = ["PretrainEngine", "FastPretrainEngine", "token_agreement"]


@torch.no_grad()
def token_agreement(tokenizer: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of positions whose token id in ``dtype`` equals the fp32 one (1.0 = identical)."""
    return (tokenize(tokenizer, images, dtype) == tokenize(tokenizer, images)).float().mean().item()


class PretrainEngine(Engine):
    """Pretraining steps of a model and a frozen tokenizer.

    ``batch = (images [B,3,H,W] float, tokenizer_images [B,3,h,w] float, bool_masked_pos [B,N] bool)``,
    optionally with ``batch.tokens`` (int64 [B,N], computed by the loader). The lr of each parameter group
    at step t is ``lr_schedule[t] * group["lr_scale"]``; groups with weight decay get ``wd_schedule[t]``.

    Parallel training: pass ``loss_module`` (a :class:`MIMLoss` over ``model``, already ``fully_shard``-ed
    for FSDP2 before the optimizer was built) and ``parallel="ddp"`` (the engine wraps it in DDP) or
    ``"fsdp"``; ``dist_info`` (:class:`beit_fast.train.distributed.DistInfo`) makes the logged loss and accuracy
    means over all ranks, and every rank take the same skip decision. ``nonfinite_check``: how a non-finite
    step is detected (:class:`~beit_fast.train.engine.Engine`: "host" reads each loss before its backward,
    "device" reads nothing per step and skips through fused AdamW's ``found_inf``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lr_schedule,
        wd_schedule,
        amp_dtype: torch.dtype | None = None,
        clip_grad: float | None = 3.0,
        *,
        loss_module: MIMLoss | None = None,
        parallel: str = "none",
        dist_info=None,
        nonfinite_check: str = "host",
        **engine_kwargs,
    ) -> None:
        loss_module = loss_module if loss_module is not None else self._default_loss_module(model)
        if loss_module.model is not model:
            raise ValueError("loss_module must wrap the engine's model")
        loss_module.amp_dtype = amp_dtype
        super().__init__(loss_module, optimizer, device, lr_schedule, wd_schedule, clip_grad=clip_grad,
                         parallel=parallel, dist_info=dist_info, nonfinite_check=nonfinite_check, **engine_kwargs)
        self.loss_module = loss_module
        self.tokenizer = tokenizer
        self.tokenizer_dtype: torch.dtype | None = None  # None: fp32 tokenizer (see choose_tokenizer_precision)
        self._encode: Callable | None = None  # the compiled encode_logits (settle_tokenizer)
        # How often each visual token was a masked (predicted) target so far, int64 [vocab] on the device: the
        # unigram baseline (see unigram_entropy). None when the tokenizer does not say its vocabulary size.
        vocab = getattr(tokenizer, "vocab_size", None)
        self.token_counts: torch.Tensor | None = (
            torch.zeros(int(vocab), dtype=torch.int64, device=self.device) if vocab else None)

    def _default_loss_module(self, model: nn.Module) -> MIMLoss:
        return MIMLoss(model)

    def choose_tokenizer_precision(
        self, tokenizer_images: torch.Tensor, dtype: torch.dtype = torch.bfloat16, min_agreement: float = 0.99
    ) -> float:
        """Run the tokenizer in ``dtype`` (channels-last) from now on if, on these images, its token ids
        agree with fp32 on at least ``min_agreement`` of the positions; returns the measured agreement.
        Call :meth:`settle_tokenizer` once the choice is final."""
        agreement = token_agreement(self.tokenizer, tokenizer_images.to(self.device), dtype)
        self.tokenizer.to(memory_format=torch.channels_last)
        self.tokenizer_dtype = dtype if agreement >= min_agreement else None
        return agreement

    def settle_tokenizer(self, compile: bool = False) -> None:
        """The tokenizer as the run keeps it: in :attr:`tokenizer_dtype` its convolution weights are kept in
        that precision (not cast by autocast every step; the same ids); ``compile``: its ``encode_logits``
        compiled with static shapes (``torch.compile``), called by :meth:`tokenize`."""
        if self.tokenizer_dtype is not None and hasattr(self.tokenizer, "keep_weights_in"):
            self.tokenizer.keep_weights_in(self.tokenizer_dtype)
        if compile:
            self._encode = torch.compile(self.tokenizer.encode_logits, dynamic=False)

    @torch.no_grad()
    def tokenize(self, tokenizer_images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Visual tokens of every patch, ``int64[B, N]``, row-major."""
        encode = self._encode if self.tokenizer_dtype is not None else None
        tokens = tokenize(self.tokenizer, tokenizer_images, self.tokenizer_dtype, encode).flatten(1)
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
        counts = host_reads.tensor(self.token_counts).double().numpy()
        total = counts.sum()
        if total <= 0:
            return None
        p = counts[counts > 0] / total
        return float(-(p * np.log(p)).sum()), float(p.max())

    def unigram_entropy(self) -> float | None:
        """The entropy part of :meth:`unigram_baseline` (nats), or None."""
        baseline = self.unigram_baseline()
        return None if baseline is None else baseline[0]

    def prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, bool_masked_pos [B,N] bool, tokens [B,N] int64)`` on the device; counts the targets."""
        images, tokenizer_images, bool_masked_pos = (t.to(self.device, non_blocking=True) for t in batch)
        bool_masked_pos = bool_masked_pos.flatten(1).bool()
        tokens = getattr(batch, "tokens", None)  # computed by the loader (DevicePretrainLoader.set_tokenizer)
        if tokens is None:
            tokens = self.tokenize(tokenizer_images, bool_masked_pos)
        elif tokens.shape != bool_masked_pos.shape:
            raise ValueError(f"the batch's tokens {tuple(tokens.shape)} do not match its mask "
                             f"{tuple(bool_masked_pos.shape)}")
        self.count_targets(tokens, bool_masked_pos)
        return images, bool_masked_pos, tokens

    def state_dict(self) -> dict:
        """The engine's state (optimizer, loss scaler) and :attr:`token_counts`."""
        return {**super().state_dict(),
                "token_counts": None if self.token_counts is None else self.token_counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
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
    ``fp8=True``: the blocks' QKV and MLP linears run as FP8 GEMMs (:func:`beit_fast.model.fp8.convert_to_fp8_training`;
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
            from ..model.fp8 import convert_to_fp8_training

            convert_to_fp8_training(args[0] if args else kwargs["model"])
        super().__init__(*args, compile=compile, compile_backend=compile_backend, compile_mode=compile_mode,
                         **kwargs)
        if self.loss_module.num_masked != self.num_masked:
            raise ValueError(f"loss_module.num_masked {self.loss_module.num_masked} != num_masked {self.num_masked}")

    def _default_loss_module(self, model: nn.Module) -> MIMLoss:
        return MIMLoss(model, num_masked=self.num_masked, ops_backend=self.ops_backend)

    def _fast_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The uncompiled, unwrapped static-shape loss (for inspection, e.g. ``torch._dynamo.explain``)."""
        return self.loss_module(images, bool_masked_pos, tokens)

    def compute_loss(self, images, bool_masked_pos, tokens):
        if int(bool_masked_pos.shape[1]) < self.num_masked:
            raise ValueError(f"num_masked {self.num_masked} exceeds the {bool_masked_pos.shape[1]} patches")
        # Rows past num_masked would be dropped silently; checked on the device, without a host sync.
        torch._assert_async((bool_masked_pos.sum(1) <= self.num_masked).all(),
                            "an image has more masked patches than num_masked")
        return super().compute_loss(images, bool_masked_pos, tokens)
