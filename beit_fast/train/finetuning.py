"""BEiT fine-tuning for image classification on the one engine and loop (the library; the command line is
``python -m beit_fast.finetune``, which builds the classifier and data with :mod:`.classification_setup`).

The official ``run_class_finetuning.py`` recipe: a classifier built from a pretraining checkpoint with mean
pooling + ``fc_norm`` (or [CLS]), layer-wise lr decay, label smoothing, mixup / cutmix (on the device, before
the step), drop path, linear warmup + cosine per step, AdamW (fused, over the layer-decay groups); evaluation
with the ``crop_pct`` center crop, top-1 / top-5; the best checkpoint kept.

The step: :func:`beit_fast.train.loss.build_finetune_loss` (the classifier + its loss as one task module) run by
:class:`~beit_fast.train.engine.Engine` with the non-finite check on the device (no host read per step; a
non-finite loss or gradient skips the update inside fused AdamW). ``fast``: the classifier's fast path (fused
attention with each block's relative position bias, optional activation checkpointing) compiled with static
shapes (``drop_last`` batches of one size). The epochs, logs, checkpoints, exact resume and graceful stop are
:class:`~beit_fast.train.loop.TrainLoop`'s, with pretraining's non-finite policy (save, then stop after
``max_bad_steps`` in a row).

Library use::

    model = build_classifier("base", num_classes=1000, drop_path_rate=0.1)
    load_pretrained(model, "beit_base_patch16_224_pt22k.pth")
    result = finetune(model, train_set, val_set, FinetuneConfig(epochs=100), device="cuda", output_dir="runs/ft")
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..utils.checkpoint import CheckpointError, CheckpointSaveError, atomic_write_text
from .checkpoint_folder import Checkpointer
from ..config import FinetuneConfig
from ..data.pretraining import ResumableSampler
from .evaluation import evaluate
from .loss import build_finetune_loss
from .optim import cosine_scheduler, param_groups_layer_decay
from ..utils.rng import seed_everything
from ..data.transforms.classification import build_mixup
from .engine import Engine, resolve_amp_dtype
from .epoch_seeds import EpochSeeded
from .feed import default_num_workers
from .loop import EpochEnd, LoopConfig, LoopHooks, TrainLoop
from .run_dir import choose_resume_state, claim_output_dir

__all__ = ["finetune", "default_layer_decay", "FinetuneConfig", "ClassificationBatches"]

log = logging.getLogger("beit_fast.finetuning")


def default_layer_decay(depth: int) -> float:
    """The paper's layer decay: 0.75 for large (24 blocks or more), 0.65 otherwise (base)."""
    return 0.75 if depth >= 24 else 0.65


def finetune(
    model: nn.Module, train_set, val_set, cfg: FinetuneConfig, *, device: str | torch.device = "cpu",
    output_dir: str | os.PathLike | None = None, progress: bool = True, num_classes: int | None = None,
    trust_pickle: bool = False, overwrite_output_dir: bool = False, run_args: dict | None = None,
) -> dict:
    """Fine-tune ``model`` (a :class:`~beit_fast.model.beit.VisionTransformerForClassification`, already loaded
    with pretrained weights) on ``train_set``, evaluating on ``val_set`` every ``cfg.eval_freq`` epochs
    and after the last. Data sets yield ``(float tensor [3, H, W] already transformed, int label)``.

    Returns ``{"best_top1", "best_epoch", "final_top1", "final_top5", "history", "steps", "lr"}``, accuracies
    as fractions in [0, 1] (the CLI prints percent), ``history`` one dict per epoch (``epoch`` 1-based,
    ``train_loss``, ``val_loss``, ``top1``, ``top5``, ``lr``; val fields None on epochs without evaluation).
    With ``output_dir``: ``checkpoint-last.pt`` after every epoch (and at a stop), ``checkpoint-best.pt`` at
    each new best top-1 (``cfg.save_ckpt``), ``log.jsonl`` (one line per epoch; TensorBoard events too with
    ``cfg.log_dir``), ``args.json`` (``run_args``, if given); ``cfg.resume`` continues from a checkpoint
    (``trust_pickle=True`` also reads one that pickles other objects: that can run code from the file, only
    for files you trust); a resumed run is bit for bit the uninterrupted one (with ``num_workers=0`` also
    from a checkpoint in the middle of an epoch; data workers draw their augmentation seeds per epoch).

    The output folder is locked for the run (:class:`~beit_fast.train.checkpoint_folder.OutputDirLock`: a second run
    on it raises, naming the first). A fresh run (``cfg.resume == ""``) into a folder holding another run's
    checkpoints raises :class:`~beit_fast.utils.checkpoint.CheckpointError`, unless ``overwrite_output_dir``
    (which deletes them and the log first). ``max_bad_steps`` consecutive non-finite steps save a checkpoint
    and raise :class:`~beit_fast.train.loop.NonFiniteLossError`.
    """
    cfg.validate()
    out = Path(output_dir) if output_dir is not None else None
    if cfg.resume == "auto" and out is None:
        raise ValueError("resume='auto' needs an output_dir")
    if len(train_set) // cfg.batch_size == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    lock = claim_output_dir(out, resume=cfg.resume, overwrite=overwrite_output_dir) if out is not None else None
    try:
        if out is not None and run_args is not None:
            _write_args(out / "args.json", run_args)
        return _finetune(model, train_set, val_set, cfg, device=torch.device(device), out=out, progress=progress,
                         num_classes=num_classes, trust_pickle=trust_pickle)
    finally:
        if lock is not None:
            lock.release()


