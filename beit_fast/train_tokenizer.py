"""Train our own discrete-VAE visual tokenizer: ``python -m beit_fast.train_tokenizer``.

With no ``--data_path`` it trains the ``tiny`` preset on random crops of scikit-image's bundled sample
photographs and runs on a laptop CPU in a minute or two; with ``--data_path DIR`` it uses every image file
under DIR (the library: :mod:`beit_fast.tokenizer_training`). Load the checkpoint (``--output``) with
``beit_fast.tokenizer.build_tokenizer("dvae", path)``. This module parses the flags, then imports torch
and the library, so ``--help`` is instant.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/train_tokenizer.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.train_tokenizer as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
import json
import os
from typing import Sequence

from .logs import cli_logging
from .options import DVAE_PRESET_NAMES, DVAE_RECOMMENDED_LR, HelpFormatter

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beit_fast.train_tokenizer",
        description="Train a discrete VAE visual tokenizer (Gumbel-softmax relaxation, uniform prior) for BEiT. "
        "Without --data_path it trains on crops of scikit-image's sample photographs; with --data_path DIR on "
        "every image file under DIR (about 1 in 20 held out for evaluation).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output", default="dvae_tokenizer.pt", help="checkpoint path (written atomically) (default: %(default)s)")
    p.add_argument("--preset", default="tiny", choices=DVAE_PRESET_NAMES,
                   help="model size preset: 'tiny' trains on a CPU in minutes, 'default' is a full-size tokenizer (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="number of optimisation steps (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate, 5%% warm-up then cosine decay to 10%% (default: the preset's: "
                        + ", ".join(f"{k} {v:g}" for k, v in sorted(DVAE_RECOMMENDED_LR.items())) + ")")
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
    p.add_argument("--device", default=None, help="torch device to train on (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes (0: load crops in the training process) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    errors = [f"--{name} must be positive, got {getattr(args, name)}" for name in ("steps", "batch_size", "eval_images")
              if getattr(args, name) <= 0]
    if args.data_path is not None and not os.path.isdir(args.data_path):
        errors.insert(0, f"--data_path {args.data_path}: image folder not found" if not os.path.exists(args.data_path)
                      else f"--data_path {args.data_path} is not a folder")
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    import torch

    from .tokenizer_training import train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with cli_logging():
        try:
            metrics = train_tokenizer(
                args.output, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                data_path=args.data_path, eval_images=args.eval_images, save_every=args.save_every, seed=args.seed,
                device=device, workers=args.workers, progress=not args.no_progress, vocab_size=args.vocab_size,
                input_size=args.input_size, temperature_start=args.temperature_start,
                temperature_end=args.temperature_end, kl_weight=args.kl_weight, recon_loss=args.recon_loss,
            )
        except ValueError as e:  # no image files, a bad preset override, ...
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
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "config")}))
    return metrics


if __name__ == "__main__":
    main()
