"""Train our own discrete-VAE visual tokenizer: ``python -m beit_fast.train_tokenizer``.

With no ``--data_path`` it trains the ``tiny`` preset on random crops of scikit-image's bundled sample
photographs (:mod:`beit_fast.sample_data`, plus its colour wheel; ``coffee`` and ``clock`` held out for
evaluation) and runs on a laptop CPU in a minute or two. With ``--data_path DIR`` it uses every image file under DIR (recursively,
:class:`beit_fast.data.ImageFolderDataset`: unreadable files are skipped with a warning); about 1 in 20
files (at least one, when there are two or more) is held out for evaluation.

The training views are BEiT's tokenizer views, made by the pretraining data pipeline's own code
(:class:`beit_fast.transforms.TokenizerViewTransform`: RandomResizedCrop box, horizontal flip, Lanczos
resize to the tokenizer size, ``map_pixels``), without colour jitter, one seeded view per index
(:class:`TokenizerViewDataset`).

The checkpoint (``--output``) is written atomically every ``--save_every`` steps and at the end; load it
with ``beit_fast.tokenizer.build_tokenizer("dvae", path)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .data import ImageFolderDataset, sample_seed
from .sample_data import PHOTOGRAPHS, SampleImages
from .tokenizer.dvae import PRESETS, RECOMMENDED_LR, DVAEConfig
from .tokenizer.train import train_dvae
from .transforms import TokenizerViewTransform, TwoViewConfig

__all__ = ["TokenizerViewDataset", "HELD_OUT_PHOTOS", "build_parser", "main"]

#: sample photographs kept out of training and used only for the evaluation numbers.
HELD_OUT_PHOTOS = ("coffee", "clock")
#: size cap of the sample photographs: a view of the 1411x1411 retina otherwise takes about 3x the
#: resampling time of the others (measured 15 vs 4.6 ms per 112 px view, one CPU thread).
SAMPLE_MAX_SIDE = 640


class TokenizerViewDataset(Dataset):
    """``length`` tokenizer views (``[3, S, S]`` float32) of a dataset of PIL images.

    Item ``i`` is ``transform(images[i % len(images)])`` run under
    ``torch.manual_seed(data.sample_seed(seed, 0, i))`` in a forked torch RNG (as
    :class:`beit_fast.data.PretrainDataset` does), so it is a fixed function of ``(seed, i)`` whatever the
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beit_fast.train_tokenizer",
        description="Train a discrete VAE visual tokenizer (Gumbel-softmax relaxation, uniform prior) for BEiT.",
    )
    p.add_argument("--output", default="dvae_tokenizer.pt", help="checkpoint path (written atomically) (default: %(default)s)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model size preset: 'tiny' trains on a CPU in minutes, 'default' is a full-size tokenizer (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="number of optimisation steps (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate, 5%% warm-up then cosine decay to 10%% (default: the preset's: "
                        + ", ".join(f"{k} {v:g}" for k, v in sorted(RECOMMENDED_LR.items())) + ")")
    p.add_argument("--vocab_size", type=int, default=None, help="codebook size (default: the preset's; 8192 in BEiT)")
    p.add_argument("--input_size", type=int, default=None,
                   help="side of the tokenizer view, a multiple of 8 (default: the preset's, 112)")
    p.add_argument("--temperature_start", type=float, default=None,
                   help="Gumbel-softmax temperature at step 0 (default: the preset's, 1.0)")
    p.add_argument("--temperature_end", type=float, default=None,
                   help="temperature reached (exponential schedule) at the last step (default: the preset's, 1/16)")
    p.add_argument("--kl_weight", type=float, default=None,
                   help="final weight of KL(q || uniform) per token, relative to the per-value MSE; ramped "
                        "linearly from 0 over the first 10%% of steps (default: the preset's)")
    p.add_argument("--recon_loss", default=None, choices=["mse", "l1"],
                   help="reconstruction loss on the map_pixels'd image (default: the preset's, mse)")
    p.add_argument("--data_path", default=None,
                   help="folder of training images (searched recursively); default: scikit-image sample photos")
    p.add_argument("--eval_images", type=int, default=128, help="number of fixed crops in the evaluation set (default: %(default)s)")
    p.add_argument("--save_every", type=int, default=100, help="also write the checkpoint every N steps (0: only at the end) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (model init, crops, Gumbel noise) (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes (0: load crops in the training process) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DVAEConfig.preset(
        args.preset, vocab_size=args.vocab_size, input_size=args.input_size,
        temperature_start=args.temperature_start, temperature_end=args.temperature_end,
        kl_weight=args.kl_weight, recon_loss=args.recon_loss,
    )
    n_train_crops = max(args.steps * args.batch_size, 1)
    train_images, eval_images, source = _image_sources(args.data_path or None, n_train_crops, args.eval_images)
    view = TokenizerViewTransform(TwoViewConfig(second_input_size=cfg.input_size, color_jitter=0.0))
    train_set = TokenizerViewDataset(train_images, view, length=n_train_crops, seed=args.seed)
    eval_set = TokenizerViewDataset(eval_images, view, length=args.eval_images, seed=args.seed + 12345)
    logging.info("data: %s; model: preset %s, vocab %d, %s", source, args.preset, cfg.vocab_size,
                 json.dumps({k: v for k, v in vars(cfg).items() if k != "vocab_size"}))

    metrics = train_dvae(
        cfg, train_set, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else RECOMMENDED_LR[args.preset], out_path=args.output,
        device=args.device, seed=args.seed, progress=not args.no_progress, eval_data=eval_set,
        eval_batches=(args.eval_images + args.batch_size - 1) // args.batch_size,
        save_every=args.save_every or None, num_workers=args.workers,
    )
    init = metrics["initial"]
    print(
        f"\nTokenizer trained: {metrics['steps']} steps x {metrics['batch_size']} images in {metrics['time_s']:.1f} s "
        f"({metrics['images_per_s']:.0f} img/s) on {metrics['device']}\n"
        f"  eval ({metrics['eval_images']} held-out crops): recon MSE [0,1] scale {metrics['recon_mse']:.5f} "
        f"(untrained: {init['recon_mse']:.5f}; each crop's mean colour: {metrics['mean_color_mse']:.5f})\n"
        f"  codes used {metrics['codes_used']} / {metrics['vocab_size']}, perplexity {metrics['perplexity']:.1f}\n"
        f"  checkpoint: {metrics['checkpoint']}"
    )
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "config")}))
    return metrics


if __name__ == "__main__":
    main()
