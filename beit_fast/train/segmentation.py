"""Semantic segmentation training on the one engine and loop (the library; the command line is
``python -m beit_fast.segment``).

The official mmseg recipe (``upernet_beit_base_12_512_slide_160k_ade20k*.py``), iteration-based: AdamW over
layer-wise lr-decay groups (:func:`segmentation_param_groups`), poly schedule with linear warmup
(:func:`poly_schedule`), the loss of :class:`~beit_fast.model.segmentation.SegmentationLoss` (decode + 0.4 *
auxiliary CE, ignore 255) as the engine's task module with the non-finite check on the device; the fast step
(fused attention with per-block tables, activation checkpointing, compiled with static shapes) with
``fast``. A loop "epoch" is ``eval_interval`` iterations: after each, an evaluation (mIoU, mAcc, aAcc by
:mod:`.metrics`, predictions by :mod:`.inference`), ``checkpoint-last.pt`` and ``checkpoint-best.pt`` (mIoU).
Checkpoints, exact resume, graceful stop and the non-finite policy are :class:`~beit_fast.train.loop.TrainLoop`'s.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .checkpoint_folder import Checkpointer
from ..utils.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from ..config.segment import SegmentConfig
from ..utils.amp import autocast_or_null
from .optim import layer_id_for_vit, param_groups_layer_decay
from ..utils.rng import seed_everything
from .engine import Engine, resolve_amp_dtype
from .loop import EpochEnd, LoopConfig, LoopHooks, TrainLoop
from .run_dir import choose_resume_state, claim_output_dir
from ..model.segmentation_inference import model_logits, predict
from .segmentation_metrics import SegmentationMetric
from ..model.segmentation import BeitForSegmentation, SegmentationHeadConfig, build_segmentation_loss

__all__ = ["poly_schedule", "segmentation_layer_id", "segmentation_param_groups", "IterationSampler",
           "evaluate_segmentation", "train_segmentation", "read_backbone_checkpoint", "load_backbone_pretrained", "segmenter_from_checkpoint",
           "CHECKPOINT_KIND"]

log = logging.getLogger("beit_fast.model.segmentation")
CHECKPOINT_KIND = "segment"


def poly_schedule(lr: float, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
                  power: float = 1.0, min_lr: float = 0.0) -> np.ndarray:
    """mmcv's ``PolyLrUpdaterHook`` with linear warmup, per iteration ``t`` (``float64[max_iters]``):
    ``regular = (lr - min_lr) * (1 - t / max_iters) ** power + min_lr``; during the warmup
    ``regular * (1 - (1 - t / warmup_iters) * (1 - warmup_ratio))``."""
    t = np.arange(max_iters, dtype=np.float64)
    regular = (lr - min_lr) * (1 - t / max_iters) ** power + min_lr
    if warmup_iters > 0:
        k = (1 - t / warmup_iters) * (1 - warmup_ratio)
        regular = np.where(t < warmup_iters, regular * (1 - k), regular)
    return regular


def segmentation_layer_id(name: str, num_layers: int) -> int:
    """The official mmseg ``get_num_layer_for_vit``: ``backbone.{cls_token,mask_token,pos_embed,patch_embed}``
    0, ``backbone.blocks.{i}`` i + 1, everything else (the neck ``fpn*``, the heads) ``num_layers + 1``."""
    if name.startswith("backbone.") and not name.startswith(("backbone.fpn", "backbone.rel_pos_bias")):
        return layer_id_for_vit(name.removeprefix("backbone."), num_layers)
    return num_layers + 1


def segmentation_param_groups(model: BeitForSegmentation, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-decay groups as the official ``LayerDecayOptimizerConstructor``: lr scale
    ``layer_decay ** (L + 1 - layer)``, no weight decay for 1-D parameters (incl. BatchNorm) and biases."""
    return param_groups_layer_decay(model, weight_decay, layer_decay, layer_id=segmentation_layer_id)


