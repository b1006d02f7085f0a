"""BEiT semantic segmentation (UperNet, the official mmseg recipe): ``python -m beit_fast.segment [flags]``.

Data: ``--data_path ROOT`` (ADE20K's ADEChallengeData2016 layout: 150 classes, reduce-zero-label) or a
generic folder pair ``--train_images/--train_masks`` (+ ``--val_images/--val_masks``) with ``--num_classes``.
Without either it runs the embedded CPU demo (:mod:`beit_fast.train.segmentation_demo`): texture scenes made from
scikit-image's photographs, fine-tuned from the pretraining demo's checkpoint (when present) and from
scratch. This module parses the flags into a :class:`beit_fast.config.segment.SegmentConfig` and calls
:mod:`beit_fast.train.segmentation` (torch is imported after parsing).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/segment.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.segment as _cli
    _cli.main()
    raise SystemExit(0)

import argparse
import dataclasses
import logging
from pathlib import Path

from .config.base import exit_on_problems
from .config.segment import SEGMENT_RECIPES, SegmentConfig
from .utils.logs import cli_logging
from .utils.options import MODEL_NAMES, ArgumentParser, HelpFormatter

__all__ = ["get_args_parser", "config_from_args", "main", "DEMO_DEFAULTS"]

log = logging.getLogger("beit_fast.segment")

#: The embedded demo's settings (CPU minutes): 128 px crops of 160 px scenes, the pretraining demo's tiny BEiT.
DEMO_DEFAULTS = dict(model="tiny", crop_size=128, img_scale=(640, 160), stride=85, max_iters=240, eval_interval=80,
                     batch_size=4, warmup_iters=24, num_workers=0, log_freq=25, drop_path=0.1, lr=1e-3,
                     output_dir="runs/beit_segment_demo")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("python -m beit_fast.segment", formatter_class=HelpFormatter,
                                description="BEiT + UperNet semantic segmentation, the official mmseg recipe on "
                                "beit_fast's engine. Without data flags: the embedded CPU demo.")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", help="ADE20K root (images/{training,validation}, annotations/...)")
    d.add_argument("--train_images", help="folder of training images (with --train_masks)")
    d.add_argument("--train_masks", help="folder of training masks: single-channel PNGs named like the images")
    d.add_argument("--val_images", help="folder of validation images (with --val_masks)")
    d.add_argument("--val_masks", help="folder of validation masks")
    d.add_argument("--num_classes", type=int, help="classes (ADE20K: 150)")
    d.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=None,
                   help="label 0 is 'other' (ignored) and l -> l - 1 (default: on for --data_path, else off)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_NAMES, help="backbone size (default: --finetune's architecture, else base)")
    m.add_argument("--finetune", help="pretrained backbone checkpoint (pretraining or classification; ours, "
                   "official, HF or timm); omitted: from scratch (with a warning)")
    m.add_argument("--rel_pos_resize", choices=["bicubic", "geometric"], default="bicubic",
                   help="how the relative position tables are resized to the crop's patch grid")
    m.add_argument("--no_auxiliary_head", action="store_true", help="no FCN auxiliary head")
    cfg_defaults = {f.name: f.default for f in dataclasses.fields(SegmentConfig)}
    t = p.add_argument_group("training (official config names; defaults: the BEiT-B ADE20K 'pt' recipe)")
    t.add_argument("--recipe", choices=sorted(SEGMENT_RECIPES),
                   help="pt: lr 7e-4, layer decay 0.65 (self-supervised checkpoint); pt2ft: lr 3e-5, 0.9 (after "
                   "intermediate fine-tuning)")
    for name, typ, hlp in [
        ("max_iters", int, "training iterations"), ("eval_interval", int, "evaluate and save every N iterations"),
        ("batch_size", int, "images per iteration (official 16 = 8 GPUs x 2)"), ("lr", float, "peak lr (default: recipe's)"),
        ("layer_decay_rate", float, "layer-wise lr decay (default: recipe's)"), ("weight_decay", float, "AdamW weight decay"),
        ("warmup_iters", int, "linear warmup iterations"), ("warmup_ratio", float, "warmup starts at lr * this"),
        ("power", float, "poly schedule power"), ("min_lr", float, "poly schedule final lr"),
        ("clip_grad", float, "gradient norm clip (official: none)"), ("drop_path", float, "stochastic depth rate"),
        ("aux_weight", float, "auxiliary loss weight"), ("crop_size", int, "training crop = model input size"),
        ("cat_max_ratio", float, "RandomCrop: largest class share of a crop"),
        ("stride", int, "sliding-window stride"), ("seed", int, "seed"), ("num_workers", int, "data workers"),
        ("log_freq", int, "read step results every N steps"), ("max_bad_steps", int, "stop after N non-finite steps"),
        ("stop_after_steps", int, "stop (with a checkpoint) after N steps, as if interrupted"),
    ]:
        t.add_argument(f"--{name}", type=typ, help=hlp)
    t.add_argument("--img_scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize scale before the ratio range (official 2048 512)")
    t.add_argument("--ratio_range", type=float, nargs=2, help="random resize ratio range (official 0.5 2.0)")
    t.add_argument("--photometric", action=argparse.BooleanOptionalAction, help="PhotoMetricDistortion")
    t.add_argument("--avg_non_ignore", action="store_true",
                   help="average the loss over labelled pixels (HF) instead of all pixels (mmseg)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--test_mode", choices=["slide", "whole"], help="sliding window (official) or whole image")
    e.add_argument("--flip", action="store_true", help="test-time horizontal flip")
    e.add_argument("--aug_ratios", type=float, nargs="+", help="test scales (official multi-scale: 0.5 0.75 1.0 1.25 1.5 1.75)")
    e.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint only, then exit")
    s = p.add_argument_group("speed and run")
    s.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], help="mixed precision")
    s.add_argument("--fast", choices=["auto", "on", "off"], help="the compiled fast step (auto: on with CUDA)")
    s.add_argument("--attn_backend", choices=["auto", "math", "sdpa", "flex", "xformers", "triton"],
                   help="attention backend (per-block tables)")
    s.add_argument("--activation_checkpointing", help="none, all or k (every k-th block)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the fast step")
    s.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    s.add_argument("--output_dir", help="checkpoints, log.jsonl (default runs/beit_segment[_demo])")
    s.add_argument("--resume", help="segmentation checkpoint, or 'auto'")
    s.add_argument("--overwrite_output_dir", action="store_true", help="replace another run's checkpoints")
    s.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="read checkpoints that pickle Python objects (can run code: trusted files only)")
    s.add_argument("--log_dir", help="TensorBoard events folder")
    s.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(**{k: None for k in cfg_defaults})
    return p


def is_demo(args: argparse.Namespace) -> bool:
    return not (args.data_path or args.train_images or args.train_masks)


def config_from_args(args: argparse.Namespace) -> SegmentConfig:
    """The run's config: flags given, else the demo's / the config's defaults; every problem at once."""
    demo = DEMO_DEFAULTS if is_demo(args) else {}
    values = {}
    for f in dataclasses.fields(SegmentConfig):
        v = getattr(args, f.name, None)
        if v is None:
            v = demo.get(f.name, f.default)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    cfg = SegmentConfig(**values)
    problems = cfg.problems()
    if not is_demo(args):
        if args.data_path and (args.train_images or args.train_masks):
            problems.append("give --data_path or --train_images/--train_masks, not both")
        if args.train_images and not args.train_masks or args.train_masks and not args.train_images:
            problems.append("--train_images and --train_masks go together")
        if bool(args.val_images) != bool(args.val_masks):
            problems.append("--val_images and --val_masks go together")
        if not args.data_path and not args.num_classes:
            problems.append("--num_classes is required with --train_images/--train_masks")
    exit_on_problems(problems)
    return cfg


