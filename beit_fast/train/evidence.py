"""The evidence run (the library; the command line, and what it measures: ``python -m beit_fast.evidence``).

:func:`run_evidence` trains a dVAE tokenizer and pretrains a small ViT with BEiT on scikit-learn's digits,
then fine-tunes and linear-probes it against the same network from random initialisation
(:class:`beit_fast.config.EvidenceConfig` holds the sizes and schedules); :func:`table` formats the result.
Pretraining, fine-tuning and the probes all run on the one engine and loop (:mod:`beit_fast.train`); the
result files are written atomically.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..utils.logs import bar_disable
from ..utils.checkpoint import atomic_save, atomic_write_text
from ..config import EvidenceConfig
from ..data.pretraining import PretrainDataset, ResumableSampler, collate_pretrain
from ..data.digits import DigitsDataset
from .loss import MIMLoss
from ..data.masking import MaskingGenerator
from ..model.beit import build_model
from .optim import build_optimizer, cosine_scheduler
from ..data.transforms import TokenizerViewTransform, TwoViewConfig, TwoViewTransform
from .loop import LoopConfig, LoopHooks, TrainLoop
from .mim import PretrainEngine

log = logging.getLogger("beit_fast.evidence_run")

__all__ = ["EvidenceConfig", "RandomMaskingGenerator", "PixelRegressionLoss", "VARIANTS", "run_evidence", "table"]


# --------------------------------------------------------------------------------------------------------
# Ablation pieces
# --------------------------------------------------------------------------------------------------------
class RandomMaskingGenerator:
    """Masks exactly ``num_masking_patches`` patches drawn uniformly at random (the ablation of blockwise
    masking); same call convention as :class:`beit_fast.data.masking.MaskingGenerator`."""

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int) -> None:
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        if not 0 <= num_masking_patches <= h * w:
            raise ValueError(f"num_masking_patches must be in [0, {h * w}], got {num_masking_patches}")
        self.shape, self.count = (int(h), int(w)), int(num_masking_patches)

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        mask[rng.choice(mask.size, self.count, replace=False)] = True
        return mask.reshape(self.shape)


class PixelRegressionLoss(MIMLoss):
    """Masked patches' pixels instead of visual tokens: a linear head ``D -> P*P*3`` on the final hidden
    state of each masked patch, MSE against that patch's pixels normalised per patch (mean 0, std 1).
    The head lives on the model as ``model.pixel_head`` so the optimizer sees it. Returns ``(loss, 0)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        p = model.patch_embed.patch_size[0]
        if not hasattr(model, "pixel_head"):
            model.pixel_head = nn.Linear(model.embed_dim, p * p * model.cfg.in_chans)
            nn.init.trunc_normal_(model.pixel_head.weight, std=0.02)
            nn.init.zeros_(model.pixel_head.bias)
        self.patch = p

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, tokens: torch.Tensor):
        feats = self.model.forward_features(images, bool_masked_pos)[:, 1:]
        pred = self.model.pixel_head(feats[bool_masked_pos])
        p = self.patch
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)[bool_masked_pos]  # [M, 3*P*P]
        target = (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-6)
        return F.mse_loss(pred, target), torch.zeros((), device=images.device)


