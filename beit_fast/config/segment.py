"""The semantic segmentation run's configuration (``python -m beit_fast.segment``,
:func:`beit_fast.train.segmentation.train_segmentation`). Flags are named like the official mmseg configs
(``upernet_beit_base_12_512_slide_160k_ade20k*.py``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .base import positive_problems

__all__ = ["SegmentConfig", "SEGMENT_RECIPES"]

# The two official BEiT-B ADE20K recipes: from a self-supervised checkpoint ("pt") and from one with
# intermediate fine-tuning on ImageNet-22k ("pt2ft"). Both: 160k iterations of 16 images (8 GPUs x 2), AdamW
# betas (0.9, 0.999), weight decay 0.05, poly schedule (power 1, min_lr 0) after a linear warmup of 1500
# iterations from 1e-6 of the lr, drop path 0.1, 512 px crops.
SEGMENT_RECIPES = {
    "pt": dict(lr=7e-4, layer_decay_rate=0.65),
    "pt2ft": dict(lr=3e-5, layer_decay_rate=0.9),
}


@dataclass
class SegmentConfig:
    """Training and evaluation settings; the defaults are the official BEiT-B ADE20K ``pt`` recipe.

    Iteration-based as mmseg's ``IterBasedRunner``: ``max_iters`` optimizer steps, evaluation (and a
    checkpoint, ``checkpoint-best.pt`` by mIoU) every ``eval_interval`` iterations (must divide
    ``max_iters``). lr: ``lr * poly(t)`` with a linear warmup from ``warmup_ratio * lr`` over
    ``warmup_iters``, times each layer-decay group's scale ``layer_decay_rate ** (L + 1 - layer)``.
    ``resume``: "" (fresh), "auto" or a path. ``fast``: "on" the fast step (fused attention
    ``attn_backend`` with per-block tables, ``activation_checkpointing``, compiled), "auto" on CUDA only.
    Evaluation: ``test_mode`` "slide" (``crop_size`` windows every ``stride``) or "whole"; images resized to
    ``img_scale`` keeping their aspect ratio (None: as they are), ``aug_ratios`` (several: multi-scale)
    and ``flip`` (test-time augmentation, softmax averaged).
    """

    recipe: str = "pt"
    max_iters: int = 160000
    eval_interval: int = 16000
    batch_size: int = 16
    lr: float | None = None  # None: the recipe's
    layer_decay_rate: float | None = None  # None: the recipe's
    weight_decay: float = 0.05
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    clip_grad: float | None = None
    drop_path: float = 0.1
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    # data pipeline
    crop_size: int = 512
    img_scale: tuple[int, int] | None = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    # evaluation
    test_mode: str = "slide"
    stride: int = 341
    flip: bool = False
    aug_ratios: tuple[float, ...] = (1.0,)
    # run
    amp: str = "auto"
    fast: str = "auto"
    attn_backend: str = "auto"
    activation_checkpointing: str = "none"
    compile: bool = True
    seed: int = 0
    num_workers: int = 2
    resume: str = ""
    log_freq: int = 50
    max_bad_steps: int = 3
    stop_after_steps: int = 0
    log_dir: str | None = None

    def resolved_lr(self) -> float:
        return SEGMENT_RECIPES[self.recipe]["lr"] if self.lr is None else self.lr

    def resolved_layer_decay(self) -> float:
        return SEGMENT_RECIPES[self.recipe]["layer_decay_rate"] if self.layer_decay_rate is None else self.layer_decay_rate

    def checkpointing_mode(self) -> str | int:
        a = self.activation_checkpointing
        return int(a) if isinstance(a, str) and a.isdigit() else a

    def problems(self) -> list[str]:
        """Every invalid setting, by flag."""
        out = positive_problems(self, ("max_iters", "eval_interval", "batch_size", "crop_size", "stride"))
        if self.recipe not in SEGMENT_RECIPES:
            out.append(f"--recipe must be one of {sorted(SEGMENT_RECIPES)}, got {self.recipe!r}")
        elif not 0 < self.resolved_layer_decay() <= 1:
            out.append(f"--layer_decay_rate must be in (0, 1], got {self.resolved_layer_decay()}")
        elif not (math.isfinite(self.resolved_lr()) and self.resolved_lr() > 0):
            out.append(f"--lr must be a positive number, got {self.resolved_lr()}")
        if self.max_iters > 0 and self.eval_interval > 0 and self.max_iters % self.eval_interval:
            out.append(f"--eval_interval {self.eval_interval} must divide --max_iters {self.max_iters}")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1:
            out.append("--warmup_iters must be >= 0 and --warmup_ratio in (0, 1]")
        if not 0 <= self.drop_path < 1:
            out.append(f"--drop_path must be in [0, 1), got {self.drop_path}")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            out.append(f"--ratio_range must be 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            out.append(f"--cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if self.test_mode not in ("slide", "whole"):
            out.append(f"--test_mode must be slide or whole, got {self.test_mode!r}")
        if self.stride > self.crop_size:
            out.append(f"--stride {self.stride} must not exceed --crop_size {self.crop_size}")
        if self.fast not in ("on", "off", "auto"):
            out.append(f"--fast must be on, off or auto, got {self.fast!r}")
        if not self.aug_ratios or any(r <= 0 for r in self.aug_ratios):
            out.append(f"--aug_ratios must be positive, got {self.aug_ratios}")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
