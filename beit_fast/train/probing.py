"""Linear probing of a frozen BEiT backbone (the paper's Table 9 protocol); the command line is
``python -m beit_fast.linear_probe`` (:func:`run_linear_probe`).

The backbone stays frozen; each image is represented by the average of the patch tokens (not [CLS]) at
the output of one block, and a linear classifier is trained on those features. The paper reports the
best intermediate layer (block 9 of 12 for BEiT-B, 56.7% top-1 on ImageNet-1k): ``--sweep`` probes every
block from one feature-extraction pass and reports the best.

Features are extracted once (eval transforms, no augmentation) and cached, so the classifier trains in
seconds: ``BatchNorm1d(D, affine=False)`` then ``Linear(D, C)`` (MAE's linear-probe head; the BN
without affine parameters is a fixed normalisation of the features, a linear map), AdamW, cosine lr. The
classifier trains on the one engine and loop (its task module :class:`ProbeLoss`), like fine-tuning, without
an output folder or checkpoints (it takes seconds to redo).
Differences from the official ``run_linear_eval.py``: it re-extracts features of RandomResizedCrop /
flip-augmented images every epoch, uses [CLS] concatenated with the mean (``--include_cls`` here) and no
BatchNorm; 100 epochs at base lr 1e-3 per 256 images, weight decay 1e-4 (our defaults: lr 1e-3, wd 1e-4,
50 epochs, the paper's count).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..utils.logs import bar_disable

__all__ = ["extract_features", "train_linear_probe", "sweep_layers", "LinearProbe", "ProbeLoss", "run_linear_probe"]

log = logging.getLogger("beit_fast.linear_probing")


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset, layers: Sequence[int], *, batch_size: int = 256, device: str | torch.device = "cpu",
    include_cls: bool = False, num_workers: int = 0, progress: bool = False,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``({layer: float32 [N, D]}, labels int64 [N])``: average-pooled patch tokens of each requested block
    (1-based) for every image of ``dataset``, in dataset order, from one forward pass per batch through
    ``model.forward_layer_features``. The model is put in eval mode (restored after) and not modified."""
    layers = [int(layer) for layer in layers]
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    labels: list[torch.Tensor] = []
    try:
        for images, y in tqdm(loader, desc="features", disable=bar_disable(progress), leave=False, dynamic_ncols=True):
            outs = model.forward_layer_features(images.to(device), layers, include_cls=include_cls)
            for layer, f in zip(layers, outs):
                feats[layer].append(f.float().cpu())
            labels.append(torch.as_tensor(y, dtype=torch.long))
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("the data set is empty")
    return {layer: torch.cat(v) for layer, v in feats.items()}, torch.cat(labels)


class LinearProbe(nn.Module):
    """``BatchNorm1d(dim, affine=False)`` (optional) then ``Linear(dim, num_classes)`` (weights N(0, 0.01),
    bias 0, as the official linear eval)."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


def _topk_rate(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).float().mean().item()


class ProbeLoss(nn.Module):
    """The probe's task module: ``forward(features [B, D], labels [B]) -> (cross-entropy, accuracy)``."""

    def __init__(self, probe: LinearProbe) -> None:
        super().__init__()
        self.model = probe

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        with torch.no_grad():
            acc = (logits.argmax(-1) == y).float().mean()
        return F.cross_entropy(logits, y), acc


def _check_probe_inputs(train_x, train_y, val_x, val_y, num_classes, epochs, batch_size) -> None:
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("features and labels differ in length")
    if epochs <= 0 or batch_size <= 0:
        raise ValueError("epochs and batch_size must be positive")
    if int(max(train_y.max(), val_y.max())) >= num_classes or int(min(train_y.min(), val_y.min())) < 0:
        raise ValueError(f"labels must be in [0, {num_classes})")


