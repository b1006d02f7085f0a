"""BEiT fine-tuning for image classification: ``python -m beit_fast.finetune [flags]``.

The official ``run_class_finetuning.py`` recipe (the library: :mod:`beit_fast.finetuning`). Without
``--data_path`` it runs the embedded default: scikit-learn's handwritten digits at 32 px with a tiny ViT
(patch 4), a few minutes on a laptop CPU. With ``--data_path DIR``: ``DIR/train/<class>/*`` and
``DIR/val/<class>/*`` (torchvision ImageFolder). This module parses the flags, then imports torch and the
library, so ``--help`` is instant.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/finetune.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.finetune as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
import logging
import os
from pathlib import Path

from .logs import cli_logging
from .options import MODEL_NAMES, RESIZE_FILTERS, HelpFormatter, add_classification_data_args

__all__ = ["get_args_parser", "resolve_defaults", "main"]

log = logging.getLogger("beit_fast.finetune")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m beit_fast.finetune",
        description="BEiT fine-tuning for image classification (official recipe). Without --data_path, runs the "
        "embedded CPU-sized default on scikit-learn's handwritten digits. Defaults shown as 'demo/real' differ "
        "between that default and a run with --data_path (the official BEiT-B ImageNet recipe).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--finetune", default=None,
                   help="pretraining checkpoint to start from: ours (beit_fast.pretrain), official, or HuggingFace/"
                   "timm weights (torch file); omitted = train from scratch (with a warning)")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="model size (default: the architecture of --finetune, else demo tiny / real base)")
    g.add_argument("--patch_size", type=int, default=None,
                   help="patch size (default: the checkpoint's; demo 4 / real 16)")
    pool = g.add_mutually_exclusive_group()
    pool.add_argument("--use_mean_pooling", dest="use_mean_pooling", action="store_true", default=True,
                      help="classify the mean of the patch tokens after fc_norm (paper default)")
    pool.add_argument("--use_cls", dest="use_mean_pooling", action="store_false",
                      help="classify the [CLS] token after the final norm instead of mean pooling")
    g.add_argument("--rel_pos_bias", action=argparse.BooleanOptionalAction, default=None,
                   help="per-block relative position bias, copied from the checkpoint's shared table (default: on, "
                   "unless the checkpoint has no relative position bias)")
    g.add_argument("--abs_pos_emb", action=argparse.BooleanOptionalAction, default=None,
                   help="absolute position embedding (default: as the checkpoint / the model config)")
    g.add_argument("--layer_scale_init_value", type=float, default=None,
                   help="LayerScale init (default: the checkpoint's / the model's); 0 disables")
    g.add_argument("--init_scale", type=float, default=0.001, help="scale of the head's initial weights and bias")
    g.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (demo 0.1 / real 0.1)")
    g.add_argument("--rel_pos_resize", choices=["bicubic", "geometric"], default="bicubic",
                   help="how relative position bias tables are resized when the patch grid changes")

    add_classification_data_args(p)
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None,
                   help="RandAugment as a timm string ('rand-m9-mstd0.5-inc1'; n ops default 2) or 'none' "
                   "(demo none / real rand-m9-mstd0.5-inc1)")
    g.add_argument("--min_crop_scale", type=float, default=None,
                   help="RandomResizedCrop minimum area fraction (demo 0.5 / real 0.08)")
    g.add_argument("--hflip", type=float, default=None,
                   help="horizontal flip probability; 0 for data that is not flip-invariant (demo 0 / real 0.5)")
    g.add_argument("--no_hflip", dest="hflip", action="store_const", const=0.0, help="same as --hflip 0")
    g.add_argument("--train_interpolation", default="bicubic", choices=sorted(RESIZE_FILTERS), help="resize filter")
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability (demo 0 / real 0.25)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha, 0 = off (demo 0 / real 0.8)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, 0 = off (demo 0 / real 1.0)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5,
                   help="probability of cutmix rather than mixup when both are on")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (demo 30 / real 100)")
    g.add_argument("--batch_size", type=int, default=None, help="batch size (demo 64 / real 64)")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute peak learning rate, not scaled by batch size (demo 2e-3 / real 4e-3)")
    g.add_argument("--blr", type=float, default=None,
                   help="base learning rate for batch 256: lr = blr * batch_size / 256 (overrides --lr)")
    g.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    g.add_argument("--warmup_lr", type=float, default=0.0, help="learning rate at the start of the warmup")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear warmup epochs (demo 3 / real 20)")
    g.add_argument("--warmup_steps", type=int, default=-1, help="warmup steps; overrides --warmup_epochs if > 0")
    g.add_argument("--layer_decay", type=float, default=None,
                   help="layer-wise lr decay (default: 0.65 for base and smaller, 0.75 for large; 1 = off)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--weight_decay_end", type=float, default=None, help="final weight decay of a cosine schedule")
    g.add_argument("--disable_weight_decay_on_rel_pos_bias", action="store_true",
                   help="no weight decay on the relative position bias tables (official default: decayed)")
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--opt_eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip_grad", type=float, default=None, help="gradient norm clip (default: off, as officially)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="mixed precision: auto = bf16 on CUDA when supported, else fp16; none on CPU")
    g.add_argument("--attn_backend", default="math",
                   choices=["auto", "math", "sdpa", "flex", "xformers", "triton", "reference"],
                   help="attention implementation (math: the eager reference; auto: the fastest available; "
                   "'reference' is a deprecated alias of math)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="checkpoints and log.jsonl (demo runs/beit_finetune_demo)")
    g.add_argument("--resume", default="",
                   help="fine-tuning checkpoint to resume from, or 'auto': output_dir's newest loadable one "
                   "(fresh start if none)")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a fresh run in an --output_dir that holds another run's checkpoints: they and its "
                   "log.jsonl are deleted first (without this flag such a run is refused; see --resume auto)")
    g.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow --finetune / --resume checkpoints that pickle Python objects beyond tensors and "
                   "plain values (e.g. official checkpoints with their argparse args): they are read with "
                   "Python's full unpickler, which can run arbitrary code stored in the file; only for files "
                   "you trust")
    g.add_argument("--eval", action="store_true",
                   help="evaluate only: the --finetune weights (or --resume's) on the val set, then exit")
    g.add_argument("--eval_freq", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--save_ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="write checkpoint-last.pt every epoch and checkpoint-best.pt at each new best top-1")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation, data split")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags whose default depends on demo vs real run, and validate them (SystemExit)."""
    from .finetuning import DEMO_DEFAULTS, OFFICIAL_DEFAULTS, parse_randaug

    defaults = DEMO_DEFAULTS if args.data_path is None else OFFICIAL_DEFAULTS
    for key, value in defaults.items():
        if key in ("model", "patch_size", "input_size"):
            continue  # resolved with the checkpoint's architecture in _build_model
        if getattr(args, key) is None:
            setattr(args, key, value)
    errors = []
    for name in ("epochs", "batch_size", "eval_freq"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("input_size", "patch_size", "nb_classes", "labels_per_class"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            errors.append(f"--{name} must be positive, got {v}")
    if args.finetune and not os.path.isfile(args.finetune):
        errors.append(f"--finetune checkpoint not found: {args.finetune}")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        errors.append(f"--resume checkpoint not found: {args.resume}")
    if args.data_path is not None:
        if not os.path.isdir(args.data_path):
            errors.append(f"--data_path {args.data_path} is not a folder")
        else:
            for split in ("train", "val"):
                folder = Path(args.data_path) / split
                if not folder.is_dir():
                    errors.append(f"{folder} not found: --data_path must hold train/ and val/ folders, each with "
                                  "one subfolder of images per class")
                elif not any(d.is_dir() for d in folder.iterdir()):
                    errors.append(f"{folder} has no class subfolders")
    if args.resume and args.overwrite_output_dir:
        errors.append("--resume continues the run in --output_dir, --overwrite_output_dir deletes it: choose one")
    if args.eval and not args.finetune and args.resume in ("", "auto"):
        errors.append("--eval needs weights: --finetune PATH (a fine-tuned or pretrained checkpoint) or --resume PATH")
    try:
        parse_randaug(args.aa)
    except ValueError as e:
        errors.append(f"--aa: {e}")
    if args.hflip is not None and not 0 <= args.hflip <= 1:
        errors.append(f"--hflip must be in [0, 1], got {args.hflip}")
    if not 0 <= args.reprob <= 1:
        errors.append(f"--reprob must be in [0, 1], got {args.reprob}")
    if not 0 < args.min_crop_scale <= 1:
        errors.append(f"--min_crop_scale must be in (0, 1], got {args.min_crop_scale}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        errors.append(f"--crop_pct must be in (0, 1], got {args.crop_pct}")
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run fine-tuning with command-line flags ``argv`` (default ``sys.argv[1:]``); returns the result dict."""
    args = resolve_defaults(get_args_parser().parse_args(argv))
    with cli_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import torch

    from .checkpoint import CheckpointError
    from .train.engine import resolve_amp_dtype
    from .finetuning import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, FinetuneConfig,
                             build_model_for_args, build_transforms, default_layer_decay, evaluate, finetune,
                             load_datasets)
    from .rng import seed_everything

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    from .pretrained import PretrainedLoadError, load_pretrained

    # The architecture (hence the input size) is needed before the transforms, the class count before
    # the model: count the class folders (digits: 10), check against the data sets once they exist.
    weights = args.finetune or (args.resume if args.eval and args.resume not in ("", "auto") else None)
    num_classes_hint = args.nb_classes
    if num_classes_hint is None:
        if args.data_path is None:
            num_classes_hint = 10
        else:
            num_classes_hint = sum(1 for d in (Path(args.data_path) / "train").iterdir() if d.is_dir())
    seed_everything(args.seed)
    model, ckpt = build_model_for_args(args, num_classes_hint, weights)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_mean_and_std else (INCEPTION_MEAN, INCEPTION_STD)
    train_tf = build_transforms(args.input_size, train=True, randaug=args.aa, reprob=args.reprob,
                                min_scale=args.min_crop_scale, hflip=args.hflip, interpolation=args.train_interpolation,
                                mean=mean, std=std)
    eval_tf = build_transforms(args.input_size, train=False, crop_pct=args.crop_pct, mean=mean, std=std)
    train_set, val_set, classes = load_datasets(args, train_tf, eval_tf)
    if len(classes) != num_classes_hint:
        raise SystemExit(f"error: {len(classes)} classes in the data, {num_classes_hint} expected")
    if weights:
        try:
            report = load_pretrained(model, ckpt, rel_pos_resize=args.rel_pos_resize)
        except (PretrainedLoadError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot load {weights}: {e}") from None
        for note in report["notes"]:
            log.info("load %s: %s", weights, note)
        log.info("load %s: left at init: %s", weights, report["missing"] or "nothing")
    else:
        log.warning("no --finetune checkpoint: training from scratch (random init), not fine-tuning")
    model.configure_fast_path(attention=args.attn_backend)
    layer_decay = args.layer_decay if args.layer_decay is not None else default_layer_decay(model.get_num_layers())
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, blr=args.blr, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, weight_decay_end=args.weight_decay_end, layer_decay=layer_decay,
        disable_weight_decay_on_rel_pos_bias=args.disable_weight_decay_on_rel_pos_bias,
        opt_betas=tuple(args.opt_betas), opt_eps=args.opt_eps, clip_grad=args.clip_grad,
        label_smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, drop_path=args.drop_path, amp=args.amp, seed=args.seed,
        num_workers=args.num_workers, eval_freq=args.eval_freq, save_ckpt=args.save_ckpt, resume=args.resume,
    )
    try:
        cfg.validate()
        amp_dtype = resolve_amp_dtype(args.amp, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.eval:
        model.to(device)
        res = evaluate(model, val_set, batch_size=max(1, int(1.5 * args.batch_size)), device=device,
                       amp_dtype=amp_dtype, num_workers=args.num_workers, progress=not args.no_progress)
        print(f"Accuracy on the {res['n']} val images: top-1 {100 * res['top1']:.2f}%, "
              f"top-5 {100 * res['top5']:.2f}%")
        return {"best_top1": res["top1"], "best_epoch": None, "final_top1": res["top1"], "final_top5": res["top5"],
                "history": [], "eval": res}
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --output_dir {out} is not writable: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    log.info("fine-tuning %.2fM parameters on %d images (%d classes), %d val; lr %.3g, layer decay %.2f, "
             "%d epochs of %d steps; device %s", n_params / 1e6, len(train_set), len(classes), len(val_set),
             cfg.effective_lr(), layer_decay, cfg.epochs, len(train_set) // cfg.batch_size, device)
    try:
        result = finetune(model, train_set, val_set, cfg, device=device, output_dir=out,
                          progress=not args.no_progress, num_classes=len(classes), trust_pickle=args.trust_pickle,
                          overwrite_output_dir=args.overwrite_output_dir, run_args=vars(args))
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"best top-1 {100 * result['best_top1']:.2f}% (epoch {result['best_epoch']}); final top-1 "
          f"{100 * result['final_top1']:.2f}%, top-5 {100 * result['final_top5']:.2f}%; checkpoints in {out}")
    return result


if __name__ == "__main__":
    main()
