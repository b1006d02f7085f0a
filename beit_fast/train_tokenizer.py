"""Train our own discrete-VAE visual tokenizer: ``python -m beit_fast.train_tokenizer``.

With no ``--data_path`` it trains the ``tiny`` preset on random crops of scikit-image's bundled sample
photographs and runs on a laptop CPU in a minute or two; with ``--data_path DIR`` it uses every image file
under DIR. Load the checkpoint (``--output``) with ``beit_fast.tokenizer.build_tokenizer("dvae", path)``.
This module parses the flags into a :class:`beit_fast.config.TokenizerConfig` and calls
:func:`beit_fast.train.tokenizer_training.run_tokenizer_training` (torch is imported after parsing, so ``--help``
is instant).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/train_tokenizer.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.train_tokenizer as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
from typing import Sequence

from .config import TokenizerConfig, defaults_of, exit_on_problems, from_args
from .utils.logs import cli_logging
from .utils.options import ArgumentParser, DVAE_PRESET_NAMES, DVAE_RECOMMENDED_LR, HelpFormatter

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m beit_fast.train_tokenizer",
        description="Train a discrete VAE visual tokenizer (Gumbel-softmax relaxation, uniform prior) for BEiT. "
        "Without --data_path it trains on crops of scikit-image's sample photographs; with --data_path DIR on "
        "every image file under DIR (about 1 in 20 held out for evaluation).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output", help="checkpoint path (written atomically) (default: %(default)s)")
    p.add_argument("--preset", choices=DVAE_PRESET_NAMES,
                   help="model size preset: 'tiny' trains on a CPU in minutes, 'default' is a full-size tokenizer (default: %(default)s)")
    p.add_argument("--steps", type=int, help="number of optimisation steps (default: %(default)s)")
    p.add_argument("--batch_size", type=int, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float,
                   help="peak AdamW learning rate, 5%% warm-up then cosine decay to 10%% (default: the preset's: "
                        + ", ".join(f"{k} {v:g}" for k, v in sorted(DVAE_RECOMMENDED_LR.items())) + ")")
    p.add_argument("--vocab_size", type=int, help="codebook size (default: the preset's; 8192 in BEiT)")
    p.add_argument("--input_size", type=int,
                   help="side of the tokenizer view, a multiple of 8 (default: the preset's, 112)")
    p.add_argument("--temperature_start", type=float,
                   help="Gumbel-softmax temperature at step 0 (default: the preset's, 1.0)")
    p.add_argument("--temperature_end", type=float,
                   help="temperature reached (exponential schedule) at the last step (default: the preset's, 1/16)")
    p.add_argument("--kl_weight", type=float,
                   help="final weight of KL(q || uniform) per token, relative to the per-value MSE; ramped "
                        "linearly from 0 over the first 10%% of steps (default: the preset's)")
    p.add_argument("--recon_loss", choices=["mse", "l1"],
                   help="reconstruction loss on the map_pixels'd image (default: the preset's, mse)")
    p.add_argument("--data_path",
                   help="folder of training images (searched recursively); default: scikit-image sample photos")
    p.add_argument("--eval_images", type=int, help="number of fixed crops in the evaluation set (default: %(default)s)")
    p.add_argument("--save_every", type=int, help="also write the checkpoint every N steps (0: only at the end) (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed (model init, crops, Gumbel noise) (default: %(default)s)")
    p.add_argument("--device", help="torch device to train on (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int,
                   help="data-loading worker processes (0: load crops in the training process) (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    p.set_defaults(**defaults_of(TokenizerConfig))  # the flags' defaults are the config's
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Train a tokenizer with command-line flags ``argv``; returns its metrics."""
    cfg = from_args(TokenizerConfig, build_parser().parse_args(argv))
    exit_on_problems(cfg.problems())
    from .train.tokenizer_training import run_tokenizer_training

    with cli_logging():
        return run_tokenizer_training(cfg)


if __name__ == "__main__":
    main()
