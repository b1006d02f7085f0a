"""What the step benchmarks share (bench_train_step.py, bench_finetune_step.py, stages/): the FLOP
count behind every MFU figure, the peak it is divided by, and the stand-in tokenizer that times the model
step alone. One formula, one place."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

#: dense bf16 peak of the card in TFLOP/s (H100/H200 SXM: 989); override with BEIT_FAST_PEAK_TFLOPS
PEAK_TFLOPS = float(os.environ.get("BEIT_FAST_PEAK_TFLOPS", "989"))


def _backbone_forward_flops(cfg) -> float:
    """Forward FLOPs of one image through the patch embedding and the blocks (multiply-adds count 2)."""
    n, d, p = cfg.num_patches + 1, cfg.embed_dim, cfg.patch_size
    hidden = int(d * cfg.mlp_ratio)
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    return 2 * cfg.num_patches * 3 * p * p * d + cfg.depth * block


def train_flops_per_image(cfg, num_masked: int) -> float:
    """Pretraining: 3x the forward FLOPs, the head on the ``num_masked`` masked tokens only."""
    return 3.0 * (_backbone_forward_flops(cfg) + 2 * num_masked * cfg.embed_dim * cfg.vocab_size)


def finetune_flops_per_image(cfg, num_classes: int) -> float:
    """Fine-tuning: 3x the forward FLOPs, the classification head on one pooled token."""
    return 3.0 * (_backbone_forward_flops(cfg) + 2 * cfg.embed_dim * num_classes)


def mfu_percent(flops_per_image: float, images_per_s: float) -> float:
    """Model FLOPs utilisation against :data:`PEAK_TFLOPS`, in percent."""
    return 100 * flops_per_image * images_per_s / (PEAK_TFLOPS * 1e12)


class FixedTokens(nn.Module):
    """A stand-in tokenizer returning precomputed ``tokens``: times the model step alone."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.tokens = tokens
        # The model's vocabulary, not the first batch's largest id: callers swap in other batches' tokens, and
        # the engine counts targets into a histogram of this size.
        self.vocab_size = vocab_size

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens
