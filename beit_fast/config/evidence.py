"""The evidence run's configuration (``python -m beit_fast.evidence``): sizes and schedules."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EvidenceConfig", "EVIDENCE_VARIANTS"]

#: Variants of the evidence run (``beit_fast.train.evidence.VARIANTS`` says what each one pretrains).
EVIDENCE_VARIANTS: tuple[str, ...] = ("scratch", "beit", "beit_random_mask", "beit_pixels")


@dataclass
class EvidenceConfig:
    """Sizes and schedules of the evidence run; the defaults fit in under 30 minutes on 2 CPU cores."""

    seeds: int = 3
    image_size: int = 32
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    mask_ratio: float = 0.4
    min_mask_block: int = 4
    # tokenizer (trained once per run, on the training images only)
    vocab_size: int = 256
    tokenizer_steps: int = 300
    tokenizer_batch: int = 64
    # pretraining
    pretrain_epochs: int = 20
    pretrain_batch: int = 64
    pretrain_lr: float = 1.5e-3
    pretrain_warmup_epochs: int = 3
    crop_scale_min: float = 0.5
    # downstream
    labels_per_class: int = 10
    finetune_epochs: int = 100
    finetune_batch: int = 32
    finetune_lr: float = 2e-3
    layer_decay: float = 0.75
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    # variants: any of EVIDENCE_VARIANTS; --ablations adds the two ablations
    variants: str = "scratch,beit"
    ablations: bool = False
    threads: int | None = None
    output_dir: str = "runs/evidence"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_masked(self) -> int:
        return max(1, round(self.mask_ratio * self.grid**2))

    def problems(self) -> list[str]:
        """What the sizes cannot be, each naming its flag."""
        if self.image_size % self.patch_size:
            return [f"--image_size {self.image_size} is not a multiple of --patch_size {self.patch_size}"]
        return []
