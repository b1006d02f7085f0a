"""Linear probing of a frozen BEiT backbone (the paper's Table 9 protocol): ``python -m beit_fast.linear_probe``.

Average-pooled patch tokens of one block (``--layer``) or of every block (``--sweep``), a BatchNorm without
affine parameters and a linear classifier on cached features (the library: :mod:`beit_fast.linear_probing`).
Without ``--data_path``: scikit-learn's handwritten digits. This module parses the flags, then imports
torch and the library, so ``--help`` is instant.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/linear_probe.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.linear_probe as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
import json
import logging
import os
from pathlib import Path

from .logs import cli_logging
from .options import MODEL_NAMES, HelpFormatter, add_classification_data_args

__all__ = ["get_args_parser", "main"]

log = logging.getLogger("beit_fast.linear_probe")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m beit_fast.linear_probe",
        description="Linear probe of a frozen BEiT backbone on average-pooled patch tokens of one block (--layer) "
        "or of every block (--sweep). Without --data_path: scikit-learn's handwritten digits.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--finetune", default=None,
                   help="pretrained checkpoint to probe (ours, official, HuggingFace/timm names); omitted = a randomly "
                   "initialised backbone (a baseline)")
    g.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow a --finetune checkpoint that pickles Python objects beyond tensors and plain values "
                   "(e.g. an official one with its argparse args): it is read with Python's full unpickler, which "
                   "can run arbitrary code stored in the file; only for files you trust")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="model size (default: the checkpoint's architecture, else demo tiny / real base)")
    g.add_argument("--patch_size", type=int, default=None, help="patch size (default: the checkpoint's)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--layer", type=int, default=None,
                       help="block whose average-pooled output is probed, 1..depth (default: the last block)")
    which.add_argument("--sweep", action="store_true", help="probe every block and report the best")
    g.add_argument("--include_cls", action="store_true",
                   help="concatenate the [CLS] token to the average (the official run_linear_eval.py features)")
    add_classification_data_args(p)
    g = p.add_argument_group("probe")
    g.add_argument("--epochs", type=int, default=50, help="epochs of the linear classifier")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine to 0)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--batch_size", type=int, default=256, help="batch size of feature extraction and training")
    g.add_argument("--no_batchnorm", action="store_true", help="no BatchNorm (affine=False) before the linear layer")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="write linear_probe.json with the results here")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the classifier init, data order and data split")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the linear probe with command-line flags ``argv``; returns the sweep result dict."""
    args = get_args_parser().parse_args(argv)
    errors = []
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    if args.finetune and not os.path.isfile(args.finetune):
        errors.append(f"--finetune checkpoint not found: {args.finetune}")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        errors.append(f"--data_path {args.data_path} is not a folder")
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    with cli_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import torch

    from .finetuning import (DEMO_DEFAULTS, IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD,
                             build_model_for_args, build_transforms, load_datasets)
    from .linear_probing import sweep_layers
    from .pretrained import PretrainedLoadError, load_pretrained

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    # build_model_for_args reads these fine-tuning flags: a frozen backbone has no drop path.
    args.drop_path, args.use_mean_pooling, args.rel_pos_bias = 0.0, True, None
    args.abs_pos_emb = args.layer_scale_init_value = None
    args.init_scale = 1.0
    if args.crop_pct is None and args.data_path is None:
        args.crop_pct = DEMO_DEFAULTS["crop_pct"]
    model, ckpt = build_model_for_args(args, 0, args.finetune)
    if args.finetune:
        try:
            report = load_pretrained(model, ckpt)
        except (PretrainedLoadError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot load {args.finetune}: {e}") from None
        for note in report["notes"]:
            log.info("load: %s", note)
    else:
        log.warning("no --finetune checkpoint: probing a randomly initialised backbone")
    model.to(device).eval().requires_grad_(False)
    depth = model.get_num_layers()
    if args.layer is not None and not 1 <= args.layer <= depth:
        raise SystemExit(f"error: --layer must be in 1..{depth}, got {args.layer}")
    layers = list(range(1, depth + 1)) if args.sweep else [args.layer or depth]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_mean_and_std else (INCEPTION_MEAN, INCEPTION_STD)
    tf = build_transforms(args.input_size, train=False, crop_pct=args.crop_pct, mean=mean, std=std)
    train_set, val_set, classes = load_datasets(args, tf, tf)
    result = sweep_layers(model, train_set, val_set, layers, device=device, extract_batch_size=args.batch_size,
                          include_cls=args.include_cls, num_classes=len(classes), progress=not args.no_progress,
                          epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          seed=args.seed, batchnorm=not args.no_batchnorm)
    print(f"{'block':>5}  {'top-1':>7}  {'top-5':>7}  {'train top-1':>11}")
    for layer in layers:
        r = result["per_layer"][layer]
        mark = "  <- best" if layer == result["best_layer"] and len(layers) > 1 else ""
        print(f"{layer:>5}  {100 * r['top1']:>6.2f}%  {100 * r['top5']:>6.2f}%  {100 * r['train_top1']:>10.2f}%{mark}")
    print(f"best: block {result['best_layer']} of {depth}, top-1 {100 * result['best_top1']:.2f}%")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "linear_probe.json", "w") as f:
            json.dump({"args": vars(args), **result, "per_layer": {str(k): v for k, v in result["per_layer"].items()}},
                      f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
