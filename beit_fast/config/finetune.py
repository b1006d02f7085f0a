"""The fine-tuning run's configuration (``python -m beit_fast.finetune``, :func:`beit_fast.train.finetuning.finetune`)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..utils.options import torch_file_problem
from .pretrain import DEMO_PRETRAINED_CHECKPOINT
from .base import (FLOAT32_MAX, ClassificationData, adamw_first_step, jpeg_decoder_error, positive_problems,
                   seed_problems)

__all__ = ["FinetuneConfig", "FINETUNE_DEMO_DEFAULTS", "FINETUNE_OFFICIAL_DEFAULTS"]

# Values that differ between the embedded CPU default (no --data_path: scikit-learn's digits at 32 px, a tiny ViT
# with 4 px patches) and a real run (the official BEiT-B ImageNet recipe). Unset on the command line: None.
FINETUNE_DEMO_DEFAULTS = dict(
    model="tiny", input_size=32, patch_size=4, epochs=30, batch_size=64, lr=2e-3, warmup_epochs=3, mixup=0.0,
    cutmix=0.0, reprob=0.0, aa="none", hflip=0.0, min_crop_scale=0.5, crop_pct=1.0, drop_path=0.1,
    output_dir="runs/beit_finetune_demo",
)
FINETUNE_OFFICIAL_DEFAULTS = dict(
    model="base", input_size=224, patch_size=16, epochs=100, batch_size=64, lr=4e-3, warmup_epochs=20, mixup=0.8,
    cutmix=1.0, reprob=0.25, aa="rand-m9-mstd0.5-inc1", hflip=0.5, min_crop_scale=0.08, crop_pct=None,
    drop_path=0.1, output_dir="runs/beit_finetune",
)


@dataclass
class FinetuneConfig(ClassificationData):
    """Fine-tuning settings; the training defaults are the official BEiT-B ImageNet-1k recipe.

    Training (what :func:`~beit_fast.train.finetuning.finetune` reads): ``lr`` is the absolute peak
    learning rate; ``blr`` (when set) overrides it with the linear scaling rule ``lr = blr * batch_size / 256``;
    ``warmup_steps > 0`` overrides ``warmup_epochs``. ``drop_path``: the stochastic depth rate set on the model
    (None: keep the model's). ``amp``: "auto" (bf16 on CUDA when supported, else fp16; none on CPU), "bf16",
    "fp16", "none". ``resume``: "" (fresh), "auto" (``output_dir``'s newest loadable checkpoint) or a path.
    ``fast``: "on" runs the compiled fast step (the classifier's fused attention ``attn_backend``,
    ``activation_checkpointing``, static shapes), "auto" on CUDA only, "off" the eager step.
    ``log_freq``: the step results (kept on the device) are read every N steps (progress bar, non-finite
    check); ``stop_after_steps``: stop there with a checkpoint, as if interrupted.

    The rest are the command line's model and data settings (what the classifier and data sets are built
    from); None: the demo / real default (:meth:`resolved`).
    """

    # training
    epochs: int = 100
    batch_size: int = 64
    lr: float = 4e-3
    blr: float | None = None
    min_lr: float = 1e-6
    warmup_lr: float = 0.0
    warmup_epochs: int = 20
    warmup_steps: int = -1
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    layer_decay: float = 0.65
    disable_weight_decay_on_rel_pos_bias: bool = False
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    drop_path: float | None = 0.1
    amp: str = "auto"
    fast: str = "auto"
    attn_backend: str = "auto"
    activation_checkpointing: str = "none"
    compile: bool = True
    seed: int = 0
    eval_freq: int = 1
    eval_batch_size: int | None = None
    save_ckpt: bool = True
    resume: str = ""
    max_bad_steps: int = 3
    log_freq: int = 50
    log_dir: str | None = None
    stop_after_steps: int = 0
    # model (command line)
    finetune: str | None = None
    model: str | None = None
    patch_size: int | None = None
    use_mean_pooling: bool = True
    rel_pos_bias: bool | None = None
    abs_pos_emb: bool | None = None
    layer_scale_init_value: float | None = None
    init_scale: float = 0.001
    rel_pos_resize: str = "bicubic"
    # augmentation (command line; the data fields are ClassificationData's)
    aa: str | None = "rand-m9-mstd0.5-inc1"
    min_crop_scale: float = 0.08
    hflip: float = 0.5
    train_interpolation: str = "bicubic"
    reprob: float = 0.25
    # run (command line)
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    trust_pickle: bool = False
    eval: bool = False
    device: str | None = None
    no_progress: bool = False

    def effective_lr(self) -> float:
        return self.blr * self.batch_size / 256 if self.blr is not None else self.lr

    def checkpointing_mode(self) -> str | int:
        mode = str(self.activation_checkpointing)
        return mode if mode in ("none", "all") else int(mode)

    def resolved(self) -> "FinetuneConfig":
        """A copy with the demo / real defaults in the command-line settings left None (``model``,
        ``patch_size`` and ``input_size`` are left to the checkpoint's architecture)."""
        defaults = FINETUNE_DEMO_DEFAULTS if self.data_path is None else FINETUNE_OFFICIAL_DEFAULTS
        keep = ("model", "patch_size", "input_size")
        filled = {k: v for k, v in defaults.items() if k not in keep and getattr(self, k) is None}
        if self.starts_from_the_pretraining_demo():
            filled["finetune"] = DEMO_PRETRAINED_CHECKPOINT
        return dataclasses.replace(self, **filled)

    def starts_from_the_pretraining_demo(self) -> bool:
        """The demo (no ``data_path``, no ``finetune`` given, no architecture flag) fine-tunes what the pretraining
        demo trained when its checkpoint is there (``--finetune ''`` trains from scratch)."""
        return (self.data_path is None and self.finetune is None and self.model is None and self.patch_size is None
                and self.input_size is None and os.path.isfile(DEMO_PRETRAINED_CHECKPOINT))

    def validate(self) -> None:
        """The training settings: ValueError naming every bad one."""
        errors = []
        for name in ("epochs", "batch_size", "eval_freq", "max_bad_steps", "log_freq"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "label_smoothing", "mixup", "cutmix"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                errors.append(f"{name} must be a finite number >= 0, got {v}")
        if self.blr is not None and (not math.isfinite(self.blr) or self.blr <= 0):
            errors.append(f"blr must be positive, got {self.blr}")
        if not 0 < self.layer_decay <= 1:
            errors.append(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            errors.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            errors.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.warmup_epochs < 0 or self.warmup_steps < -1:
            errors.append("warmup_epochs must be >= 0 and warmup_steps >= -1")
        if self.clip_grad is not None and self.clip_grad < 0:
            errors.append(f"clip_grad must be >= 0, got {self.clip_grad}")
        errors += self._choice_errors()
        for name in ("num_workers", "stop_after_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        beta1 = self.opt_betas[0]
        if not errors and 0 <= beta1 < 1 and adamw_first_step(self.effective_lr(), beta1) > FLOAT32_MAX:
            errors.append(f"lr {self.effective_lr():g} is too large: AdamW's first step size lr / (1 - beta1) "
                          f"overflows float32 (max {FLOAT32_MAX:.3g})")
        if errors:
            raise ValueError("; ".join(errors))

    def _choice_errors(self) -> list[str]:
        errors = []
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            errors.append(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.fast not in ("auto", "on", "off"):
            errors.append(f"fast must be auto, on or off, got {self.fast!r}")
        mode = str(self.activation_checkpointing)
        if mode not in ("none", "all") and not (mode.isdigit() and int(mode) >= 1):
            errors.append(f"activation_checkpointing must be none, all or a positive integer, got {mode!r}")
        if jpeg_decoder_error(self.jpeg_decoder):
            errors.append(jpeg_decoder_error(self.jpeg_decoder))
        return errors

    def problems(self) -> list[str]:
        """The command line's checks (paths, data folders, augmentation values), each naming its flag. Call
        on a :meth:`resolved` config."""
        from ..data.transforms.classification import parse_randaug

        errors = positive_problems(self, ("epochs", "batch_size", "eval_freq", "input_size", "patch_size",
                                          "nb_classes", "labels_per_class", "max_image_pixels"))
        errors += seed_problems(self.seed)
        for flag, value in (("finetune", self.finetune), ("resume", "" if self.resume == "auto" else self.resume)):
            if value and not os.path.exists(value):
                errors.append(f"--{flag} checkpoint not found: {value}")
            elif value and (problem := torch_file_problem(f"--{flag}", value)):
                errors.append(problem)
        errors += self._data_path_problems()
        errors += [f"--{e}" for e in self._choice_errors()]
        if self.resume and self.overwrite_output_dir:
            errors.append("--resume continues the run in --output_dir, --overwrite_output_dir deletes it: choose one")
        if self.eval and not self.finetune and self.resume in ("", "auto"):
            errors.append("--eval needs weights: --finetune PATH (a fine-tuned or pretrained checkpoint) or --resume PATH")
        try:
            parse_randaug(self.aa)
        except ValueError as e:
            errors.append(f"--aa: {e}")
        if self.hflip is not None and not 0 <= self.hflip <= 1:
            errors.append(f"--hflip must be in [0, 1], got {self.hflip}")
        if not 0 <= self.reprob <= 1:
            errors.append(f"--reprob must be in [0, 1], got {self.reprob}")
        if not 0 < self.min_crop_scale <= 1:
            errors.append(f"--min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            errors.append(f"--crop_pct must be in (0, 1], got {self.crop_pct}")
        return errors

    def _data_path_problems(self) -> list[str]:
        if self.data_path is None:
            return []
        if not os.path.isdir(self.data_path):
            return [f"--data_path {self.data_path} is not a folder"]
        errors = []
        for split in ("train", "val"):
            folder = Path(self.data_path) / split
            if not folder.is_dir():
                errors.append(f"{folder} not found: --data_path must hold train/ and val/ folders, each with one "
                              "subfolder of images per class")
            elif not any(d.is_dir() for d in folder.iterdir()):
                errors.append(f"{folder} has no class subfolders")
        return errors
