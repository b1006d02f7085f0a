"""BEiT fine-tuning for image classification (the library; the command line is ``python -m beit_fast.finetune``).

The official ``run_class_finetuning.py`` recipe: a classifier built from a pretraining checkpoint
(``--finetune``; ours, official, HuggingFace or timm names) with mean pooling + ``fc_norm`` (or [CLS]),
the head initialised at 0.001 scale, per-block relative position bias copied from the shared table
(resized when the patch grid changes), layer-wise lr decay, label smoothing, mixup / cutmix,
RandAugment, random erasing, drop path, linear warmup + cosine per step, AdamW; evaluation with the
``crop_pct`` center crop, top-1 / top-5; the best checkpoint kept.

:func:`load_datasets` and :func:`build_model_for_args` turn the flags of ``beit_fast.finetune`` and
``beit_fast.linear_probe`` into data sets and a classifier: without ``--data_path`` the embedded default,
scikit-learn's handwritten digits (real, labelled; :class:`beit_fast.digits.DigitsDataset`) at 32 px with a
tiny ViT (patch 4); with ``--data_path DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``
(torchvision ImageFolder).

Augmentations are torchvision's (``transforms.v2``): RandomResizedCrop, RandomHorizontalFlip, RandAugment,
RandomErasing, MixUp, CutMix. Differences from timm's (which the official code uses) are documented in
:func:`build_transforms` and :func:`build_mixup`.

Library use::

    model = build_classifier("base", num_classes=1000, drop_path_rate=0.1)
    load_pretrained(model, "beit_base_patch16_224_pt22k.pth")
    result = finetune(model, train_set, val_set, FinetuneConfig(epochs=100), device="cuda", output_dir="runs/ft")
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (
    LAST_NAME, CheckpointError, Checkpointer, OutputDirLock, existing_checkpoints, find_resume_checkpoint,
    list_checkpoints, remove_run_outputs, remove_stale_temp_files, trim_jsonl, validate_checkpoint,
)
from .loss import autocast_or_null, soft_target_cross_entropy
from .train.engine import resolve_amp_dtype
from .model import build_classifier, get_config
from .optim import adamw_first_step, apply_schedule, cosine_scheduler, param_groups_layer_decay
from .options import RESIZE_FILTERS
from .rng import rng_state, seed_everything, set_rng_state

__all__ = [
    "FinetuneConfig", "finetune", "evaluate", "build_transforms", "build_mixup", "parse_randaug",
    "soft_target_cross_entropy", "accuracy", "default_layer_decay", "DEMO_DEFAULTS", "OFFICIAL_DEFAULTS",
    "load_datasets", "build_model_for_args",
]

log = logging.getLogger("beit_fast.finetuning")

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_layer_decay(depth: int) -> float:
    """The paper's layer decay: 0.75 for large (24 blocks or more), 0.65 otherwise (base)."""
    return 0.75 if depth >= 24 else 0.65


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters; defaults are the official BEiT-B ImageNet-1k recipe.

    ``lr`` is the absolute peak learning rate. ``blr`` (when set) overrides it with the linear scaling
    rule ``lr = blr * batch_size / 256``. ``warmup_steps > 0`` overrides ``warmup_epochs``.
    ``drop_path``: the stochastic depth rate set on the model (None: keep the model's).
    ``amp``: "auto" (bf16 on CUDA when supported, else fp16; none on CPU), "bf16", "fp16", "none".
    ``resume``: "" (fresh), "auto" (``output_dir``'s newest loadable checkpoint) or a path.
    """

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
    seed: int = 0
    num_workers: int = 0
    eval_freq: int = 1
    eval_batch_size: int | None = None
    save_ckpt: bool = True
    resume: str = ""
    max_bad_steps: int = 3

    def effective_lr(self) -> float:
        return self.blr * self.batch_size / 256 if self.blr is not None else self.lr

    def validate(self) -> None:
        errors = []
        for name in ("epochs", "batch_size", "eval_freq", "max_bad_steps"):
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
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            errors.append(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.num_workers < 0:
            errors.append(f"num_workers must be >= 0, got {self.num_workers}")
        f32_max = float(torch.finfo(torch.float32).max)
        beta1 = self.opt_betas[0]
        if not errors and 0 <= beta1 < 1 and adamw_first_step(self.effective_lr(), beta1) > f32_max:
            errors.append(f"lr {self.effective_lr():g} is too large: AdamW's first step size lr / (1 - beta1) "
                          f"overflows float32 (max {f32_max:.3g})")
        if errors:
            raise ValueError("; ".join(errors))


# --------------------------------------------------------------------------------------------------
# Transforms and mixup
# --------------------------------------------------------------------------------------------------
def parse_randaug(spec: str | None) -> tuple[int, int] | None:
    """``(num_ops, magnitude)`` of a timm-style RandAugment string (``rand-m9-n2-mstd0.5-inc1``; n
    defaults to 2), None for ``None`` / "" / "none". Other timm options (mstd, inc, mmax) are accepted and
    not reproduced (torchvision's RandAugment has no magnitude noise)."""
    if spec is None or spec.lower() in ("", "none", "off"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"only RandAugment ('rand-m9-mstd0.5-inc1') or 'none' are supported, got {spec!r}")
    num_ops, magnitude = 2, 9
    for p in parts[1:]:
        if p.startswith("mstd") or p.startswith("mmax") or p.startswith("inc") or p.startswith("w"):
            continue
        if p.startswith("m") and p[1:].isdigit():
            magnitude = int(p[1:])
        elif p.startswith("n") and p[1:].isdigit():
            num_ops = int(p[1:])
        else:
            raise ValueError(f"cannot parse {p!r} in RandAugment spec {spec!r}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be in 0..10 (timm's scale), got {magnitude}")
    return num_ops, magnitude


_INTERP = RESIZE_FILTERS


def build_transforms(
    img_size: int, *, train: bool, randaug: str | tuple[int, int] | bool | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25, crop_pct: float | None = None, min_scale: float = 0.08, hflip: float = 0.5,
    interpolation: str = "bicubic", mean=INCEPTION_MEAN, std=INCEPTION_STD, scale: tuple[float, float] | None = None,
) -> Callable:
    """The official fine-tuning transforms, built from torchvision ``transforms.v2``; PIL image in,
    normalised ``float32 [3, img_size, img_size]`` out.

    Train: RandomResizedCrop(img_size, scale=(min_scale, 1), ratio (3/4, 4/3), bicubic) ->
    RandomHorizontalFlip(hflip) -> RandAugment -> to float in [0, 1] -> Normalize(mean, std) ->
    RandomErasing(p=reprob, per-pixel normal values, like timm's "pixel" mode). ``scale=(lo, hi)``, when
    given, replaces ``(min_scale, 1)``. ``randaug``: a timm string (:func:`parse_randaug`),
    ``(num_ops, magnitude)``, True (the official rand-m9) or None / False (off); magnitude on timm's 0..10 scale
    (torchvision ``num_magnitude_bins=11``), no magnitude noise (timm's mstd0.5). As in timm, no colour
    jitter when RandAugment is on. ``hflip=0`` and a larger ``min_scale`` for data that is not
    flip-invariant or too small to crop hard (digits).

    Eval: Resize(int(img_size / crop_pct), bicubic) -> CenterCrop(img_size) -> Normalize.
    ``crop_pct`` None: 224/256 below 384 px, 1.0 from 384 px (official).
    Mean/std default to the official (0.5, 0.5, 0.5); pass ImageNet's with ``IMAGENET_MEAN/STD``.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import InterpolationMode

    mode = getattr(InterpolationMode, _INTERP[interpolation])
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if not train:
        if crop_pct is None:
            crop_pct = 224 / 256 if img_size < 384 else 1.0
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        return v2.Compose([v2.Resize(int(img_size / crop_pct), interpolation=mode, antialias=True),
                           v2.CenterCrop(img_size), *to_tensor])
    scale = (min_scale, 1.0) if scale is None else tuple(scale)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"the crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    ops: list = [v2.RandomResizedCrop(img_size, scale=scale, interpolation=mode, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaug is True:
        randaug = "rand-m9-mstd0.5-inc1"
    ra = None if randaug is None or randaug is False else (
        parse_randaug(randaug) if isinstance(randaug, str) else tuple(randaug))
    if ra is not None:
        ops.append(v2.RandAugment(num_ops=ra[0], magnitude=ra[1], num_magnitude_bins=11, interpolation=mode))
    ops += to_tensor
    if reprob > 0:
        ops.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(ops)


def build_mixup(
    num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> Callable | None:
    """``fn(images [B,3,H,W], labels [B] int64) -> (images, soft targets [B, C])`` or None when
    ``mixup`` and ``cutmix`` are both 0.

    torchvision's ``v2.MixUp`` / ``v2.CutMix`` (one lambda per batch, like timm's ``mode="batch"``; the
    partner of sample i is i-1, timm's is B-1-i), chosen by ``v2.RandomChoice`` (cutmix with
    ``switch_prob``), applied with probability ``prob`` (else plain one-hot targets); label smoothing is
    folded into the targets afterwards, ``t * (1 - s) + s / C``, which equals timm's mixing of smoothed
    one-hot targets. Each target row sums to 1.
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    choices, p = [], []
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        p.append(switch_prob if mixup > 0 else 1.0)
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        p.append(1.0 - switch_prob if cutmix > 0 else 1.0)
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=p)

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prob >= 1.0 or random.random() < prob:
            images, targets = mix(images, labels)
        else:
            targets = F.one_hot(labels, num_classes).to(images.dtype)
        if label_smoothing > 0:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        return images, targets

    return apply


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[int]:
    """Correct predictions (counts, not rates) for each k, k capped at the number of classes."""
    maxk = min(max(topk), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred == labels[:, None]
    return [hit[:, : min(k, maxk)].any(dim=-1).sum().item() for k in topk]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return autocast_or_null(device.type, dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, *, batch_size: int = 128, device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None, num_workers: int = 0, progress: bool = False,
) -> dict:
    """``{"top1", "top5", "loss", "n"}`` of ``model`` on ``dataset`` (accuracies as fractions in [0, 1]; top-5 is top-k
    with k = min(5, classes); loss = plain cross-entropy). Eval mode; the mode is restored after."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    n, c1, c5, loss_sum = 0, 0, 0, 0.0
    try:
        for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            a1, a5 = accuracy(logits, labels, (1, 5))
            c1, c5, n = c1 + a1, c5 + a5, n + labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation data set is empty")
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss_sum / n, "n": n}


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    out = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    out["num_classes"] = getattr(model, "num_classes", None)
    out["use_mean_pooling"] = getattr(model, "use_mean_pooling", None)
    out["use_rel_pos_bias"] = getattr(model, "use_rel_pos_bias", None)
    return out


def finetune(
    model: nn.Module, train_set, val_set, cfg: FinetuneConfig, *, device: str | torch.device = "cpu",
    output_dir: str | os.PathLike | None = None, progress: bool = True, num_classes: int | None = None,
    trust_pickle: bool = False, overwrite_output_dir: bool = False, run_args: dict | None = None,
) -> dict:
    """Fine-tune ``model`` (a :class:`~beit_fast.model.VisionTransformerForClassification`, already loaded
    with pretrained weights) on ``train_set``, evaluating on ``val_set`` every ``cfg.eval_freq`` epochs
    and after the last. Data sets yield ``(float tensor [3, H, W] already transformed, int label)``.

    Returns ``{"best_top1", "best_epoch", "final_top1", "final_top5", "history"}``, accuracies as fractions
    in [0, 1] (the CLI prints percent),
    ``history`` one dict per epoch (``epoch`` 1-based, ``train_loss``, ``val_loss``, ``top1``, ``top5``,
    ``lr``; val fields None on epochs without evaluation). With ``output_dir``: ``checkpoint-last.pt``
    after every epoch, ``checkpoint-best.pt`` at each new best top-1 (``cfg.save_ckpt``), ``log.jsonl``
    (one line per epoch), ``args.json`` (``run_args``, if given); ``cfg.resume`` continues from a checkpoint
    at its epoch boundary (``trust_pickle=True`` also reads one that pickles other objects: that can run
    code from the file, only for files you trust).

    The output folder is locked for the run (:class:`~beit_fast.checkpoint.OutputDirLock`: a second run
    on it raises, naming the first). A fresh run (``cfg.resume == ""``) into a folder holding another run's
    checkpoints raises :class:`~beit_fast.checkpoint.CheckpointError`, unless ``overwrite_output_dir``
    (which deletes them and the log first).
    """
    cfg.validate()
    out = Path(output_dir) if output_dir is not None else None
    if cfg.resume and out is None and cfg.resume == "auto":
        raise ValueError("resume='auto' needs an output_dir")
    lock = _claim_output_dir(out, cfg, overwrite_output_dir) if out is not None else None
    try:
        if out is not None and run_args is not None:
            with open(out / "args.json", "w") as f:
                json.dump(run_args, f, indent=1, default=str)
        return _finetune(model, train_set, val_set, cfg, device=device, out=out, progress=progress,
                         num_classes=num_classes, trust_pickle=trust_pickle)
    finally:
        if lock is not None:
            lock.release()


def _claim_output_dir(out: Path, cfg: FinetuneConfig, overwrite: bool) -> OutputDirLock:
    """Create and lock ``out``; clear temporary files of interrupted saves; refuse (or, with ``overwrite``,
    clear) another run's checkpoints for a fresh run."""
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputDirLock(out)
    stale = lock.acquire()
    try:
        if stale:
            log.warning("took over a stale lock on %s, left by a run that is no longer running (%s)", out, stale)
        for path in remove_stale_temp_files(out):
            log.warning("removed %s, left by a save that was interrupted", path.name)
        found = existing_checkpoints(out)
        if found and not cfg.resume:
            if not overwrite:
                raise CheckpointError(
                    f"{out} holds another run's checkpoints ({', '.join(p.name for p in found[:4])}): continue that "
                    "run with resume='auto' (CLI: --resume auto), or pass overwrite_output_dir=True (CLI: "
                    "--overwrite_output_dir) to delete them and its log.jsonl and start over")
            for path in remove_run_outputs(out):
                log.warning("overwrite_output_dir: deleted %s of the previous run", path.name)
    except BaseException:
        lock.release()
        raise
    return lock


def _finetune(
    model: nn.Module, train_set, val_set, cfg: FinetuneConfig, *, device: str | torch.device, out: Path | None,
    progress: bool, num_classes: int | None, trust_pickle: bool,
) -> dict:
    device = torch.device(device)
    num_classes = int(num_classes if num_classes is not None else getattr(model, "num_classes", 0))
    if num_classes <= 0:
        raise ValueError("num_classes unknown: pass num_classes or use a model with a head")
    amp_dtype = resolve_amp_dtype(cfg.amp, device)
    seed_everything(cfg.seed)
    if cfg.drop_path is not None and hasattr(model, "set_drop_path_rate"):
        model.set_drop_path_rate(cfg.drop_path)
    model.to(device)

    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    lr = cfg.effective_lr()
    lr_schedule = cosine_scheduler(lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr,
                                   cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd_schedule = cosine_scheduler(cfg.weight_decay, wd_end, cfg.epochs, steps_per_epoch)

    skip = set()
    if cfg.disable_weight_decay_on_rel_pos_bias:
        skip = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay, skip)
    fused = device.type == "cuda" and all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps, fused=fused or None)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    mixup_fn = build_mixup(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                           cfg.label_smoothing)

    start_epoch, best_top1, best_epoch = 0, -1.0, None
    history: list[dict] = []
    checkpointer = Checkpointer(out) if out is not None else None
    if cfg.resume:
        state = None
        if cfg.resume == "auto":
            path, state = find_resume_checkpoint(out, warn=log.warning, trust_pickle=trust_pickle)
            if path is None and list_checkpoints(out):
                raise CheckpointError(f"resume='auto': no checkpoint in {out} can be loaded")
        else:
            path, state = cfg.resume, validate_checkpoint(cfg.resume, trust_pickle=trust_pickle)
        if state is not None:
            if state.get("kind") != "finetune":
                raise CheckpointError(f"{path} is not a fine-tuning checkpoint (resume a fine-tuning run; load "
                                      "pretrained weights with load_pretrained)")
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path} does not fit this model / optimizer: {e}") from None
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"])
            best_top1 = float(state.get("best_top1", -1.0))
            best_epoch = state.get("best_epoch")
            history = list(state.get("history", []))
            if state.get("rng") is not None:
                set_rng_state(state["rng"])
            log.info("resumed from %s after epoch %d (step %d)", path, start_epoch, int(state["step"]))
            if start_epoch >= cfg.epochs:
                log.info("the run is complete (epoch %d of %d): nothing to train", start_epoch, cfg.epochs)
            if out is not None:
                trim_jsonl(out / "log.jsonl", "epoch", start_epoch)
                if cfg.resume == "auto" or Path(path).resolve() == (out / LAST_NAME).resolve():
                    checkpointer.restore_copies(state, path)  # copies cut short by a crash

    def save(epoch: int, is_best: bool) -> None:
        if out is None or not cfg.save_ckpt:
            return
        state = {"kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                 "step": epoch * steps_per_epoch, "model_config": _model_config(model),
                 "finetune_config": asdict(cfg), "best_top1": best_top1, "best_epoch": best_epoch,
                 "history": history, "rng": rng_state()}
        checkpointer.save(state, best=is_best)

    eval_bs = cfg.eval_batch_size or max(1, int(1.5 * cfg.batch_size))
    pin = device.type == "cuda"
    log_file = open(out / "log.jsonl", "a") if out is not None else None
    bad_steps = 0
    last_eval: dict | None = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
            loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                                 num_workers=cfg.num_workers, pin_memory=pin, generator=gen)
            model.train()
            loss_sum, loss_n = 0.0, 0
            t0 = time.time()
            bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                       leave=False, dynamic_ncols=True)
            for i, (images, labels) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                apply_schedule(optimizer, lr_schedule[step], wd_schedule[step])
                images = images.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, labels)
                with _autocast(device, amp_dtype):
                    logits = model(images)
                if mixup_fn is not None:
                    loss = soft_target_cross_entropy(logits, targets)
                else:
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                loss_value = loss.item()
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(loss_value):
                    bad_steps += 1
                    log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step + 1, loss_value,
                                bad_steps)
                    if bad_steps >= cfg.max_bad_steps:
                        raise RuntimeError(f"{bad_steps} consecutive non-finite losses at step {step + 1}: lower the "
                                           "lr, or use amp bf16/none")
                    continue
                bad_steps = 0
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                loss_sum += loss_value
                loss_n += 1
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr_schedule[step]:.2e}")
            bar.close()
            done = epoch + 1
            record = {"epoch": done, "step": done * steps_per_epoch,
                      "train_loss": loss_sum / loss_n if loss_n else math.nan,
                      "lr": float(lr_schedule[done * steps_per_epoch - 1]), "val_loss": None, "top1": None,
                      "top5": None, "epoch_time_s": time.time() - t0}
            is_best = False
            if val_set is not None and (done % cfg.eval_freq == 0 or done == cfg.epochs):
                last_eval = evaluate(model, val_set, batch_size=eval_bs, device=device, amp_dtype=amp_dtype,
                                     num_workers=cfg.num_workers)
                record.update(val_loss=last_eval["loss"], top1=last_eval["top1"], top5=last_eval["top5"])
                if last_eval["top1"] > best_top1:
                    best_top1, best_epoch, is_best = last_eval["top1"], done, True
            history.append(record)
            save(done, is_best)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            log.info("epoch %d/%d: train loss %.4f%s", done, cfg.epochs, record["train_loss"],
                     f", val top-1 {100 * record['top1']:.2f}% top-5 {100 * record['top5']:.2f}% (best "
                     f"{100 * best_top1:.2f}% at epoch "
                     f"{best_epoch})" if record["top1"] is not None else "")
    finally:
        if log_file is not None:
            log_file.close()
    if last_eval is None and val_set is not None:  # resumed after the last epoch
        last_eval = evaluate(model, val_set, batch_size=eval_bs, device=device, amp_dtype=amp_dtype)
    return {
        "best_top1": best_top1 if best_epoch is not None else None,
        "best_epoch": best_epoch,
        "final_top1": last_eval["top1"] if last_eval else None,
        "final_top5": last_eval["top5"] if last_eval else None,
        "history": history,
        "steps": total_steps,
        "lr": lr,
    }