class _NoTokens(nn.Module):
    """Tokenizer stand-in for the pixel target: an all-zero token grid of the right shape."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], self.grid * self.grid, dtype=torch.long, device=images.device)


class _ImagesOnly(Dataset):
    def __init__(self, ds: DigitsDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds.image(i)


# --------------------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------------------
def two_view_config(cfg: EvidenceConfig) -> TwoViewConfig:
    # digits are grey and not mirror-symmetric: no colour jitter, no flips; crops keep most of the digit
    return TwoViewConfig(input_size=cfg.image_size, second_input_size=cfg.grid * 8, scale=(cfg.crop_scale_min, 1.0),
                         color_jitter=0.0, hflip_prob=0.0)


def train_tokenizer(cfg: EvidenceConfig, seed: int = 0):
    """A dVAE (tiny preset, ``cfg.vocab_size`` codes) on tokenizer views of the training digits."""
    from ..tokenizer.dvae import RECOMMENDED_LR, DiscreteVAE, DVAEConfig
    from .dvae import train_dvae
    from .tokenizer_training import TokenizerViewDataset

    train = DigitsDataset("train", cfg.image_size)
    view = TokenizerViewTransform(two_view_config(cfg))
    data = TokenizerViewDataset(_ImagesOnly(train), view, length=len(train) * 8, seed=seed)
    val = DigitsDataset("val", cfg.image_size)
    eval_data = TokenizerViewDataset(_ImagesOnly(val), view, seed=seed + 1)
    dcfg = DVAEConfig.preset("tiny", vocab_size=cfg.vocab_size, input_size=cfg.grid * 8)
    torch.manual_seed(seed)
    model = DiscreteVAE(dcfg)
    metrics = train_dvae(dcfg, data, steps=cfg.tokenizer_steps, batch_size=cfg.tokenizer_batch,
                         lr=RECOMMENDED_LR["tiny"], seed=seed, progress=False, eval_data=eval_data,
                         save_every=None, log_every=10**9, model=model)
    return model, metrics


def pretrain(cfg: EvidenceConfig, tokenizer: nn.Module | None, seed: int, *, masking: str = "block",
             target: str = "tokens") -> tuple[nn.Module, dict]:
    """BEiT pretraining on the training digits (labels unused). Returns the model and its last stats."""
    torch.manual_seed(seed)
    model = build_model("tiny", img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, drop_path_rate=0.0)
    if masking == "block":
        gen = MaskingGenerator((cfg.grid, cfg.grid), cfg.num_masked, min_num_patches=cfg.min_mask_block)
    elif masking == "random":
        gen = RandomMaskingGenerator(cfg.grid, cfg.num_masked)
    else:
        raise ValueError(f"masking must be 'block' or 'random', got {masking!r}")
    loss_module = None
    if target == "pixels":
        loss_module = PixelRegressionLoss(model)
        tokenizer = _NoTokens(cfg.grid)
    elif target != "tokens":
        raise ValueError(f"target must be 'tokens' or 'pixels', got {target!r}")
    data = PretrainDataset(_ImagesOnly(DigitsDataset("train", cfg.image_size)), TwoViewTransform(two_view_config(cfg)),
                           gen, seed=seed)
    steps_per_epoch = len(data) // cfg.pretrain_batch
    lr = cosine_scheduler(cfg.pretrain_lr, cfg.pretrain_lr * 0.01, cfg.pretrain_epochs, steps_per_epoch,
                          cfg.pretrain_warmup_epochs)
    wd = np.full(len(lr), 0.05)
    opt = build_optimizer(model, cfg.pretrain_lr, 0.05)
    engine = PretrainEngine(model, tokenizer, opt, torch.device("cpu"), lr, wd, amp_dtype=None, clip_grad=3.0,
                            loss_module=loss_module)
    sampler = ResumableSampler(len(data), seed=seed, shuffle=True)
    loader = DataLoader(data, batch_size=cfg.pretrain_batch, sampler=sampler, drop_last=True,
                        collate_fn=collate_pretrain)
    loop = TrainLoop(engine, loader, sampler, LoopConfig(
        epochs=cfg.pretrain_epochs, steps_per_epoch=steps_per_epoch, batch_size=cfg.pretrain_batch,
        images_per_step=cfg.pretrain_batch, log_freq=steps_per_epoch, step_records=False, save=False, progress=False,
        handle_signals=False, seed=seed), _EpochOfData(data))
    result = loop.run()
    stats = {"steps": result["steps"], "loss_first": result["epoch_losses"][0],
             "loss_last": result["epoch_losses"][-1], "acc_first": result["epoch_metrics"][0],
             "acc_last": result["epoch_metrics"][-1]}
    return model, stats


class _EpochOfData(LoopHooks):
    """The data set's epoch (its augmentation and mask seeds) at each epoch start."""

    def __init__(self, data: PretrainDataset) -> None:
        self.data = data

    def start_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)


