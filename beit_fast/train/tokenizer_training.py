"""Training our discrete-VAE visual tokenizer on images (the library; the command line is
``python -m beit_fast.train_tokenizer``).

:func:`train_tokenizer` trains a preset (``tiny`` on a laptop CPU in a minute or two, ``default`` for
real data) on random crops of scikit-image's bundled sample photographs (:mod:`beit_fast.data.samples`,
plus its colour wheel; ``coffee`` and ``clock`` held out for evaluation) or, with ``data_path``, of every
image file under a folder (recursively, :class:`beit_fast.data.image_folder.ImageFolderDataset`: unreadable files are
skipped with a warning; about 1 in 20 files, at least one when there are two or more, is held out).

The training views are BEiT's tokenizer views, made by the pretraining data pipeline's own code
(:class:`beit_fast.data.transforms.TokenizerViewTransform`: RandomResizedCrop box, horizontal flip, Lanczos
resize to the tokenizer size, ``map_pixels``), without colour jitter, one seeded view per index
(:class:`TokenizerViewDataset`). The checkpoint is written atomically every ``save_every`` steps and at
the end; load it with ``beit_fast.tokenizer.build_tokenizer("dvae", path)``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..data.image_folder import ImageFolderDataset
from ..data.pretraining import sample_seed
from ..data.samples import PHOTOGRAPHS, SampleImages
from ..tokenizer.dvae import PRESETS, RECOMMENDED_LR, DVAEConfig
from ..utils.checkpoint import CheckpointError
from .dvae import train_dvae
from .engine import demo_cpu_threads
from ..data.transforms import TokenizerViewTransform, TwoViewConfig

__all__ = ["TokenizerViewDataset", "HELD_OUT_PHOTOS", "train_tokenizer", "run_tokenizer_training"]

log = logging.getLogger("beit_fast.train.tokenizer_training")

#: sample photographs kept out of training and used only for the evaluation numbers.
HELD_OUT_PHOTOS = ("coffee", "clock")
#: size cap of the sample photographs: a view of the 1411x1411 retina otherwise takes about 3x the
#: resampling time of the others (measured 15 vs 4.6 ms per 112 px view, one CPU thread).
SAMPLE_MAX_SIDE = 640


class TokenizerViewDataset(Dataset):
    """``length`` tokenizer views (``[3, S, S]`` float32) of a dataset of PIL images.

    Item ``i`` is ``transform(images[i % len(images)])`` run under
    ``torch.manual_seed(data.sample_seed(seed, 0, i))`` in a forked torch RNG (as
    :class:`beit_fast.data.pretraining.PretrainDataset` does), so it is a fixed function of ``(seed, i)`` whatever the
    sample order or worker count, and the caller's torch RNG is untouched.

    Args:
        images: ``SampleImages``, ``ImageFolderDataset`` (or a ``Subset`` of it), a list of PIL images, ...
        transform: PIL image -> tensor; default ``TokenizerViewTransform()`` (BEiT's 112 px tokenizer view
            with colour jitter).
        length: number of items (default: ``len(images)``).
        seed: >= 0.
    """

    def __init__(self, images: Any, transform: Any = None, length: int | None = None, seed: int = 0) -> None:
        if len(images) == 0:
            raise ValueError("TokenizerViewDataset needs at least one image")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images = images
        self.transform = transform if transform is not None else TokenizerViewTransform()
        self.length = len(images) if length is None else int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} views")
        index %= self.length
        img = self.images[index % len(self.images)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, 0, index))
            return self.transform(img)

    def __repr__(self) -> str:
        return (f"TokenizerViewDataset(images={self.images!r}, transform={self.transform!r}, "
                f"length={self.length}, seed={self.seed})")


def _image_sources(data_path: str | None, n_train: int, n_eval: int) -> tuple[Dataset, Dataset, str]:
    """(training images, held-out evaluation images, description) for the CLI."""
    if data_path is None:
        train_names = [name for name, _ in PHOTOGRAPHS if name not in HELD_OUT_PHOTOS] + ["colorwheel"]
        train = SampleImages(n_train, names=train_names, max_side=SAMPLE_MAX_SIDE)
        held = SampleImages(n_eval, names=HELD_OUT_PHOTOS, max_side=SAMPLE_MAX_SIDE)
        return train, held, (f"scikit-image sample photos: {len(train.photos)} for training, {len(held.photos)} "
                             f"held out ({', '.join(held.names)}) for evaluation")
    folder = ImageFolderDataset(data_path)
    n = len(folder)
    held_idx = list(range(0, n, 20)) if n >= 2 else []
    train_idx = [i for i in range(n) if i % 20] if held_idx else list(range(n))
    train, held = Subset(folder, train_idx), Subset(folder, held_idx or train_idx)
    return train, held, f"{len(train)} training / {len(held)} evaluation image files under {folder.root}"


def check_tokenizer_output(output: str | os.PathLike) -> None:
    """Before any training: ``output`` can be written (its folder exists or can be created, and takes a file)
    and is not another kind of file (a directory, a pretraining checkpoint, ...) that the tokenizer would
    replace. An existing dVAE checkpoint is replaced (retraining). ``ValueError`` naming the path otherwise."""
    import tempfile

    from ..tokenizer.dvae import load_dvae_checkpoint

    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory: give the tokenizer checkpoint's file path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise ValueError(f"--output {path} exists and is not a regular file: refusing to replace it")
        try:
            load_dvae_checkpoint(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"--output {path} exists and is not a dVAE tokenizer checkpoint ({str(e)[:200]}): "
                             "refusing to overwrite it; choose another path or delete it first") from None
        log.warning("--output %s holds a dVAE tokenizer: it is replaced when training ends", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ValueError(f"--output {path}: cannot write into {path.parent} ({e.strerror or e}); checked before "
                         "training so that no training is lost") from None


def train_tokenizer(
    output: str | os.PathLike | None, *, preset: str = "tiny", steps: int = 300, batch_size: int = 16,
    lr: float | None = None, data_path: str | os.PathLike | None = None, eval_images: int = 128,
    save_every: int = 100, seed: int = 0, device: str = "cpu", workers: int = 0, progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a dVAE ``preset`` (``overrides``: ``vocab_size``, ``input_size``, ``temperature_start``,
    ``temperature_end``, ``kl_weight``, ``recon_loss``; None keeps the preset's) on views of the sample
    photographs or of ``data_path``; ``lr`` None: the preset's recommended one. Writes ``output`` (a
    checkpoint; None: none) and returns :func:`beit_fast.train.dvae.train_dvae`'s metrics."""
    cfg = DVAEConfig.preset(preset, **overrides)
    if output is not None:
        check_tokenizer_output(output)
    n_train_crops = max(steps * batch_size, 1)
    train_images, eval_set_images, source = _image_sources(data_path or None, n_train_crops, eval_images)
    view = TokenizerViewTransform(TwoViewConfig(second_input_size=cfg.input_size, color_jitter=0.0))
    train_set = TokenizerViewDataset(train_images, view, length=n_train_crops, seed=seed)
    eval_set = TokenizerViewDataset(eval_set_images, view, length=eval_images, seed=seed + 12345)
    changed = {k: v for k, v in vars(cfg).items() if k != "vocab_size" and v != getattr(PRESETS[preset], k)}
    log.info("data: %s", source)
    log.info("model: dVAE preset %s: vocab %d, %d px input, code dim %d, width %d x %s%s (the checkpoint holds the "
             "whole config)", preset, cfg.vocab_size, cfg.input_size, cfg.code_dim, cfg.hidden, cfg.channel_mult,
             f"; changed: {json.dumps(changed)}" if changed else "")
    return train_dvae(
        cfg, train_set, steps=steps, batch_size=batch_size, lr=lr if lr is not None else RECOMMENDED_LR[preset],
        out_path=output, device=device, seed=seed, progress=progress, eval_data=eval_set,
        eval_batches=(eval_images + batch_size - 1) // batch_size, save_every=save_every or None,
        num_workers=workers,
    )


