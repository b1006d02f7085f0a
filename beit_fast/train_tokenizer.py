"""Train our own discrete-VAE visual tokenizer: ``python -m beit_fast.train_tokenizer``.

With no ``--data_path`` it trains the ``tiny`` preset on random crops of scikit-image's bundled sample
photographs (two photos held out for evaluation) and runs on a laptop CPU in a minute or two. With
``--data_path DIR`` it uses every image file under DIR (recursively); about 1 in 20 files (at least one,
when there are two or more) is held out for evaluation.

The checkpoint (``--output``) is written atomically every ``--save_every`` steps and at the end; load it
with ``beit_fast.tokenizer.build_tokenizer("dvae", path)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import torch

from .tokenizer.dvae import PRESETS, RECOMMENDED_LR, DVAEConfig
from .tokenizer.train import (
    SKIMAGE_EVAL_PHOTOS,
    SKIMAGE_TRAIN_PHOTOS,
    RandomCropDataset,
    image_files,
    skimage_photos,
    train_dvae,
)


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
    if args.data_path:
        files = image_files(args.data_path)
        held = files[::20] if len(files) >= 2 else []
        train_files = [f for f in files if f not in set(held)] or files
        eval_files = held or files
        source = f"{len(train_files)} training / {len(eval_files)} evaluation image files under {args.data_path}"
        train_images, eval_images = train_files, eval_files
    else:
        train_images = skimage_photos(SKIMAGE_TRAIN_PHOTOS)
        eval_images = skimage_photos(SKIMAGE_EVAL_PHOTOS)
        source = (f"scikit-image sample photos: {len(train_images)} for training, "
                  f"{len(eval_images)} held out ({', '.join(SKIMAGE_EVAL_PHOTOS)}) for evaluation")
    train_set = RandomCropDataset(train_images, size=cfg.input_size, length=n_train_crops)
    eval_set = RandomCropDataset(eval_images, size=cfg.input_size, length=args.eval_images, seed=args.seed + 12345)
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