def downstream(cfg: EvidenceConfig, pretrained: nn.Module | None, seed: int) -> dict:
    """Fine-tune and linear-probe one backbone (None: random initialisation) with few labels."""
    from ..model.beit import build_classifier
    from ..interop.pretrained import load_pretrained
    from ..data.transforms.classification import build_transforms
    from .finetuning import FinetuneConfig, finetune
    from .probing import sweep_layers

    def classifier():
        torch.manual_seed(seed)
        m = build_classifier("tiny", 10, img_size=cfg.image_size, patch_size=cfg.patch_size,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, drop_path_rate=0.1)
        if pretrained is not None:
            load_pretrained(m, pretrained.state_dict())
        return m

    train_tf = build_transforms(cfg.image_size, train=True, scale=(cfg.crop_scale_min, 1.0), hflip=0.0,
                                randaug=False, reprob=0.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    eval_tf = build_transforms(cfg.image_size, train=False, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    train = DigitsDataset("train", cfg.image_size, train_tf, labels_per_class=cfg.labels_per_class, seed=seed)
    val = DigitsDataset("val", cfg.image_size, eval_tf)
    ft_cfg = FinetuneConfig(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch, lr=cfg.finetune_lr,
                            warmup_epochs=max(1, cfg.finetune_epochs // 10), layer_decay=cfg.layer_decay,
                            label_smoothing=0.1, mixup=0.0, cutmix=0.0, drop_path=0.1, seed=seed,
                            num_workers=0, eval_freq=cfg.finetune_epochs, save_ckpt=False)
    ft = finetune(classifier(), train, val, ft_cfg, device="cpu", progress=False, num_classes=10)
    if ft["interrupted"]:  # a signal stopped the fine-tuning: stop the whole evidence run
        raise KeyboardInterrupt(ft["interrupted"])
    probe_train = DigitsDataset("train", cfg.image_size, eval_tf, labels_per_class=cfg.labels_per_class, seed=seed)
    probe = sweep_layers(classifier(), probe_train, val, epochs=cfg.probe_epochs, lr=cfg.probe_lr, seed=seed,
                         progress=False)
    # the held-out set is only scored after the last epoch: no selection on test accuracy
    return {"finetune_top1": ft["final_top1"], "finetune_top5": ft["final_top5"],
            "probe_top1": probe["best_top1"], "probe_layer": probe["best_layer"],
            "probe_per_layer": {int(k): v["top1"] for k, v in probe["per_layer"].items()}}


VARIANTS = {
    "scratch": None,
    "beit": {"masking": "block", "target": "tokens"},
    "beit_random_mask": {"masking": "random", "target": "tokens"},
    "beit_pixels": {"masking": "block", "target": "pixels"},
}


def run_evidence(cfg: EvidenceConfig, *, progress: bool = True) -> dict:
    """Run every variant over ``cfg.seeds`` seeds; returns per-seed results and the summary table."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in cfg.variants.split(",") if v]
    if cfg.ablations:
        variants += [v for v in ("beit_random_mask", "beit_pixels") if v not in variants]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    t0 = time.time()
    tok_model, tok_metrics = train_tokenizer(cfg)
    log.info("tokenizer: recon MSE %.4f, %d/%d codes used, %.0f s", tok_metrics["final"]["recon_mse"],
             tok_metrics["final"]["codes_used"], cfg.vocab_size, time.time() - t0)
    tok_model.eval().requires_grad_(False)
    atomic_save({"config": tok_metrics["config"], "model": tok_model.state_dict()}, out / "tokenizer.pt")
    runs: list[dict] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.seeds * len(variants), desc="evidence", disable=bar_disable(progress))
    for seed in range(cfg.seeds):
        for name in variants:
            t = time.time()
            pre_stats = None
            backbone = None
            if VARIANTS[name] is not None:
                backbone, pre_stats = pretrain(cfg, tok_model, seed, **VARIANTS[name])
                atomic_save({"model": backbone.state_dict(), "model_config": backbone.cfg.to_dict(), "variant": name,
                             "seed": seed}, out / f"pretrain-{name}-seed{seed}.pt")
            res = downstream(cfg, backbone, seed)
            res.update(variant=name, seed=seed, pretrain=pre_stats, seconds=round(time.time() - t, 1))
            runs.append(res)
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
            log.info("seed %d %-16s fine-tune %.1f%%  probe %.1f%% (layer %s)  %s  %.0f s", seed, name,
                     100 * res["finetune_top1"], 100 * res["probe_top1"], res["probe_layer"],
                     "" if pre_stats is None else f"pretrain loss {pre_stats['loss_first']:.2f}->{pre_stats['loss_last']:.2f}",
                     res["seconds"])
            bar.update()
    bar.close()
    summary = summarize(runs, variants)
    result = {"config": asdict(cfg), "tokenizer": {k: tok_metrics[k] for k in ("initial", "final") if k in tok_metrics},
              "runs": runs, "summary": summary, "minutes": round((time.time() - t0) / 60, 1)}
    atomic_write_text(out / "evidence.json", json.dumps(result, indent=1))
    atomic_write_text(out / "evidence.md", table(result) + "\n")
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], variants: Sequence[str]) -> dict:
    summary = {}
    for name in variants:
        rs = [r for r in runs if r["variant"] == name]
        ft, pr = _mean_std([r["finetune_top1"] for r in rs]), _mean_std([r["probe_top1"] for r in rs])
        summary[name] = {"finetune_mean": ft[0], "finetune_std": ft[1], "probe_mean": pr[0], "probe_std": pr[1],
                         "n": len(rs)}
    return summary


LABELS = {"scratch": "random init (no pretraining)", "beit": "BEiT: blockwise masking + visual tokens",
          "beit_random_mask": "ablation: random masking + visual tokens",
          "beit_pixels": "ablation: blockwise masking + pixel regression"}


def table(result: dict) -> str:
    cfg, s = result["config"], result["summary"]
    n = max(v["n"] for v in s.values())
    lines = [f"Digits (scikit-learn), {cfg['labels_per_class']} labelled images per class, 450 held-out test "
             f"images; ViT D{cfg['embed_dim']}xL{cfg['depth']} at {cfg['image_size']}px/patch {cfg['patch_size']}; "
             f"{n} seeds; top-1 %, mean +- std. Total {result['minutes']} min.", "",
             "| backbone | fine-tune top-1 | linear probe top-1 (best layer) |", "| --- | ---: | ---: |"]
    for name, v in s.items():
        lines.append(f"| {LABELS[name]} | {100 * v['finetune_mean']:.1f} +- {100 * v['finetune_std']:.1f} | "
                     f"{100 * v['probe_mean']:.1f} +- {100 * v['probe_std']:.1f} |")
    return "\n".join(lines)
