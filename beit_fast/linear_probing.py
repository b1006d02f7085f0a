"""Linear probing of a frozen BEiT backbone (the paper's Table 9 protocol); the command line is
``python -m beit_fast.linear_probe``.

The backbone stays frozen; each image is represented by the average of the patch tokens (not [CLS]) at
the output of one block, and a linear classifier is trained on those features. The paper reports the
best intermediate layer (block 9 of 12 for BEiT-B, 56.7% top-1 on ImageNet-1k): ``--sweep`` probes every
block from one feature-extraction pass and reports the best.

Features are extracted once (eval transforms, no augmentation) and cached, so the classifier trains in
seconds: ``BatchNorm1d(D, affine=False)`` then ``Linear(D, C)`` (MAE's linear-probe head; the BN
without affine parameters is a fixed normalisation of the features, a linear map), AdamW, cosine lr.
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

__all__ = ["extract_features", "train_linear_probe", "sweep_layers", "LinearProbe"]

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
        for images, y in tqdm(loader, desc="features", disable=not progress, leave=False, dynamic_ncols=True):
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


def train_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *, num_classes: int,
    epochs: int = 50, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0,
    batchnorm: bool = True, device: str | torch.device = "cpu",
) -> dict:
    """Train a linear classifier (:class:`LinearProbe`) on cached features; returns ``{"top1", "top5",
    "train_top1", "train_loss"}`` (accuracies as fractions in [0, 1], top-5 capped at the class count; val metrics of
    the final classifier). AdamW, lr cosine-annealed per step from ``lr`` to 0, no warmup."""
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("features and labels differ in length")
    if epochs <= 0 or batch_size <= 0:
        raise ValueError("epochs and batch_size must be positive")
    if int(max(train_y.max(), val_y.max())) >= num_classes or int(min(train_y.min(), val_y.min())) < 0:
        raise ValueError(f"labels must be in [0, {num_classes})")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_x.shape[1], num_classes, batchnorm).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = train_x.float().to(device), train_y.long().to(device)
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    step = 0
    loss_sum = 0.0
    probe.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if len(idx) < 2 and batchnorm:  # BatchNorm needs two samples
                continue
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
    probe.eval()
    with torch.no_grad():
        train_logits = probe(x)
        val_logits = probe(val_x.float().to(device))
    vy = val_y.long().to(device)
    return {
        "top1": _topk_rate(val_logits, vy, 1),
        "top5": _topk_rate(val_logits, vy, 5),
        "train_top1": _topk_rate(train_logits, y, 1),
        "train_loss": loss_sum / max(steps_per_epoch, 1),
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