class IterationSampler(Sampler[int]):
    """Sample indices for iteration-based training: an endless sequence of passes over the data set (pass
    ``p`` in the order ``randperm(n)`` of a generator seeded ``seed + p``), cut into loop epochs of
    ``samples_per_epoch``. Resumable mid-epoch like :class:`beit_fast.data.pretraining.ResumableSampler`
    (``set_epoch``, ``set_start``). One process."""

    def __init__(self, dataset_len: int, samples_per_epoch: int, seed: int = 0) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        self.n, self.num_samples, self.seed = int(dataset_len), int(samples_per_epoch), int(seed)
        self.epoch, self._start, self._start_epoch = 0, 0, 0
        self._cache: dict[int, list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start_index: int, epoch: int | None = None) -> None:
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self._start, self._start_epoch = int(start_index), self.epoch if epoch is None else int(epoch)

    @property
    def start(self) -> int:
        return self._start if self._start_epoch == self.epoch else 0

    def _pass(self, p: int) -> list[int]:
        if p not in self._cache:
            g = torch.Generator().manual_seed(self.seed + p)
            self._cache = {p: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[p]

    def indices(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else int(epoch)
        first = epoch * self.num_samples
        return [self._pass(g // self.n)[g % self.n] for g in range(first, first + self.num_samples)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


@torch.no_grad()
def evaluate_segmentation(model: BeitForSegmentation, dataset, *, device: str | torch.device = "cpu",
                          amp_dtype: torch.dtype | None = None, mode: str = "slide", stride: int = 341,
                          img_scale: tuple[int, int] | None = (2048, 512), ratios=(1.0,), flip: bool = False,
                          num_workers: int = 0, progress: bool = False) -> dict:
    """mIoU / mAcc / aAcc (and per-class IoU / Acc) of ``model`` on ``dataset`` (samples ``(normalised image
    [3, H, W], label [H, W])`` at the original size, see :class:`~.data.SegEvalTransform`), predicted by
    :func:`~.inference.predict` (``mode`` with the model's crop size, ``stride``, ``img_scale``, ``ratios``,
    ``flip``). Eval mode; the mode is restored after."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    metric = SegmentationMetric(model.num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()

    def logits_fn(x):
        with autocast_or_null(device.type, amp_dtype):
            return model_logits(model, x).float()

    try:
        n = 0
        for image, label in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            pred = predict(logits_fn, image.to(device), model.num_classes, mode=mode, crop=model.img_size,
                           stride=stride, img_scale=img_scale, ratios=ratios, flip=flip)
            metric.update(pred, label)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation data set is empty")
    return {**metric.compute(), "n": n}


def _check_not_segmentation(sd_keys, where: str) -> None:
    if any(k.startswith(("decode_head.", "backbone.blocks.")) for k in sd_keys):
        raise CheckpointError(f"{where} is a segmentation checkpoint, not a pretrained backbone: continue its run with "
                              "--resume, or load it with segmenter_from_checkpoint")


def read_backbone_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Mapping:
    """A pretrained checkpoint read once (safe loading), refused when it is a segmentation checkpoint: what
    :func:`beit_fast.interop.pretrained.classifier_config_from_checkpoint` and :func:`load_backbone_pretrained`
    then take."""
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    inner = next((ckpt[k] for k in ("model", "state_dict", "module") if isinstance(ckpt.get(k), Mapping)), ckpt)
    _check_not_segmentation(inner, str(path))
    if ckpt.get("kind") == CHECKPOINT_KIND:
        _check_not_segmentation(["decode_head."], str(path))
    return ckpt


def load_backbone_pretrained(model: BeitForSegmentation, source, *, rel_pos_resize: str = "bicubic",
                             trust_pickle: bool = False) -> dict:
    """Pretrained weights (pretraining or fine-tuned classification checkpoint; ours, official, HF or timm
    layout) into ``model.backbone`` the official way (:func:`beit_fast.interop.pretrained.load_pretrained`: the shared
    table copied into every block and resized to the crop's grid, MIM head and norms dropped). The neck
    starts fresh. A segmentation checkpoint is refused (resume it instead)."""
    from ..interop.pretrained import load_pretrained

    where = "the given checkpoint" if isinstance(source, Mapping) else str(source)
    ckpt = source if isinstance(source, Mapping) else load_checkpoint(source, trust_pickle=trust_pickle)
    if isinstance(ckpt, Mapping):
        inner = next((ckpt[k] for k in ("model", "state_dict", "module") if isinstance(ckpt.get(k), Mapping)), ckpt)
        _check_not_segmentation(inner, where)
        if ckpt.get("kind") == CHECKPOINT_KIND:
            _check_not_segmentation(["decode_head."], where)
    return load_pretrained(model.backbone, ckpt, rel_pos_resize=rel_pos_resize, optional=("fpn1.", "fpn2."),
                           trust_pickle=trust_pickle)


def segmenter_from_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[BeitForSegmentation, dict]:
    """``(model with the checkpoint's weights, the checkpoint)`` of a segmentation run's checkpoint; another
    task's checkpoint raises :class:`~beit_fast.utils.checkpoint.CheckpointError` naming its kind."""
    from ..model.beit import BeitConfig

    state = load_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a segmentation checkpoint (kind {kind!r}); give a checkpoint of "
                              "python -m beit_fast.segment")
    mc = state["model_config"]
    model = BeitForSegmentation(BeitConfig(**mc["backbone"]), SegmentationHeadConfig(**mc["head"]))
    model.load_state_dict(state["model"])
    return model, state


class _SegmentHooks(LoopHooks):
    def __init__(self, model, cfg: SegmentConfig, engine: Engine, loader, val_set, device, progress) -> None:
        self.model, self.cfg, self.engine, self.loader, self.val_set = model, cfg, engine, loader, val_set
        self.device, self.progress = device, progress
        self.last_eval: dict | None = None
        self.t0 = time.time()

    def start_epoch(self, epoch: int) -> None:
        self.loader.generator = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        self.t0 = time.time()

    def checkpoint_extras(self) -> dict:
        return {"kind": CHECKPOINT_KIND, "model_config": self.model.model_config(), "segment_config": asdict(self.cfg)}

    def evaluate(self) -> dict:
        c = self.cfg
        return evaluate_segmentation(self.model, self.val_set, device=self.device, amp_dtype=self.engine.amp_dtype,
                                     mode=c.test_mode, stride=c.stride, img_scale=c.img_scale, ratios=c.aug_ratios,
                                     flip=c.flip, progress=self.progress)

    def end_epoch(self, epoch: int, train_loss: float) -> EpochEnd:
        c = self.cfg
        it = epoch * c.eval_interval
        record = {"epoch": epoch, "step": it, "train_loss": train_loss, "lr": float(self.engine.lr_schedule[it - 1]),
                  "mIoU": None, "mAcc": None, "aAcc": None, "time_s": time.time() - self.t0}
        message = f"iter {it}/{c.max_iters}: train loss {train_loss:.4f}"
        if self.val_set is not None:
            self.last_eval = self.evaluate()
            record.update({k: self.last_eval[k] for k in ("mIoU", "mAcc", "aAcc")})
            message += (f", val mIoU {100 * record['mIoU']:.2f} mAcc {100 * record['mAcc']:.2f} "
                        f"aAcc {100 * record['aAcc']:.2f}{{best}}")
        return EpochEnd(score=record["mIoU"], record=record, message=message)


def build_segmentation_engine(model: BeitForSegmentation, cfg: SegmentConfig, device: torch.device) -> Engine:
    """The engine of a segmentation run: the task module (fast or eager), fused AdamW over the layer-decay
    groups, the poly schedule, the device-side non-finite check."""
    amp_dtype = resolve_amp_dtype(cfg.amp, device)
    fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
    task = build_segmentation_loss(model, amp_dtype, fast=fast, attention=cfg.attn_backend,
                                   activation_checkpointing=cfg.checkpointing_mode(), aux_weight=cfg.aux_weight,
                                   avg_non_ignore=cfg.avg_non_ignore)
    groups = segmentation_param_groups(model, cfg.weight_decay, cfg.resolved_layer_decay())
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.resolved_lr(), betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                  fused=fused or None)
    schedule = poly_schedule(cfg.resolved_lr(), cfg.max_iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.power,
                             cfg.min_lr)
    return Engine(task, optimizer, device, schedule, None, clip_grad=cfg.clip_grad, compile=fast and cfg.compile,
                  nonfinite_check="device")


def train_segmentation(model: BeitForSegmentation, train_set, val_set, cfg: SegmentConfig, *,
                       device: str | torch.device = "cpu", output_dir: str | os.PathLike | None = None,
                       progress: bool = True, trust_pickle: bool = False, overwrite_output_dir: bool = False,
                       run_args: dict | None = None) -> dict:
    """Train ``model`` (backbone already loaded) on ``train_set`` (samples of :class:`~.data.SegTrainTransform`:
    fixed-size crops) for ``cfg.max_iters`` iterations, evaluating ``val_set`` every ``cfg.eval_interval``.

    Returns ``{"best_mIoU", "best_iter", "final": last evaluation dict or None, "history", "steps",
    "interrupted"}``. Output folder, lock, resume, overwrite and non-finite policy: as
    :func:`beit_fast.train.finetuning.finetune` (a checkpoint of another kind is refused on resume)."""
    cfg.validate()
    device = torch.device(device)
    out = Path(output_dir) if output_dir is not None else None
    if cfg.resume == "auto" and out is None:
        raise ValueError("resume='auto' needs an output_dir")
    lock = claim_output_dir(out, resume=cfg.resume, overwrite=overwrite_output_dir) if out is not None else None
    try:
        if out is not None and run_args is not None:
            # atomically (a link planted under the name is replaced, never followed); CheckpointSaveError on failure
            atomic_write_text(out / "args.json", json.dumps(run_args, indent=1, default=str))
        seed_everything(cfg.seed)
        model.backbone.set_drop_path_rate(cfg.drop_path)
        model.to(device)
        engine = build_segmentation_engine(model, cfg, device)
        sampler = IterationSampler(len(train_set), cfg.eval_interval * cfg.batch_size, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        hooks = _SegmentHooks(model, cfg, engine, loader, val_set, device, progress)
        loop = TrainLoop(engine, loader, sampler, LoopConfig(
            epochs=cfg.max_iters // cfg.eval_interval, steps_per_epoch=cfg.eval_interval, batch_size=cfg.batch_size,
            images_per_step=cfg.batch_size, log_freq=cfg.log_freq, step_records=True, save=out is not None,
            save_ckpt_freq=0, max_bad_steps=cfg.max_bad_steps, stop_after_steps=cfg.stop_after_steps,
            progress=progress, seed=cfg.seed, metric_name="pixel_acc", score="mIoU", higher_is_better=True),
            hooks, output_dir=out, checkpointer=Checkpointer(out) if out is not None else None, log_dir=cfg.log_dir,
            device=device)
        if cfg.resume:
            state = choose_resume_state(cfg.resume, out if out is not None else Path(cfg.resume).parent,
                                        trust_pickle=trust_pickle)
            if state is not None and state.get("kind") != CHECKPOINT_KIND:
                raise CheckpointError(f"{state['_path']} is a {state.get('kind')!r} checkpoint, not a segmentation "
                                      "one: resume a segmentation run (load pretrained weights with --finetune)")
            if state is not None and out is None:
                state["_restore_copies"] = False
            loop.restore(state)
        result = loop.run()
    finally:
        if lock is not None:
            lock.release()
    best_iter = result["best_epoch"] * cfg.eval_interval if result["best_epoch"] is not None else None
    return {"best_mIoU": result["best"] if best_iter is not None else None, "best_iter": best_iter,
            "final": hooks.last_eval, "history": result["history"], "steps": result["steps"],
            "interrupted": result["interrupted"], "step_records": result["step_records"],
            "mean_loss": float(np.nanmean(result["epoch_losses"])) if result["epoch_losses"] else math.nan}
