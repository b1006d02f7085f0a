"""BEiT fine-tuning for image classification: ``python -m beit_fast.finetune [flags]``.

The official ``run_class_finetuning.py`` recipe. Without ``--data_path`` it runs the embedded default:
scikit-learn's handwritten digits at 32 px with a tiny ViT (patch 4), a few minutes on a laptop CPU. With
``--data_path DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``. This module parses the flags into a
:class:`beit_fast.config.FinetuneConfig` and calls :func:`beit_fast.train.classification_setup.run_finetune`
(torch is imported after the flags are parsed, so ``--help`` is instant).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/finetune.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.finetune as _cli
    _cli.main()
    raise SystemExit(0)

import argparse

from .config import FinetuneConfig, defaults_of, exit_on_problems, from_args
from .config.finetune import FINETUNE_DEMO_DEFAULTS
from .utils.logs import cli_logging
from .utils.options import ArgumentParser, MODEL_NAMES, RESIZE_FILTERS, HelpFormatter, add_classification_data_args

__all__ = ["get_args_parser", "resolve_defaults", "main"]

#: Flags whose default is not the config's: None until resolved (demo / real, or by the model's depth).
NO_CONFIG_DEFAULT = frozenset(FINETUNE_DEMO_DEFAULTS) | {"layer_decay"}


def _model_and_data_flags(p: argparse.ArgumentParser) -> None:
    """The classifier and the data."""
    g = p.add_argument_group("model")
    g.add_argument("--finetune",
                   help="pretraining checkpoint to start from: ours (beit_fast.pretrain), official, or HuggingFace/"
                   "timm weights (torch file). Omitted: without --data_path and architecture flags, the "
                   "pretraining demo's runs/beit_pretrain_demo/checkpoint-last.pt where it exists, else train from "
                   "scratch (with a warning); '' trains from scratch")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="model size (default: the architecture of --finetune, else demo tiny / real base)")
    g.add_argument("--patch_size", type=int, default=None,
                   help="patch size (default: the checkpoint's; demo 4 / real 16)")
    pool = g.add_mutually_exclusive_group()
    pool.add_argument("--use_mean_pooling", dest="use_mean_pooling", action="store_true",
                      help="classify the mean of the patch tokens after fc_norm (paper default)")
    pool.add_argument("--use_cls", dest="use_mean_pooling", action="store_false",
                      help="classify the [CLS] token after the final norm instead of mean pooling")
    g.add_argument("--rel_pos_bias", action=argparse.BooleanOptionalAction,
                   help="per-block relative position bias, copied from the checkpoint's shared table (default: on, "
                   "unless the checkpoint has no relative position bias)")
    g.add_argument("--abs_pos_emb", action=argparse.BooleanOptionalAction,
                   help="absolute position embedding (default: as the checkpoint / the model config)")
    g.add_argument("--layer_scale_init_value", type=float,
                   help="LayerScale init (default: the checkpoint's / the model's); 0 disables")
    g.add_argument("--init_scale", type=float, help="scale of the head's initial weights and bias")
    g.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (demo 0.1 / real 0.1)")
    g.add_argument("--rel_pos_resize", choices=["bicubic", "geometric"],
                   help="how relative position bias tables are resized when the patch grid changes")

    add_classification_data_args(p)


def _augmentation_flags(p: argparse.ArgumentParser) -> None:
    """Augmentation, label smoothing, mixup / cutmix."""
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None,
                   help="RandAugment as a timm string ('rand-m9-mstd0.5-inc1'; n ops default 2) or 'none' "
                   "(demo none / real rand-m9-mstd0.5-inc1)")
    g.add_argument("--min_crop_scale", type=float, default=None,
                   help="RandomResizedCrop minimum area fraction (demo 0.5 / real 0.08)")
    g.add_argument("--hflip", type=float, default=None,
                   help="horizontal flip probability; 0 for data that is not flip-invariant (demo 0 / real 0.5)")
    g.add_argument("--no_hflip", dest="hflip", action="store_const", const=0.0, help="same as --hflip 0")
    g.add_argument("--train_interpolation", choices=sorted(RESIZE_FILTERS), help="resize filter")
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability (demo 0 / real 0.25)")
    g.add_argument("--smoothing", dest="label_smoothing", metavar="SMOOTHING", type=float, help="label smoothing")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha, 0 = off (demo 0 / real 0.8)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, 0 = off (demo 0 / real 1.0)")
    g.add_argument("--mixup_prob", type=float, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float,
                   help="probability of cutmix rather than mixup when both are on")


def _optimisation_and_speed_flags(p: argparse.ArgumentParser) -> None:
    """The optimizer, its schedules, and the fast step."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (demo 30 / real 100)")
    g.add_argument("--batch_size", type=int, default=None, help="batch size (demo 64 / real 64)")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute peak learning rate, not scaled by batch size (demo 2e-3 / real 4e-3)")
    g.add_argument("--blr", type=float,
                   help="base learning rate for batch 256: lr = blr * batch_size / 256 (overrides --lr)")
    g.add_argument("--min_lr", type=float, help="final learning rate of the cosine schedule")
    g.add_argument("--warmup_lr", type=float, help="learning rate at the start of the warmup")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear warmup epochs (demo 3 / real 20)")
    g.add_argument("--warmup_steps", type=int, help="warmup steps; overrides --warmup_epochs if > 0")
    g.add_argument("--layer_decay", type=float, default=None,
                   help="layer-wise lr decay (default: 0.65 for base and smaller, 0.75 for large; 1 = off)")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--weight_decay_end", type=float, help="final weight decay of a cosine schedule")
    g.add_argument("--disable_weight_decay_on_rel_pos_bias", action="store_true",
                   help="no weight decay on the relative position bias tables (official default: decayed)")
    g.add_argument("--opt_betas", type=float, nargs=2, help="AdamW betas")
    g.add_argument("--opt_eps", type=float, help="AdamW epsilon")
    g.add_argument("--clip_grad", type=float, help="gradient norm clip (default: off, as officially)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision: auto = bf16 on CUDA when supported, else fp16; none on CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--fast", choices=["auto", "on", "off"],
                   help="fast training step (the classifier's fused attention with each block's relative position "
                   "bias, static shapes, torch.compile): auto = on with CUDA, off (the eager step) on CPU")
    g.add_argument("--attn_backend", choices=["auto", "math", "sdpa", "flex", "xformers", "triton", "reference"],
                   help="attention with the relative position bias (auto: the fastest available in the fast step, the "
                   "math reference in the eager step; 'reference' is a deprecated alias of math)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the fast step's forward and backward")
    g.add_argument("--activation_checkpointing",
                   help="recompute blocks in backward to save memory: none, all, or k (every k-th block)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Output folder, resume, evaluation, logs."""
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="checkpoints and log.jsonl (demo runs/beit_finetune_demo)")
    g.add_argument("--resume",
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
    g.add_argument("--eval_freq", type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--save_ckpt", action=argparse.BooleanOptionalAction,
                   help="write checkpoint-last.pt every epoch and checkpoint-best.pt at each new best top-1")
    g.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, help="seed of init, data order, augmentation, data split")
    g.add_argument("--log_freq", type=int,
                   help="read the step results back from the device every N steps (progress bar, non-finite check)")
    g.add_argument("--log_dir",
                   help="also write the logged scalars (train loss, val top-1, ...) as TensorBoard events to this folder "
                   "(needs the tensorboard package); the JSON lines go to output_dir/log.jsonl either way")
    g.add_argument("--max_bad_steps", type=int,
                   help="stop (with a checkpoint) after this many consecutive non-finite losses")
    g.add_argument("--stop_after_steps", type=int,
                   help="stop after this many steps with a checkpoint, as if interrupted (for testing resume)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        "python -m beit_fast.finetune",
        description="BEiT fine-tuning for image classification (official recipe). Without --data_path, runs the "
        "embedded CPU-sized default on scikit-learn's handwritten digits. Defaults shown as 'demo/real' differ "
        "between that default and a run with --data_path (the official BEiT-B ImageNet recipe).",
        formatter_class=HelpFormatter,
    )
    _model_and_data_flags(p)
    _augmentation_flags(p)
    _optimisation_and_speed_flags(p)
    _run_flags(p)
    # The flags' defaults are the config's, but for those whose default differs between the demo and a real run
    # (None here: FinetuneConfig.resolved fills them) and the layer decay (None: by the model's depth).
    p.set_defaults(**{k: v for k, v in defaults_of(FinetuneConfig).items() if k not in NO_CONFIG_DEFAULT})
    return p


def resolve_defaults(args: argparse.Namespace) -> FinetuneConfig:
    """The run's config from parsed flags: demo / real defaults filled in, every problem reported at once."""
    cfg = from_args(FinetuneConfig, args).resolved()
    exit_on_problems(cfg.problems())
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run fine-tuning with command-line flags ``argv`` (default ``sys.argv[1:]``); returns the result dict."""
    cfg = resolve_defaults(get_args_parser().parse_args(argv))
    from .train.classification_setup import run_finetune

    with cli_logging():
        return run_finetune(cfg)


if __name__ == "__main__":
    main()