# --------------------------------------------------------------------------------------------------
# The flags of beit_fast.finetune and beit_fast.linear_probe -> data sets and a classifier
# --------------------------------------------------------------------------------------------------
DEMO_DEFAULTS = dict(
    model="tiny", input_size=32, patch_size=4, epochs=30, batch_size=64, lr=2e-3, warmup_epochs=3, mixup=0.0,
    cutmix=0.0, reprob=0.0, aa="none", hflip=0.0, min_crop_scale=0.5, crop_pct=1.0, drop_path=0.1,
    output_dir="runs/beit_finetune_demo",
)
OFFICIAL_DEFAULTS = dict(
    model="base", input_size=224, patch_size=16, epochs=100, batch_size=64, lr=4e-3, warmup_epochs=20, mixup=0.8,
    cutmix=1.0, reprob=0.25, aa="rand-m9-mstd0.5-inc1", hflip=0.5, min_crop_scale=0.08, crop_pct=None,
    drop_path=0.1, output_dir="runs/beit_finetune",
)


def load_datasets(args: argparse.Namespace, train_transform, eval_transform):
    """(train set, val set, class names) of the CLI's data flags; SystemExit with a clear message on errors."""
    if args.data_path is None:
        from .digits import DigitsDataset

        train = DigitsDataset("train", image_size=args.input_size, transform=train_transform,
                              labels_per_class=args.labels_per_class, seed=args.seed)
        val = DigitsDataset("val", image_size=args.input_size, transform=eval_transform, seed=args.seed)
        classes = list(DigitsDataset.classes)
    else:
        if args.labels_per_class is not None:
            raise SystemExit("error: --labels_per_class only applies to the embedded digits data (no --data_path)")
        from torchvision.datasets import ImageFolder

        root = Path(args.data_path)
        if not root.is_dir():
            raise SystemExit(f"error: --data_path {root} is not a folder")
        sets = []
        for split, tf in (("train", train_transform), ("val", eval_transform)):
            folder = root / split
            if not folder.is_dir():
                raise SystemExit(f"error: {folder} not found: --data_path must hold train/ and val/ folders, each "
                                 "with one subfolder of images per class")
            try:
                sets.append(ImageFolder(str(folder), transform=tf))
            except (FileNotFoundError, RuntimeError) as e:
                raise SystemExit(f"error: {folder}: {e}") from None
        train, val = sets
        if train.classes != val.classes:
            raise SystemExit(f"error: train/ and val/ have different class folders: {train.classes[:5]}... vs "
                             f"{val.classes[:5]}...")
        classes = list(train.classes)
    if args.nb_classes is not None and args.nb_classes != len(classes):
        raise SystemExit(f"error: --nb_classes {args.nb_classes}, but the data has {len(classes)} classes")
    return train, val, classes


