"""The tokenizer trainer's configuration (``python -m beit_fast.train_tokenizer``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .base import finite_problems, positive_problems, seed_problems

__all__ = ["TokenizerConfig"]


@dataclass
class TokenizerConfig:
    """A discrete-VAE tokenizer trained on tokenizer views of the sample photographs (``data_path`` None) or of
    every image file under ``data_path``: the ``preset``'s model with its overrides (None: the preset's value),
    ``steps`` AdamW steps of ``batch_size`` views at peak ``lr`` (None: the preset's), the checkpoint
    ``output`` written every ``save_every`` steps (0: only at the end) and at the end."""

    # output and model
    output: str = "dvae_tokenizer.pt"
    preset: str = "tiny"
    vocab_size: int | None = None
    input_size: int | None = None
    temperature_start: float | None = None
    temperature_end: float | None = None
    kl_weight: float | None = None
    recon_loss: str | None = None
    # training
    steps: int = 300
    batch_size: int = 16
    lr: float | None = None
    data_path: str | None = None
    eval_images: int = 128
    save_every: int = 100
    seed: int = 0
    # run
    device: str | None = None
    workers: int = 0
    threads: int | None = None
    no_progress: bool = False
    json: bool = False

    def problems(self) -> list[str]:
        """Every problem seen without loading anything, each naming its flag (the folder first)."""
        from ..utils.limits import DVAE_LIMITS

        problems = positive_problems(self, ("steps", "batch_size", "eval_images", "threads", "input_size",
                                            "temperature_start", "temperature_end"))
        problems += positive_problems(self, ("save_every", "workers", "kl_weight"), strict=False)
        problems += finite_problems(self, ("lr", "temperature_start", "temperature_end", "kl_weight"))
        problems += seed_problems(self.seed)
        if self.lr is not None and not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.vocab_size is not None and not 2 <= self.vocab_size <= DVAE_LIMITS["vocab_size"]:
            problems.append(f"--vocab_size must be in [2, {DVAE_LIMITS['vocab_size']}], got {self.vocab_size}")
        if self.input_size is not None and (self.input_size % 8 or self.input_size > DVAE_LIMITS["input_size"]):
            problems.append(f"--input_size must be a multiple of 8 and at most {DVAE_LIMITS['input_size']}, got "
                            f"{self.input_size}")
        if self.data_path is not None and not os.path.isdir(self.data_path):
            missing = not os.path.exists(self.data_path)
            problems.insert(0, f"--data_path {self.data_path}: image folder not found" if missing
                            else f"--data_path {self.data_path} is not a folder")
        return problems
