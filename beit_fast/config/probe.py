"""The linear probe's configuration (``python -m beit_fast.linear_probe``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..utils.options import torch_file_problem
from .base import ClassificationData, finite_problems, jpeg_decoder_error, positive_problems, seed_problems

__all__ = ["ProbeConfig"]


@dataclass
class ProbeConfig(ClassificationData):
    """A linear probe of a frozen backbone (the paper's Table 9 protocol): average-pooled patch tokens of
    block ``layer`` (default: the last) or of every block (``sweep``), a BatchNorm without affine parameters
    (unless ``no_batchnorm``) and a linear classifier trained on cached features (AdamW, cosine lr to 0); the
    data fields are :class:`~beit_fast.config.base.ClassificationData`'s."""

    # model
    finetune: str | None = None
    trust_pickle: bool = False
    model: str | None = None
    patch_size: int | None = None
    layer: int | None = None
    sweep: bool = False
    include_cls: bool = False
    # probe
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    no_batchnorm: bool = False
    # run
    output_dir: str | None = None
    device: str | None = None
    seed: int = 0
    no_progress: bool = False

    def problems(self) -> list[str]:
        """Every problem seen without loading anything, each naming its flag."""
        problems = positive_problems(self, ("epochs", "batch_size", "max_image_pixels", "input_size", "patch_size",
                                            "labels_per_class", "nb_classes"))
        problems += positive_problems(self, ("num_workers", "layer"), strict=False)
        problems += finite_problems(self, ("lr", "weight_decay"), nonnegative=("lr", "weight_decay"))
        problems += seed_problems(self.seed)
        if self.finetune and not os.path.exists(self.finetune):
            problems.append(f"--finetune checkpoint not found: {self.finetune}")
        elif self.finetune and (problem := torch_file_problem("--finetune", self.finetune)):
            problems.append(problem)
        if self.data_path is not None and not os.path.isdir(self.data_path):
            problems.append(f"--data_path {self.data_path} is not a folder")
        if jpeg_decoder_error(self.jpeg_decoder):
            problems.append("--" + jpeg_decoder_error(self.jpeg_decoder))
        return problems