def train_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *, num_classes: int,
    epochs: int = 50, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0,
    batchnorm: bool = True, device: str | torch.device = "cpu",
) -> dict:
    """Train a linear classifier (:class:`LinearProbe`) on cached features; returns ``{"top1", "top5",
    "train_top1", "train_loss"}`` (accuracies as fractions in [0, 1], top-5 capped at the class count; val metrics of
    the final classifier; ``train_loss`` the last epoch's mean). AdamW, lr cosine-annealed per step from ``lr`` to
    0 (:func:`beit_fast.train.optim.cosine_scheduler`), no warmup; the one engine and loop run the steps (no output
    folder, no checkpoints). Epochs are seeded permutations of the features; a last batch of one sample is
    dropped when the BatchNorm is on (it needs two)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..data.pretraining import ResumableSampler
    from .optim import cosine_scheduler
    from .engine import Engine
    from .loop import LoopConfig, TrainLoop

    _check_probe_inputs(train_x, train_y, val_x, val_y, num_classes, epochs, batch_size)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_x.shape[1], num_classes, batchnorm).to(device)
    x, y = train_x.float().to(device), train_y.long().to(device)
    n = len(x)
    drop_last = batchnorm and n % batch_size == 1
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps_per_epoch == 0:
        raise ValueError("one training sample is too few for the BatchNorm (use batchnorm=False)")
    sampler = ResumableSampler(n, seed=seed, shuffle=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=device.type in ("cpu", "cuda") or None)
    engine = Engine(ProbeLoss(probe), opt, device, cosine_scheduler(lr, 0.0, epochs, steps_per_epoch),
                    nonfinite_check="device")
    loop = TrainLoop(engine, loader, sampler, LoopConfig(
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, images_per_step=batch_size,
        log_freq=steps_per_epoch, step_records=False, save=False, progress=False, handle_signals=False, seed=seed,
        metric_name="acc"))
    result = loop.run()
    probe.eval()
    with torch.no_grad():
        train_logits = probe(x)
        val_logits = probe(val_x.float().to(device))
    vy = val_y.long().to(device)
    return {
        "top1": _topk_rate(val_logits, vy, 1),
        "top5": _topk_rate(val_logits, vy, 5),
        "train_top1": _topk_rate(train_logits, y, 1),
        "train_loss": result["epoch_losses"][-1],
    }


def sweep_layers(
    model: nn.Module, train_set, val_set, layers: Sequence[int] | None = None, *, device: str | torch.device = "cpu",
    extract_batch_size: int = 256, include_cls: bool = False, num_classes: int | None = None, progress: bool = False,
    **probe_kwargs,
) -> dict:
    """Linear probes on several blocks (default: all, 1..depth) from one feature-extraction pass per data
    set; returns ``{"per_layer": {layer: train_linear_probe result}, "best_layer", "best_top1"}``.
    ``probe_kwargs`` go to :func:`train_linear_probe` (epochs, lr, weight_decay, batch_size, seed, ...)."""
    if layers is None:
        layers = list(range(1, model.get_num_layers() + 1))
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    kw = dict(batch_size=extract_batch_size, device=device, include_cls=include_cls, progress=progress)
    train_f, train_y = extract_features(model, train_set, layers, **kw)
    val_f, val_y = extract_features(model, val_set, layers, **kw)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    per_layer = {}
    for layer in layers:
        per_layer[layer] = train_linear_probe(train_f[layer], train_y, val_f[layer], val_y, num_classes=num_classes,
                                              device=device, **probe_kwargs)
        log.info("block %d: top-1 %.2f%% top-5 %.2f%% (train %.2f%%)", layer, 100 * per_layer[layer]["top1"],
                 100 * per_layer[layer]["top5"], 100 * per_layer[layer]["train_top1"])
    best = max(layers, key=lambda layer: (per_layer[layer]["top1"], layer))
    return {"per_layer": per_layer, "best_layer": best, "best_top1": per_layer[best]["top1"]}


def run_linear_probe(cfg) -> dict:
    """What ``python -m beit_fast.linear_probe`` runs (a validated :class:`beit_fast.config.ProbeConfig`): the
    backbone of ``cfg.finetune`` (or a random one, a baseline), frozen; features of the eval-transformed train
    and val images; a probe per requested block; the table printed and (``output_dir``) ``linear_probe.json``."""
    import dataclasses
    import json
    from pathlib import Path

    from ..data.labelled import load_classification_data
    from .classification_setup import build_classifier_for, classification_transforms, load_weights, pick_device

    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.crop_pct is None and cfg.data_path is None:
        cfg = dataclasses.replace(cfg, crop_pct=1.0)  # the digits: no crop (the fine-tuning demo's default)
    # A frozen backbone: no drop path, mean pooling (the features), no head to initialise.
    model, ckpt = build_classifier_for(cfg.finetune, 0, model=cfg.model, input_size=cfg.input_size,
                                       patch_size=cfg.patch_size, demo=cfg.data_path is None, drop_path=0.0,
                                       init_scale=1.0, trust_pickle=cfg.trust_pickle)
    if cfg.finetune:
        load_weights(model, ckpt, cfg.finetune)
    else:
        log.warning("no --finetune checkpoint: probing a randomly initialised backbone")
    model.to(device).eval().requires_grad_(False)
    depth = model.get_num_layers()
    if cfg.layer is not None and not 1 <= cfg.layer <= depth:
        raise SystemExit(f"error: --layer must be in 1..{depth}, got {cfg.layer}")
    layers = list(range(1, depth + 1)) if cfg.sweep else [cfg.layer or depth]
    cfg = dataclasses.replace(cfg, input_size=model.cfg.img_size, patch_size=model.cfg.patch_size)
    _, tf = classification_transforms(cfg, cfg.input_size, train=False)
    train_set, val_set, classes = load_classification_data(cfg, tf, tf)
    result = sweep_layers(model, train_set, val_set, layers, device=device, extract_batch_size=cfg.batch_size,
                          include_cls=cfg.include_cls, num_classes=len(classes), progress=not cfg.no_progress,
                          epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                          seed=cfg.seed, batchnorm=not cfg.no_batchnorm)
    print(f"{'block':>5}  {'top-1':>7}  {'top-5':>7}  {'train top-1':>11}")
    for layer in layers:
        r = result["per_layer"][layer]
        mark = "  <- best" if layer == result["best_layer"] and len(layers) > 1 else ""
        print(f"{layer:>5}  {100 * r['top1']:>6.2f}%  {100 * r['top5']:>6.2f}%  {100 * r['train_top1']:>10.2f}%{mark}")
    print(f"best: block {result['best_layer']} of {depth}, top-1 {100 * result['best_top1']:.2f}%")
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_layer = {str(k): v for k, v in result["per_layer"].items()}
        from ..utils.checkpoint import CheckpointError, atomic_write_text

        try:  # atomically: a link planted under the name is replaced, never followed
            atomic_write_text(out / "linear_probe.json", json.dumps(
                {"args": dataclasses.asdict(cfg), **result, "per_layer": per_layer}, indent=1, default=str))
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
    return result
