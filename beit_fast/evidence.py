"""Does our BEiT pretraining help? Evidence on real, labelled images that need no download.

    python -m beit_fast.evidence                      # default: < 30 min on a 2-core CPU
    python -m beit_fast.evidence --ablations          # + random masking, + pixel regression (Table 4)
    python -m beit_fast.evidence --seeds 5 --pretrain_epochs 200 --embed_dim 192   # scale up

Data: scikit-learn's handwritten digits (``beit_fast.data.digits``: 1,797 real 8x8 scans, upsampled to
``--image_size``), split 75/25 stratified. The whole chain of the method runs on it:

1. a dVAE visual tokenizer trained on the training images (no labels);
2. BEiT pretraining of a small ViT on the training images (no labels): two views of one crop, blockwise
   masking of ~40% of the patches, cross-entropy on the visual tokens of masked patches only;
3. downstream, with only ``--labels_per_class`` labelled training images per class (the setting in which
   self-supervised pretraining matters): fine-tuning (layer-wise lr decay, label smoothing, warmup +
   cosine) and a linear probe (frozen backbone, average-pooled features of each layer, best layer kept).

Each is compared with the same network from random initialisation, fine-tuned / probed with exactly
the same data, schedule and budget, over ``--seeds`` seeds (the seed drives the pretraining run too).
The table gives the mean and standard deviation of top-1 accuracy on the 450 held-out images.

``--ablations`` adds the paper's Table 4 in miniature: blockwise -> random masking, and visual tokens ->
raw pixels (a linear head regressing the masked patches' normalised pixels with MSE).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/evidence.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.evidence as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
from typing import Sequence

from .utils.logs import cli_logging
from .config import EVIDENCE_VARIANTS, EvidenceConfig, exit_on_problems, from_args
from .utils.options import ArgumentParser, HelpFormatter

__all__ = ["build_parser", "main"]


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and each flag's default once."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m beit_fast.evidence", description=__doc__, formatter_class=_Formatter)
    d = EvidenceConfig()
    helps = {
        "seeds": "seeds per variant (each seed pretrains, fine-tunes and probes anew)",
        "image_size": "digits are upsampled from 8x8 to this size", "patch_size": "ViT patch size",
        "embed_dim": "ViT width", "depth": "ViT blocks", "num_heads": "attention heads",
        "mask_ratio": "fraction of patches masked in pretraining", "min_mask_block": "smallest masked block (patches)",
        "vocab_size": "dVAE codebook size", "tokenizer_steps": "dVAE training steps",
        "tokenizer_batch": "dVAE batch size", "pretrain_epochs": "BEiT pretraining epochs over the training images",
        "pretrain_batch": "pretraining batch size", "pretrain_lr": "pretraining peak learning rate",
        "pretrain_warmup_epochs": "pretraining warmup epochs", "crop_scale_min": "smallest random-crop area fraction",
        "labels_per_class": "labelled training images per class for fine-tuning and the probe",
        "finetune_epochs": "fine-tuning epochs", "finetune_batch": "fine-tuning batch size",
        "finetune_lr": "fine-tuning peak learning rate", "layer_decay": "layer-wise lr decay in fine-tuning",
        "probe_epochs": "linear-probe epochs (on cached features)", "probe_lr": "linear-probe learning rate",
        "variants": f"comma-separated variants to run, of {', '.join(EVIDENCE_VARIANTS)}",
        "threads": "torch CPU threads (default: torch's choice)", "output_dir": "where results are written",
    }
    for f in d.__dataclass_fields__.values():
        if f.name == "ablations":
            continue
        default = getattr(d, f.name)
        kind = type(default) if default is not None else int
        p.add_argument(f"--{f.name}", type=kind, default=default, help=helps[f.name])
    p.add_argument("--ablations", action="store_true",
                   help="also run random masking and pixel regression (Table 4 in miniature)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = from_args(EvidenceConfig, args)
    exit_on_problems(cfg.problems())
    import torch

    from .train.evidence import run_evidence, table

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with cli_logging():
        result = run_evidence(cfg, progress=not args.no_progress)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