def build_model_for_args(args: argparse.Namespace, num_classes: int, checkpoint: str | None):
    """``(classifier, loaded checkpoint dict or None)`` for the CLI flags: the architecture of ``checkpoint``
    (ours: its ``model_config``; others: read off the weights) unless ``--model`` is given, else the
    demo/real named config. ``--rel_pos_bias`` unset: per-block bias when the checkpoint has a relative
    position bias table (or without a checkpoint), none otherwise. The checkpoint is read once; pass the
    returned dict to ``load_pretrained``."""
    from .pretrained import PretrainedLoadError, classifier_config_from_checkpoint, load_state_dict_any

    defaults = DEMO_DEFAULTS if args.data_path is None else OFFICIAL_DEFAULTS
    overrides: dict = {}
    if args.input_size is not None:
        overrides["img_size"] = args.input_size
    if args.patch_size is not None:
        overrides["patch_size"] = args.patch_size
    if args.abs_pos_emb is not None:
        overrides["use_abs_pos_emb"] = args.abs_pos_emb
    if args.layer_scale_init_value is not None:
        overrides["init_values"] = args.layer_scale_init_value
    overrides["drop_path_rate"] = args.drop_path
    overrides["use_shared_rel_pos_bias"] = False
    ckpt = None
    try:
        if checkpoint:
            sd, config = load_state_dict_any(checkpoint, trust_pickle=getattr(args, "trust_pickle", False))
            ckpt = {"model": sd, **({"model_config": config} if config else {})}
        use_rel_pos_bias = args.rel_pos_bias
        if use_rel_pos_bias is None:
            use_rel_pos_bias = ckpt is None or any(k.endswith("relative_position_bias_table") for k in ckpt["model"])
        if args.model is None and ckpt is not None:
            cfg = classifier_config_from_checkpoint(ckpt, **overrides)
            source = f"the architecture of {checkpoint}"
        else:
            name = args.model or defaults["model"]
            overrides.setdefault("img_size", defaults["input_size"])
            overrides.setdefault("patch_size", defaults["patch_size"])
            cfg = get_config(name, **overrides)
            source = f"model {name}"
    except (ValueError, PretrainedLoadError) as e:
        raise SystemExit(f"error: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    args.input_size = cfg.img_size
    args.patch_size = cfg.patch_size
    model = build_classifier(cfg, num_classes, use_mean_pooling=args.use_mean_pooling,
                             use_rel_pos_bias=use_rel_pos_bias, init_scale=args.init_scale)
    log.info("classifier from %s: %d blocks, width %d, %d heads, %dx%d patches of %d px, %s pooling, %s",
             source, cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.grid_size, cfg.grid_size, cfg.patch_size,
             "mean" if args.use_mean_pooling else "[CLS]",
             "per-block relative position bias" if use_rel_pos_bias else "no relative position bias")
    return model, ckpt