class ClassificationBatches:
    """The engine's ``prepare``: ``(images, labels)`` from the loader -> ``(images, targets)`` on the device,
    mixed (mixup / cutmix soft targets with the label smoothing folded in) when ``mixup_fn`` is given, else
    the int64 labels. The same shapes every step: what the compiled task module sees."""

    def __init__(self, device: torch.device, mixup_fn=None) -> None:
        self.device, self.mixup_fn = device, mixup_fn

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            return self.mixup_fn(images, labels)
        return images, labels


def _build_engine(model: nn.Module, cfg: FinetuneConfig, device: torch.device, num_classes: int,
                  steps_per_epoch: int) -> Engine:
    amp_dtype = resolve_amp_dtype(cfg.amp, device)
    fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
    if not fast and cfg.attn_backend != "auto" and hasattr(model, "configure_fast_path"):
        model.configure_fast_path(attention=cfg.attn_backend)  # the eager step with this attention
    task = build_finetune_loss(model, amp_dtype, cfg.label_smoothing, fast=fast, attention=cfg.attn_backend,
                               activation_checkpointing=cfg.checkpointing_mode())
    skip = set()
    if cfg.disable_weight_decay_on_rel_pos_bias:
        skip = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay, skip)
    # Fused AdamW (CUDA and CPU): one kernel for all the groups, and the device-side skip (found_inf).
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.effective_lr(), betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                  fused=fused or None)
    lr_schedule = cosine_scheduler(cfg.effective_lr(), cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                                   cfg.warmup_lr, cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd_schedule = cosine_scheduler(cfg.weight_decay, wd_end, cfg.epochs, steps_per_epoch)
    mixup_fn = build_mixup(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                           cfg.label_smoothing)
    return Engine(task, optimizer, device, lr_schedule, wd_schedule, clip_grad=cfg.clip_grad,
                  prepare=ClassificationBatches(device, mixup_fn), compile=fast and cfg.compile,
                  nonfinite_check="device")


class _FinetuneHooks(LoopHooks):
    """Fine-tuning's part of the loop: per-epoch augmentation seeds, evaluation at epoch ends (top-1 picks
    checkpoint-best.pt), one log record per epoch, what checkpoints add."""

    def __init__(self, model, cfg: FinetuneConfig, engine: Engine, loader, val_set, device, steps_per_epoch,
                 num_workers: int = 0) -> None:
        self.model, self.cfg, self.engine, self.loader, self.val_set = model, cfg, engine, loader, val_set
        self.device, self.steps_per_epoch, self.num_workers = device, steps_per_epoch, num_workers
        self.last_eval: dict | None = None
        self.t0 = time.time()

    def start_epoch(self, epoch: int) -> None:
        # Data workers draw epoch e's augmentations from seeds of (seed, e, worker): fixed per epoch, whether the
        # (persistent) workers are new or not. The iterator's base seed comes from this generator, not the global
        # RNG, so that a run resumed mid-epoch consumes the global RNG as the uninterrupted one did.
        self.loader.dataset.set_epoch(epoch)
        self.loader.generator = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        self.t0 = time.time()

    def checkpoint_extras(self) -> dict:
        return {"kind": "finetune", "model_config": model_config(self.model), "finetune_config": asdict(self.cfg)}

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate(self.model, self.val_set, batch_size=cfg.eval_batch_size or max(1, int(1.5 * cfg.batch_size)),
                        device=self.device, amp_dtype=self.engine.amp_dtype, num_workers=self.num_workers)

    def end_epoch(self, epoch: int, train_loss: float) -> EpochEnd:
        cfg = self.cfg
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "train_loss": train_loss,
                  "lr": float(self.engine.lr_schedule[epoch * self.steps_per_epoch - 1]), "val_loss": None,
                  "top1": None, "top5": None, "epoch_time_s": time.time() - self.t0}
        if self.val_set is not None and (epoch % cfg.eval_freq == 0 or epoch == cfg.epochs):
            self.last_eval = self.evaluate()
            record.update(val_loss=self.last_eval["loss"], top1=self.last_eval["top1"], top5=self.last_eval["top5"])
        message = f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}"
        if record["top1"] is not None:
            message += f", val top-1 {100 * record['top1']:.2f}% top-5 {100 * record['top5']:.2f}%{{best}}"
        return EpochEnd(score=record["top1"], record=record, message=message)