def run_tokenizer_training(cfg) -> dict[str, Any]:
    """What ``python -m beit_fast.train_tokenizer`` runs (a validated :class:`beit_fast.config.TokenizerConfig`):
    :func:`train_tokenizer` on ``cfg.device`` (default: cuda if available, else cpu), then a summary printed
    (and, ``cfg.json``, the metrics as one JSON line); returns the metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not cfg.data_path and not cfg.threads:  # the embedded demo
        demo_cpu_threads(device)
    try:
        metrics = train_tokenizer(
            cfg.output, preset=cfg.preset, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            data_path=cfg.data_path, eval_images=cfg.eval_images, save_every=cfg.save_every, seed=cfg.seed,
            device=device, workers=cfg.workers, progress=not cfg.no_progress, vocab_size=cfg.vocab_size,
            input_size=cfg.input_size, temperature_start=cfg.temperature_start, temperature_end=cfg.temperature_end,
            kl_weight=cfg.kl_weight, recon_loss=cfg.recon_loss,
        )
    except (ValueError, CheckpointError) as e:  # no image files, a bad preset override, a failed save, ...
        raise SystemExit(f"error: {e}") from None
    init = metrics["initial"]
    print(
        f"\nTokenizer trained: {metrics['steps']} steps x {metrics['batch_size']} images in {metrics['time_s']:.1f} s "
        f"({metrics['images_per_s']:.0f} img/s) on {metrics['device']}\n"
        f"  eval ({metrics['eval_images']} held-out crops): recon MSE [0,1] scale {metrics['recon_mse']:.5f} "
        f"(untrained: {init['recon_mse']:.5f}; each crop's mean colour: {metrics['mean_color_mse']:.5f})\n"
        f"  codes used {metrics['codes_used']} / {metrics['vocab_size']}, perplexity {metrics['perplexity']:.1f}\n"
        f"  checkpoint: {metrics['checkpoint']}"
    )
    if cfg.json:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "config")}))
    return metrics
