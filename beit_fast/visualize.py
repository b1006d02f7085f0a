"""Pictures of a BEiT pretraining run: ``python -m beit_fast.visualize RUN_DIR --out_dir DIR``.

Writes ``mask.png``, ``tokenizer_reconstruction.png``, ``predictions.png`` and ``curves.png`` for a
``python -m beit_fast.pretrain`` output folder (the library, and what each picture shows:
:mod:`beit_fast.visualization`). This module parses the flags, then imports torch and the library, so
``--help`` is instant.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/visualize.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.visualize as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
import os
from pathlib import Path

from .utils.logs import cli_logging
from .utils.options import ArgumentParser, DEFAULT_DPI, PANEL_INCHES, PICTURE_PARTS, HelpFormatter

__all__ = ["get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        "python -m beit_fast.visualize",
        description="Pictures of a BEiT pretraining run: images with their blockwise masks (mask.png), the "
        "tokenizer's reconstructions (tokenizer_reconstruction.png), the model's predictions at masked "
        "positions decoded by the tokenizer (predictions.png) and the loss/accuracy/lr curves (curves.png).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", help="output folder of python -m beit_fast.pretrain (checkpoints, log.jsonl)")
    p.add_argument("--out_dir", default=None, help="where to write the PNGs (default: RUN_DIR/pictures)")
    p.add_argument("--num_images", type=int, default=4, help="images per picture")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice, crops and masks")
    p.add_argument("--only", default="all",
                   help=f"comma-separated subset of {','.join(PICTURE_PARTS)} (all: every picture the run allows)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to picture (default: RUN_DIR's newest, checkpoint-last.pt)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer weights (default: the path saved in the checkpoint, or RUN_DIR/tokenizer.pt)")
    p.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow a checkpoint that pickles Python objects beyond tensors and plain values (old or "
                   "foreign files): it is read with Python's full unpickler, which can run arbitrary code stored "
                   "in the file; only for files you trust")
    p.add_argument("--data_path", default=None,
                   help="image folder to draw the pictured images from (default: the run's; the demo's "
                   "scikit-image photographs for a demo run)")
    p.add_argument("--log", default=None, help="JSON-lines log for the curves (default: RUN_DIR/log.jsonl)")
    p.add_argument("--device", default="cpu", help="device for the model and the tokenizer (cpu, cuda, ...)")
    p.add_argument("--dpi", type=int, default=DEFAULT_DPI,
                   help=f"pixels per inch; an image panel is {PANEL_INCHES:g} inches square")
    p.add_argument("--palette", action="store_true",
                   help="write 256-colour PNGs (about 3x smaller; for READMEs)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    """Command-line entry point; returns the paths written."""
    args = get_args_parser().parse_args(argv)
    out_dir = args.out_dir if args.out_dir is not None else os.path.join(args.run_dir, "pictures")
    from .visualization import visualize_run

    with cli_logging():
        try:
            paths = visualize_run(args.run_dir, out_dir, num_images=args.num_images, seed=args.seed, only=args.only,
                                  checkpoint=args.checkpoint, tokenizer=args.tokenizer, data_path=args.data_path,
                                  log_path=args.log, device=args.device, dpi=args.dpi, palette=args.palette,
                                  trust_pickle=args.trust_pickle)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