def _datasets(args, cfg: SegmentConfig):
    from .data.segmentation import (SegEvalTransform, SegmentationFolder, SegTrainTransform, ade20k_folders,
                                    pair_folders)

    train_tf = SegTrainTransform(crop_size=cfg.crop_size, img_scale=tuple(cfg.img_scale or (cfg.crop_size,) * 2),
                                 ratio_range=tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
                                 photometric=cfg.photometric)
    if args.data_path:
        num_classes = args.num_classes or 150
        reduce = True if args.reduce_zero_label is None else args.reduce_zero_label
        train_pairs = pair_folders(*ade20k_folders(args.data_path, "training"))
        val_pairs = pair_folders(*ade20k_folders(args.data_path, "validation"))
    else:
        num_classes, reduce = args.num_classes, bool(args.reduce_zero_label)
        train_pairs = pair_folders(args.train_images, args.train_masks)
        val_pairs = pair_folders(args.val_images, args.val_masks) if args.val_images else None
    train = SegmentationFolder(train_pairs, num_classes, reduce_zero_label=reduce, transform=train_tf)
    val = SegmentationFolder(val_pairs, num_classes, reduce_zero_label=reduce,
                             transform=SegEvalTransform()) if val_pairs else None
    return train, val, num_classes


def build_model_for(args, cfg: SegmentConfig, num_classes: int):
    """The segmenter: the --finetune checkpoint's architecture (or --model) at the crop size, its backbone
    loaded from --finetune."""
    from .interop.pretrained import classifier_config_from_checkpoint
    from .model.segmentation import SegmentationHeadConfig, build_segmenter
    from .train.segmentation import load_backbone_pretrained, read_backbone_checkpoint

    head = SegmentationHeadConfig(num_classes=num_classes, use_auxiliary_head=not args.no_auxiliary_head)
    if args.finetune:
        ckpt = read_backbone_checkpoint(args.finetune, trust_pickle=args.trust_pickle)
        arch = classifier_config_from_checkpoint(ckpt)
        if args.model:
            log.info("--model %s ignored: the architecture comes from --finetune", args.model)
        model = build_segmenter(arch, num_classes, img_size=cfg.crop_size, head=head, drop_path_rate=cfg.drop_path)
        report = load_backbone_pretrained(model, ckpt, rel_pos_resize=args.rel_pos_resize)
        for note in report["notes"]:
            log.info("--finetune: %s", note)
    else:
        log.warning("no --finetune checkpoint: the backbone starts from random weights")
        model = build_segmenter(args.model or "base", num_classes, img_size=cfg.crop_size, head=head,
                                drop_path_rate=cfg.drop_path)
    return model


