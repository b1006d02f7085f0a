"""Fine-tuning and linear probing from their configs: the classifier (the architecture of the checkpoint it
starts from, or a named size), its weights, the transforms and the data; :func:`run_finetune` is what
``python -m beit_fast.finetune`` runs. Problems are ``SystemExit("error: ...")``, as the command lines print them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import FinetuneConfig
from ..config.finetune import FINETUNE_DEMO_DEFAULTS, FINETUNE_OFFICIAL_DEFAULTS
from ..config.pretrain import DEMO_PRETRAINED_CHECKPOINT
from .engine import demo_cpu_threads
from .feed import default_num_workers

__all__ = ["build_classifier_for", "load_weights", "classification_transforms", "run_finetune", "pick_device"]

log = logging.getLogger("beit_fast.finetuning")


def pick_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    return device


def build_classifier_for(checkpoint: str | None, num_classes: int, *, model: str | None = None,
                         input_size: int | None = None, patch_size: int | None = None, demo: bool = True,
                         use_mean_pooling: bool = True, rel_pos_bias: bool | None = None,
                         abs_pos_emb: bool | None = None, layer_scale_init_value: float | None = None,
                         drop_path: float | None = None, init_scale: float = 0.001, trust_pickle: bool = False):
    """``(classifier, loaded checkpoint dict or None)``: the architecture of ``checkpoint`` (ours: its
    ``model_config``; others: read off the weights) unless ``model`` is given, else the demo / real named
    config. ``rel_pos_bias`` None: per-block bias when the checkpoint has a relative position bias table (or
    without a checkpoint), none otherwise. The checkpoint is read once; pass the returned dict to
    :func:`load_weights`. The classifier's ``cfg`` holds the resolved image and patch size."""
    from ..utils.limits import check_beit_config
    from ..model.beit import build_classifier, get_config
    from ..interop.pretrained import PretrainedLoadError, classifier_config_from_checkpoint, load_state_dict_any

    defaults = FINETUNE_DEMO_DEFAULTS if demo else FINETUNE_OFFICIAL_DEFAULTS
    overrides: dict = {"drop_path_rate": drop_path, "use_shared_rel_pos_bias": False}
    for key, value in (("img_size", input_size), ("patch_size", patch_size), ("use_abs_pos_emb", abs_pos_emb),
                       ("init_values", layer_scale_init_value)):
        if value is not None:
            overrides[key] = value
    ckpt = None
    try:
        if checkpoint:
            sd, config = load_state_dict_any(checkpoint, trust_pickle=trust_pickle)
            if config is not None and model is None:
                check_beit_config(config, sd.values(), str(checkpoint))
            ckpt = {"model": sd, **({"model_config": config} if config else {})}
        if rel_pos_bias is None:
            rel_pos_bias = ckpt is None or any(k.endswith("relative_position_bias_table") for k in ckpt["model"])
        if model is None and ckpt is not None:
            cfg = classifier_config_from_checkpoint(ckpt, **overrides)
            source = f"the architecture of {checkpoint}"
        else:
            name = model or defaults["model"]
            overrides.setdefault("img_size", defaults["input_size"])
            overrides.setdefault("patch_size", defaults["patch_size"])
            cfg = get_config(name, **overrides)
            source = f"model {name}"
    except (ValueError, PretrainedLoadError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    classifier = build_classifier(cfg, num_classes, use_mean_pooling=use_mean_pooling, use_rel_pos_bias=rel_pos_bias,
                                  init_scale=init_scale)
    log.info("classifier from %s: %d blocks, width %d, %d heads, %dx%d patches of %d px, %s pooling, %s",
             source, cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.grid_size, cfg.grid_size, cfg.patch_size,
             "mean" if use_mean_pooling else "[CLS]",
             "per-block relative position bias" if rel_pos_bias else "no relative position bias")
    return classifier, ckpt


def load_weights(model, ckpt: dict, path: str, rel_pos_resize: str = "bicubic") -> None:
    """:func:`beit_fast.interop.pretrained.load_pretrained` of a checkpoint read by :func:`build_classifier_for`."""
    from ..interop.pretrained import PretrainedLoadError, load_pretrained

    try:
        report = load_pretrained(model, ckpt, rel_pos_resize=rel_pos_resize)
    except (PretrainedLoadError, FileNotFoundError) as e:
        raise SystemExit(f"error: cannot load {path}: {e}") from None
    for note in report["notes"]:
        log.info("load %s: %s", path, note)
    log.info("load %s: left at init: %s", path, report["missing"] or "nothing")


def classification_transforms(cfg, input_size: int, train: bool = True):
    """``(train transform or None, eval transform)`` of a fine-tuning / probing config."""
    from ..data.transforms.classification import (
        IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, build_transforms,
    )

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.imagenet_default_mean_and_std else (INCEPTION_MEAN, INCEPTION_STD)
    eval_tf = build_transforms(input_size, train=False, crop_pct=cfg.crop_pct, mean=mean, std=std)
    if not train:
        return None, eval_tf
    return build_transforms(input_size, train=True, randaug=cfg.aa, reprob=cfg.reprob, min_scale=cfg.min_crop_scale,
                            hflip=cfg.hflip, interpolation=cfg.train_interpolation, mean=mean, std=std), eval_tf


def _num_classes_hint(cfg) -> int:
    """The class count before the data sets exist (the model needs it first): the digits' 10, or the class
    folders of ``data_path/train``; checked against the data sets once they are built."""
    from ..data.labelled import count_class_folders

    if cfg.nb_classes is not None:
        return cfg.nb_classes
    return 10 if cfg.data_path is None else count_class_folders(Path(cfg.data_path) / "train")


def run_finetune(cfg: FinetuneConfig) -> dict:
    """What ``python -m beit_fast.finetune`` runs (``cfg`` resolved and validated): the classifier from
    ``--finetune`` (or ``--resume`` with ``--eval``), the data, then :func:`beit_fast.train.finetuning.finetune`
    (or, ``--eval``, one evaluation)."""
    from ..utils.checkpoint import CheckpointError
    from ..data.labelled import load_classification_data
    from ..utils.rng import seed_everything
    from .finetuning import default_layer_decay, finetune
    from .loop import NonFiniteLossError

    device = pick_device(cfg.device)
    if cfg.data_path is None:  # the embedded demo
        demo_cpu_threads(device)
    weights = cfg.finetune or (cfg.resume if cfg.eval and cfg.resume not in ("", "auto") else None)
    num_classes = _num_classes_hint(cfg)
    seed_everything(cfg.seed)
    model, ckpt = build_classifier_for(
        weights, num_classes, model=cfg.model, input_size=cfg.input_size, patch_size=cfg.patch_size,
        demo=cfg.data_path is None, use_mean_pooling=cfg.use_mean_pooling, rel_pos_bias=cfg.rel_pos_bias,
        abs_pos_emb=cfg.abs_pos_emb, layer_scale_init_value=cfg.layer_scale_init_value, drop_path=cfg.drop_path,
        init_scale=cfg.init_scale, trust_pickle=cfg.trust_pickle)
    cfg = dataclasses.replace(cfg, input_size=model.cfg.img_size, patch_size=model.cfg.patch_size)
    train_tf, eval_tf = classification_transforms(cfg, cfg.input_size)
    train_set, val_set, classes = load_classification_data(cfg, train_tf, eval_tf)
    if len(classes) != num_classes:
        raise SystemExit(f"error: {len(classes)} classes in the data, {num_classes} expected")
    if weights:
        if cfg.data_path is None and cfg.finetune == DEMO_PRETRAINED_CHECKPOINT:
            log.info("fine-tuning the pretraining demo's model %s (--finetune '' trains from scratch)", cfg.finetune)
        load_weights(model, ckpt, weights, cfg.rel_pos_resize)
    else:
        log.warning("no --finetune checkpoint: training from scratch (random init), not fine-tuning")
    if cfg.layer_decay is None:
        cfg = dataclasses.replace(cfg, layer_decay=default_layer_decay(model.get_num_layers()))
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.eval:
        return _evaluate_only(model, val_set, cfg, device)
    log.info("fine-tuning %.2fM parameters on %d images (%d classes), %d val; lr %.3g, layer decay %.2f, "
             "%d epochs of %d steps; device %s", sum(p.numel() for p in model.parameters()) / 1e6, len(train_set),
             len(classes), len(val_set), cfg.effective_lr(), cfg.layer_decay, cfg.epochs,
             len(train_set) // cfg.batch_size, device)
    out = Path(cfg.output_dir)
    try:
        result = finetune(model, train_set, val_set, cfg, device=device, output_dir=out, progress=not cfg.no_progress,
                          num_classes=len(classes), trust_pickle=cfg.trust_pickle,
                          overwrite_output_dir=cfg.overwrite_output_dir, run_args=dataclasses.asdict(cfg))
    except (ValueError, CheckpointError, NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None
    # no best epoch when the run stopped (--stop_after_steps, a signal) before its first epoch end
    best = "n/a" if result["best_top1"] is None else f"{100 * result['best_top1']:.2f}% (epoch {result['best_epoch']})"
    print(f"best top-1 {best}; final top-1 {100 * result['final_top1']:.2f}%, top-5 {100 * result['final_top5']:.2f}%; "
          f"checkpoints in {out}")
    return result


def _evaluate_only(model, val_set, cfg: FinetuneConfig, device: torch.device) -> dict:
    from .evaluation import evaluate
    from .engine import resolve_amp_dtype

    try:
        amp_dtype = resolve_amp_dtype(cfg.amp, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.attn_backend != "auto":
        model.configure_fast_path(attention=cfg.attn_backend)
    model.to(device)
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device.type, on_cpu=0)
    res = evaluate(model, val_set, batch_size=max(1, int(1.5 * cfg.batch_size)), device=device, amp_dtype=amp_dtype,
                   num_workers=workers, progress=not cfg.no_progress)
    print(f"Accuracy on the {res['n']} val images: top-1 {100 * res['top1']:.2f}%, top-5 {100 * res['top5']:.2f}%")
    return {"best_top1": res["top1"], "best_epoch": None, "final_top1": res["top1"], "final_top5": res["top5"],
            "history": [], "eval": res}