def model_config(model: nn.Module) -> dict:
    """What a fine-tuning checkpoint records of the classifier's architecture."""
    cfg = getattr(model, "cfg", None)
    out = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    out["num_classes"] = getattr(model, "num_classes", None)
    out["use_mean_pooling"] = getattr(model, "use_mean_pooling", None)
    out["use_rel_pos_bias"] = getattr(model, "use_rel_pos_bias", None)
    return out


def _finetune(model: nn.Module, train_set, val_set, cfg: FinetuneConfig, *, device: torch.device, out: Path | None,
              progress: bool, num_classes: int | None, trust_pickle: bool) -> dict:
    num_classes = int(num_classes if num_classes is not None else getattr(model, "num_classes", 0))
    if num_classes <= 0:
        raise ValueError("num_classes unknown: pass num_classes or use a model with a head")
    seed_everything(cfg.seed)
    if cfg.drop_path is not None and hasattr(model, "set_drop_path_rate"):
        model.set_drop_path_rate(cfg.drop_path)
    model.to(device)
    steps_per_epoch = len(train_set) // cfg.batch_size
    engine = _build_engine(model, cfg, device, num_classes, steps_per_epoch)
    sampler = ResumableSampler(len(train_set), seed=cfg.seed, shuffle=True)
    num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device.type, on_cpu=0)
    # Persistent workers (no start-up each epoch), reseeded per epoch by EpochSeeded.
    loader = torch.utils.data.DataLoader(EpochSeeded(train_set, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
                                         drop_last=True, num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0)
    hooks = _FinetuneHooks(model, cfg, engine, loader, val_set, device, steps_per_epoch, num_workers)
    loop = TrainLoop(engine, loader, sampler, LoopConfig(
        epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, batch_size=cfg.batch_size, images_per_step=cfg.batch_size,
        log_freq=cfg.log_freq, step_records=False, save=cfg.save_ckpt and out is not None, save_ckpt_freq=0,
        max_bad_steps=cfg.max_bad_steps, stop_after_steps=cfg.stop_after_steps, progress=progress, seed=cfg.seed,
        metric_name="acc", score="top1", higher_is_better=True, nonfinite_hint="Lower the lr, or use amp bf16/none."),
        hooks, output_dir=out, checkpointer=Checkpointer(out) if out is not None else None, log_dir=cfg.log_dir,
        device=device)
    if cfg.resume:
        state = choose_resume_state(cfg.resume, out if out is not None else Path(cfg.resume).parent,
                                    trust_pickle=trust_pickle)
        if state is not None and state.get("kind") != "finetune":
            raise CheckpointError(f"{state['_path']} is not a fine-tuning checkpoint (resume a fine-tuning run; load "
                                  "pretrained weights with load_pretrained)")
        if state is not None and out is None:
            state["_restore_copies"] = False
        loop.restore(state)
    result = loop.run()
    if hooks.last_eval is None and val_set is not None:  # resumed after the last epoch
        hooks.last_eval = hooks.evaluate()
    best_epoch = result["best_epoch"]
    return {"best_top1": result["best"] if best_epoch is not None else None, "best_epoch": best_epoch,
            "final_top1": hooks.last_eval["top1"] if hooks.last_eval else None,
            "final_top5": hooks.last_eval["top5"] if hooks.last_eval else None, "history": result["history"],
            "steps": steps_per_epoch * cfg.epochs, "lr": cfg.effective_lr(), "interrupted": result["interrupted"]}


def _write_args(path: Path, run_args: dict) -> None:
    """``args.json``, written atomically (a link planted under the name is replaced, never followed)."""
    try:
        atomic_write_text(path, json.dumps(run_args, indent=1, default=str))
    except CheckpointSaveError as e:
        raise CheckpointError(f"{e}") from None