def run(args: argparse.Namespace, cfg: SegmentConfig) -> dict:
    import torch

    from .train.segmentation import evaluate_segmentation, segmenter_from_checkpoint, train_segmentation

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_demo(args):
        from .train.segmentation_demo import run_demo
        from .train.engine import demo_cpu_threads

        demo_cpu_threads(device)

        return run_demo(cfg, output_dir=args.output_dir or DEMO_DEFAULTS["output_dir"], device=device,
                        finetune=args.finetune, progress=not args.no_progress,
                        overwrite_output_dir=args.overwrite_output_dir)
    train, val, num_classes = _datasets(args, cfg)
    if args.eval:
        if not args.resume or args.resume == "auto":
            raise SystemExit("error: --eval needs --resume PATH (a segmentation checkpoint)")
        model, _ = segmenter_from_checkpoint(args.resume, trust_pickle=args.trust_pickle)
        if val is None:
            raise SystemExit("error: --eval needs validation data")
        result = evaluate_segmentation(model.to(device), val, device=device, mode=cfg.test_mode, stride=cfg.stride,
                                       img_scale=cfg.img_scale, ratios=cfg.aug_ratios, flip=cfg.flip,
                                       progress=not args.no_progress)
        print(f"mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  aAcc {100 * result['aAcc']:.2f}")
        return result
    model = build_model_for(args, cfg, num_classes)
    result = train_segmentation(model, train, val, cfg, device=device,
                                output_dir=Path(args.output_dir or "runs/beit_segment"),
                                progress=not args.no_progress, trust_pickle=args.trust_pickle,
                                overwrite_output_dir=args.overwrite_output_dir, run_args=vars(args))
    if result["final"] is not None:
        f = result["final"]
        print(f"final: mIoU {100 * f['mIoU']:.2f}  mAcc {100 * f['mAcc']:.2f}  aAcc {100 * f['aAcc']:.2f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    cfg = config_from_args(args)
    from .data.segmentation import SegmentationDataError
    from .utils.checkpoint import CheckpointError
    from .interop.pretrained import PretrainedLoadError

    with cli_logging():
        try:
            return run(args, cfg)
        except (SegmentationDataError, CheckpointError, PretrainedLoadError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
