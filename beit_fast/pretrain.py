"""BEiT pretraining: ``python -m beit_fast.pretrain [flags]``.

With no ``--data_path`` it runs the embedded default: a tiny BEiT on random crops of the photographs that
ship with scikit-image, with a small discrete VAE tokenizer trained first (or reused), on CPU when there
is no GPU, in a few minutes. Flags are named like the official ``run_beit_pretraining.py``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m beit_fast.pretrain ...`` (DDP, or FSDP2 with
``--fsdp``); ``--batch_size`` is per process, the global batch is ``batch_size x world_size x update_freq``
and the lr is not rescaled. SIGTERM / SIGINT stop at the next step boundary with a checkpoint;
``--resume auto`` continues from the newest valid one. See DISTRIBUTED.md.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/pretrain.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.pretrain as _cli
    _cli.main()
    raise SystemExit(0)

# Only the standard library and plain-Python modules at import time: the flags are parsed (and --help
# answered) before torch and the rest of the library are imported, inside the functions that use them.
import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .logs import cli_logging
from .options import DEFAULT_MAX_IMAGE_PIXELS, MODEL_NAMES, HelpFormatter

if TYPE_CHECKING:
    import torch

    from .checkpoint import OutputDirLock
    from .distributed import DistInfo, GracefulStop

log = logging.getLogger("beit_fast.pretrain")

#: Numbered checkpoints kept by default (--keep_last): the newest two, besides checkpoint-last.pt and
#: checkpoint-best.pt.
DEFAULT_KEEP_LAST = 2
#: The demo's photographs are capped at this many times the patch view's side (2: 448 px for 224 px views).
DEMO_PHOTO_SIDE_PER_VIEW = 2
#: Where DALL-E's released tokenizer weights come from (OpenAI's DALL-E release).
DALLE_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"

INTERPOLATIONS = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest")

# Values that differ between the embedded CPU demo (no --data_path) and a real run (official recipe).
# The demo trades image size for steps: 128 px views (an 8x8 patch grid, 26 of 64 patches masked: 40%, as
# in the paper) and 800 steps fit the CPU budget that 256 steps at 224 px took, and learn well past the
# token frequencies (see the unigram baseline in its log).
DEMO_DEFAULTS = dict(
    model="tiny", input_size=128, num_mask_patches=26, min_mask_patches_per_block=4, epochs=25, batch_size=32,
    lr=1.5e-3, warmup_epochs=2, num_samples=1024, tokenizer="dvae", tokenizer_steps=300,
    output_dir="runs/beit_pretrain_demo", save_ckpt_freq=1,
)
OFFICIAL_DEFAULTS = dict(
    model="base", input_size=224, num_mask_patches=75, min_mask_patches_per_block=16, epochs=800, batch_size=128,
    lr=1.5e-3, warmup_epochs=10, num_samples=None, tokenizer="dalle", tokenizer_steps=None,
    output_dir="runs/beit_pretrain", save_ckpt_freq=20,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m beit_fast.pretrain",
        description="BEiT pretraining (masked image modeling with visual tokens). Without --data_path, runs "
        "the embedded CPU-sized demo on scikit-image's sample photographs. Defaults shown as 'demo/real' "
        "differ between the demo and a run with --data_path (the official BEiT-B recipe).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="image folder (searched recursively); omit for the embedded demo")
    g.add_argument("--num_samples", type=int, default=None,
                   help="demo only: samples per epoch drawn from the sample photographs (demo 1024)")
    g.add_argument("--input_size", type=int, default=None, help="image size of the patch view (demo 128 / real 224)")
    g.add_argument("--second_input_size", type=int, default=None,
                   help="image size of the tokenizer view (default: input_size / patch_size * 8: demo 64 / real 112)")
    g.add_argument("--train_interpolation", default="bicubic", choices=INTERPOLATIONS,
                   help="resize filter of the patch view")
    g.add_argument("--second_interpolation", default="lanczos", choices=INTERPOLATIONS,
                   help="resize filter of the tokenizer view")
    g.add_argument("--color_jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter (0: off)")
    g.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise the patch view with ImageNet mean/std instead of 0.5/0.5")
    g.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: min(8, cores))")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pin host memory for faster copies to the GPU (default: on with CUDA)")
    g.add_argument("--data_pipeline", choices=["pil", "gpu"], default="pil",
                   help="pil: DataLoader workers decode, jitter and resize with Pillow; gpu: workers only read "
                   "JPEG bytes, the training device decodes them (nvJPEG on CUDA) and renders both views with "
                   "Pillow's arithmetic (identical pixels with a CPU decoder; runs on CPU tensors too)")
    g.add_argument("--tokenize_in_loader", action="store_true",
                   help="with --data_pipeline gpu: compute the visual tokens in the input pipeline's prefetch "
                   "thread (a side CUDA stream, overlapping the previous step) instead of in the step")
    g.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images with more pixels (width x height, read from the file header before decoding) "
                   "are skipped and counted, like unreadable ones: a guard against decompression bombs")

    g = p.add_argument_group("masking")
    g.add_argument("--num_mask_patches", type=int, default=None,
                   help="patches to mask per image, about 40%% (demo 26 of 64 / real 75 of 196)")
    g.add_argument("--min_mask_patches_per_block", type=int, default=None, help="smallest masked block (demo 4 / real 16)")
    g.add_argument("--max_mask_patches_per_block", type=int, default=None, help="largest block (default: num_mask_patches)")
    g.add_argument("--fixed_mask_count", action=argparse.BooleanOptionalAction, default=False,
                   help="top every mask up to exactly num_mask_patches (static shapes); off = official algorithm")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["dalle", "dvae"], default=None,
                   help="visual tokenizer: DALL-E's released encoder or our discrete VAE (demo dvae / real dalle)")
    g.add_argument("--discrete_vae_weight_path", default=None,
                   help=f"tokenizer weights: DALL-E's encoder.pkl ({DALLE_ENCODER_URL}, or a state dict of its "
                   "layout), or a dVAE checkpoint from python -m beit_fast.train_tokenizer; demo: trained first "
                   "if missing")
    g.add_argument("--tokenizer_steps", type=int, default=None,
                   help="demo only: steps to train the demo dVAE when no checkpoint is given (demo 300)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=MODEL_NAMES, help="model size (demo tiny / real base)")
    g.add_argument("--vocab_size", type=int, default=None, help="visual vocabulary (default: the tokenizer's)")
    g.add_argument("--patch_size", type=int, default=16, help="patch size in pixels")
    g.add_argument("--rel_pos_bias", action=argparse.BooleanOptionalAction, default=True,
                   help="one relative position bias table shared by all blocks")
    g.add_argument("--abs_pos_emb", action=argparse.BooleanOptionalAction, default=False,
                   help="absolute position embedding")
    g.add_argument("--layer_scale_init_value", type=float, default=None,
                   help="LayerScale init (default: the model's, 0.1 base / 1e-5 large); 0 disables")
    g.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (default: the model's)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (demo 25 / real 800)")
    g.add_argument("--batch_size", type=int, default=None,
                   help="batch size per process and micro-batch (demo 32 / real 128); the global batch is "
                   "batch_size x processes x update_freq")
    g.add_argument("--update_freq", type=int, default=1,
                   help="gradient accumulation: micro-batches per optimizer step (the lr is not rescaled)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, not scaled by batch size (1.5e-3)")
    g.add_argument("--min_lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    g.add_argument("--warmup_lr", type=float, default=0.0, help="learning rate at the start of the warmup")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear warmup epochs (demo 2 / real 10)")
    g.add_argument("--warmup_steps", type=int, default=-1, help="warmup steps; overrides --warmup_epochs if > 0")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--weight_decay_end", type=float, default=None,
                   help="final weight decay of a cosine wd schedule (default: constant)")
    g.add_argument("--decay_mask_and_bias_table", action=argparse.BooleanOptionalAction, default=True,
                   help="weight-decay mask_token and the relative position bias table (official: yes; timm: no)")
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--opt_eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip_grad", type=float, default=3.0, help="gradient norm clip (0: off)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="mixed precision: auto = bf16 on CUDA when supported, else fp16 with a loss scaler; none on CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--fast", choices=["auto", "on", "off"], default="auto",
                   help="fast training step (fused kernels, fused attention, static shapes, torch.compile): "
                   "auto = on with CUDA, off (the eager reference step) on CPU")
    g.add_argument("--attn_backend", default="auto",
                   choices=["auto", "reference", "math", "sdpa", "flex", "xformers", "triton"],
                   help="attention with the relative position bias in the fast step (math: the eager reference; "
                   "'reference' is a deprecated alias of math)")
    g.add_argument("--kernel_backend", default="auto", choices=["auto", "triton", "reference"],
                   help="fused patch-embedding and linear-cross-entropy ops in the fast step")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the fast step's forward and backward")
    g.add_argument("--compile_mode", default="default",
                   choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
                   help="torch.compile mode of the fast step: max-autotune-no-cudagraphs autotunes the GEMMs and "
                   "their bias/GELU epilogues (slower first step), reduce-overhead adds CUDA graphs")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 GEMMs (torchao float8 training, tensorwise scaling) for the blocks' QKV and MLP linears "
                   "in the fast step; needs a CUDA GPU of compute capability >= 8.9 (H100/H200) and torchao "
                   "(pip install 'beit_fast[fp8]')")
    g.add_argument("--tokenizer_precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="tokenizer forward precision (channels-last): auto tries fp16 then bf16 on CUDA and keeps "
                   "the first whose token ids agree with fp32 on >= 99%% of the first batch's positions, else fp32; "
                   "fp16/bf16 force that precision (agreement still logged)")
    g.add_argument("--activation_checkpointing", default="none",
                   help="recompute blocks in backward to save memory: none, all, or k (every k-th block)")

    g = p.add_argument_group("distributed (launch with torchrun; see DISTRIBUTED.md)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 (fully_shard per block + "
                   "root) instead of replicating them with DDP; for models that do not fit one device")

    g = p.add_argument_group("safety")
    g.add_argument("--max_bad_steps", type=int, default=3,
                   help="stop (with a checkpoint) after this many consecutive non-finite losses")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="checkpoints and logs (demo runs/beit_pretrain_demo)")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentation and masks")
    g.add_argument("--resume", default="",
                   help="checkpoint to resume from, or 'auto': output_dir's newest checkpoint that loads (an "
                   "unloadable one is skipped with a warning), or a fresh start if there is none")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a fresh run in an --output_dir that holds another run's checkpoints: they and its "
                   "log.jsonl are deleted first (without this flag such a run is refused; see --resume auto)")
    g.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow --resume checkpoints that pickle Python objects beyond tensors and plain values "
                   "(old or foreign files): they are read with Python's full unpickler, which can run arbitrary "
                   "code stored in the file; only for files you trust")
    g.add_argument("--save_ckpt_freq", type=int, default=None, help="save a numbered checkpoint every N epochs")
    g.add_argument("--keep_last", type=int, default=DEFAULT_KEEP_LAST,
                   help="keep only the K newest numbered checkpoints (default: %(default)s; 0: keep all); "
                   "checkpoint-last.pt and checkpoint-best.pt (lowest epoch-average loss) are always kept")
    g.add_argument("--save_ckpt_steps", type=int, default=0,
                   help="also refresh checkpoint-last.pt every N steps (0: only at epoch ends)")
    g.add_argument("--log_freq", type=int, default=10, help="write a log line every N steps")
    g.add_argument("--log_dir", default=None,
                   help="also write the logged scalars (loss, MIM accuracy, unigram baseline, lr, ...) as TensorBoard "
                   "events to this folder (needs the tensorboard package); the JSON lines go to output_dir/log.jsonl "
                   "either way")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this many global steps with a checkpoint, as if interrupted (for testing resume)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _path_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the paths the user typed: reported first, before anything that depends on them."""
    errors = []
    if args.data_path is not None:
        if not os.path.exists(args.data_path):
            errors.append(f"--data_path {args.data_path}: image folder not found")
        elif not os.path.isdir(args.data_path):
            errors.append(f"--data_path {args.data_path} is not a folder")
    if args.discrete_vae_weight_path and not os.path.isfile(args.discrete_vae_weight_path):
        errors.append(f"--discrete_vae_weight_path {args.discrete_vae_weight_path}: tokenizer weights not found")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        errors.append(f"--resume checkpoint not found: {args.resume}")
    if args.output_dir is not None and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        errors.append(f"--output_dir {args.output_dir} exists and is not a folder")
    if args.log_dir is not None and os.path.exists(args.log_dir) and not os.path.isdir(args.log_dir):
        errors.append(f"--log_dir {args.log_dir} exists and is not a folder")
    return errors


def _errors_of(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags that can be seen without touching devices: the paths first."""
    errors = _path_errors(args)
    for name in ("epochs", "batch_size", "input_size", "patch_size", "save_ckpt_freq", "log_freq",
                 "min_mask_patches_per_block", "max_bad_steps", "update_freq"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("num_samples", "tokenizer_steps", "max_mask_patches_per_block", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            errors.append(f"--{name} must be positive, got {value}")
    for name in ("warmup_epochs", "save_ckpt_steps", "stop_after_steps", "keep_last", "seed"):
        if getattr(args, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.num_workers is not None and args.num_workers < 0:
        errors.append(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.warmup_steps < -1:
        errors.append(f"--warmup_steps must be a step count, or -1 to use --warmup_epochs; got {args.warmup_steps}")
    floats = {name: getattr(args, name) for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "weight_decay_end",
                                                     "opt_eps", "clip_grad", "color_jitter", "drop_path",
                                                     "layer_scale_init_value")}
    floats["opt_betas"] = None
    for name, value in floats.items():
        values = args.opt_betas if name == "opt_betas" else [value]
        if any(v is not None and not math.isfinite(v) for v in values):
            errors.append(f"--{name} must be a finite number, got {' '.join(map(str, values))}")
        elif name not in ("opt_betas", "drop_path", "opt_eps") and value is not None and value < 0:
            errors.append(f"--{name} must be >= 0, got {value}")
    if all(math.isfinite(b) for b in args.opt_betas) and not all(0 <= b < 1 for b in args.opt_betas):
        errors.append(f"--opt_betas must both be in [0, 1), got {args.opt_betas[0]} {args.opt_betas[1]}")
    if math.isfinite(args.opt_eps) and args.opt_eps <= 0:
        errors.append(f"--opt_eps must be positive, got {args.opt_eps}")
    if args.drop_path is not None and math.isfinite(args.drop_path) and not 0 <= args.drop_path < 1:
        errors.append(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if args.input_size > 0 and args.patch_size > 0:
        if args.input_size % args.patch_size:
            errors.append(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
        grid = args.input_size // args.patch_size
        if grid >= 1 and not 1 <= args.num_mask_patches <= grid * grid:
            errors.append(f"--num_mask_patches must be in [1, {grid * grid}] for a {grid}x{grid} patch grid, "
                          f"got {args.num_mask_patches}")
        if grid >= 1 and args.second_input_size is None:
            args.second_input_size = grid * 8
        elif grid >= 1 and args.second_input_size != grid * 8:
            errors.append(f"--second_input_size {args.second_input_size} gives a {args.second_input_size // 8}x"
                          f"{args.second_input_size // 8} token grid, but the patch grid is {grid}x{grid}: use "
                          f"{grid * 8}")
    if args.tokenizer == "dalle" and not args.discrete_vae_weight_path:
        errors.append(f"--tokenizer dalle needs --discrete_vae_weight_path pointing at DALL-E's encoder.pkl, the "
                      f"tokenizer of OpenAI's DALL-E release ({DALLE_ENCODER_URL}; download it once). No download "
                      "needed: train our dVAE on your images, python -m beit_fast.train_tokenizer --data_path DIR "
                      "--output dvae.pt, then pass --tokenizer dvae --discrete_vae_weight_path dvae.pt")
    if args.tokenizer == "dvae" and args.data_path is not None and not args.discrete_vae_weight_path:
        errors.append("--tokenizer dvae with --data_path needs --discrete_vae_weight_path: train one on your images "
                      "with python -m beit_fast.train_tokenizer --data_path DIR --output dvae.pt")
    if args.data_path is not None and args.num_samples is not None:
        errors.append("--num_samples only applies to the embedded demo (no --data_path)")
    if args.activation_checkpointing not in ("none", "all"):
        try:
            if int(args.activation_checkpointing) < 1:
                raise ValueError
        except ValueError:
            errors.append(f"--activation_checkpointing must be none, all or a positive integer, "
                          f"got {args.activation_checkpointing!r}")
    if args.data_pipeline == "gpu":
        from .pipeline import device_pipeline_problems

        errors += device_pipeline_problems(args.train_interpolation, args.second_interpolation)
    if args.tokenize_in_loader and args.data_pipeline != "gpu":
        errors.append("--tokenize_in_loader needs --data_pipeline gpu")
    if args.fsdp and args.amp == "fp16":
        errors.append("--fsdp does not support --amp fp16 (loss scaling of sharded gradients); use --amp bf16")
    if args.fp8 and args.fast == "off":
        errors.append("--fp8 needs the fast step; drop --fast off")
    if args.fp8 and args.fsdp:
        errors.append("--fp8 is not supported with --fsdp; use DDP (torchrun without --fsdp) or one GPU")
    errors += _overflow_errors(args)
    if args.max_image_pixels <= 0:
        errors.append(f"--max_image_pixels must be positive, got {args.max_image_pixels}")
    if args.resume and args.overwrite_output_dir:
        errors.append("--resume continues the run in --output_dir, --overwrite_output_dir deletes it: choose one")
    return errors


def _overflow_errors(args: argparse.Namespace) -> list[str]:
    """Learning rates whose first AdamW step, ``lr / (1 - beta1)``, does not fit in float32 (torch then
    fails deep in the optimizer: "value cannot be converted to type float without overflow")."""
    import torch

    from .optim import adamw_first_step

    f32_max = float(torch.finfo(torch.float32).max)
    beta1 = args.opt_betas[0]
    betas_ok = all(math.isfinite(b) and 0 <= b < 1 for b in args.opt_betas)
    errors = []
    for name in ("lr", "min_lr", "warmup_lr"):
        value = getattr(args, name)
        if value is None or not math.isfinite(value) or value < 0:
            continue  # reported above
        step = adamw_first_step(value, beta1) if betas_ok else value
        if step > f32_max:
            errors.append(f"--{name} {value:g} is too large: AdamW's first step size {name} / (1 - beta1) = "
                          f"{step:.3g} overflows float32 (max {f32_max:.3g})")
    return errors


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags whose default depends on demo vs real run, and validate everything."""
    defaults = DEMO_DEFAULTS if args.data_path is None else OFFICIAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.save_ckpt_freq is None:
        args.save_ckpt_freq = defaults["save_ckpt_freq"]
    errors = _errors_of(args)
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    return args


def build_tokenizer_for_run(args: argparse.Namespace, device: torch.device):
    """The frozen visual tokenizer of this run, on ``device`` in eval mode."""
    from .tokenizer import build_tokenizer

    path = args.discrete_vae_weight_path
    if path is None:  # demo: train a small dVAE once, reuse it afterwards
        path = str(Path(args.output_dir) / "tokenizer.pt")
        if not os.path.isfile(path):
            from .tokenizer_training import train_tokenizer

            log.info("training the demo dVAE tokenizer (%d steps) -> %s", args.tokenizer_steps, path)
            metrics = train_tokenizer(path, preset="tiny", steps=args.tokenizer_steps,
                                      input_size=args.second_input_size, seed=args.seed, device=str(device),
                                      progress=not args.no_progress)
            log.info("demo tokenizer: held-out reconstruction MSE %.4f (untrained %.4f, each crop's mean colour "
                     "%.4f), %d of %d codes used", metrics["recon_mse"], metrics["initial"]["recon_mse"],
                     metrics["mean_color_mse"], metrics["codes_used"], metrics["vocab_size"])
        else:
            log.info("reusing the demo dVAE tokenizer %s", path)
        args.discrete_vae_weight_path = path
    try:
        tokenizer = build_tokenizer(args.tokenizer, path)
    except Exception as e:  # corrupt file, another tokenizer's weights, ...
        raise SystemExit(f"error: cannot load the {args.tokenizer} tokenizer from {path}: "
                         f"{type(e).__name__}: {e}") from None
    return tokenizer.to(device).eval().requires_grad_(False)


def _rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _data_error(e: BaseException) -> SystemExit | None:
    """A clear SystemExit for a data set that yields no readable image (raised in a worker or here)."""
    for line in str(e).splitlines()[::-1]:
        if "could not be read" in line:
            return SystemExit("error: " + line.strip().removeprefix("RuntimeError: "))
    return None


_WORKERS_GONE = object()


def _next_batch(it, stopper: GracefulStop, world_size: int = 1):
    """The next micro-batch; None at the end of the epoch; ``_WORKERS_GONE`` when a stop was requested and
    the data workers were killed as well (signalled one by one), so the run stops at the last step."""
    try:
        return next(it)
    except StopIteration:
        return None
    except RuntimeError as e:
        err = _data_error(e)
        if err is not None:
            raise err from None
        if stopper.requested is not None and world_size == 1:  # (several ranks must stop together: no)
            log.warning("the data workers are gone (%s); stopping at the last finished step", str(e).splitlines()[0])
            return _WORKERS_GONE
        raise


def _shutdown_workers(loader) -> None:
    """Stop the loader's persistent workers now, not whenever the loader is collected (after an error its
    traceback keeps it alive, and the workers would linger in an in-process caller)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _check_fast_backends(args: argparse.Namespace, device: torch.device) -> None:
    from .ops.attention import available_attention_backends
    from .ops.backend import triton_available, triton_interpreting

    if args.attn_backend not in ("auto", "reference") and args.attn_backend not in available_attention_backends(device):
        raise SystemExit(f"error: --attn_backend {args.attn_backend} cannot run on {device.type}; available there: "
                         f"{', '.join(['auto'] + available_attention_backends(device))}")
    if args.kernel_backend == "triton":
        if not triton_available():
            raise SystemExit("error: --kernel_backend triton but Triton (or the beit_fast kernels) cannot be imported")
        if device.type != "cuda" and not triton_interpreting():
            raise SystemExit("error: --kernel_backend triton needs a CUDA device (on CPU only under "
                             "TRITON_INTERPRET=1); use --kernel_backend auto or reference")


def main(argv: list[str] | None = None) -> dict:
    """Run pretraining with command-line flags ``argv`` (default ``sys.argv[1:]``); returns a summary."""
    args = resolve_defaults(get_args_parser().parse_args(argv))
    from .distributed import cleanup_distributed, init_distributed

    with cli_logging():
        dist_info, device = init_distributed(args.device)
        lock = None
        try:
            lock = _claim_output_dir(args, dist_info)
            return _train(args, dist_info, device)
        finally:
            if lock is not None:
                lock.release()
            cleanup_distributed(dist_info)


def _claim_output_dir(args: argparse.Namespace, dist_info: DistInfo) -> OutputDirLock | None:
    """Rank 0 creates and locks --output_dir (a second run on it is refused, naming the live one; a lock
    left by a killed run is taken over), clears temporary files of interrupted saves, and refuses a fresh
    run into a folder holding another run's checkpoints (unless --overwrite_output_dir, which deletes them).
    Every rank raises the same SystemExit on failure. Returns the held lock (rank 0) or None."""
    from .checkpoint import CheckpointError, OutputDirLock, remove_stale_temp_files
    from .distributed import broadcast_object

    out = Path(args.output_dir)
    lock, error = None, None
    if dist_info.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            error = f"error: --output_dir {out} is not writable: {e}"
        if error is None:
            lock = OutputDirLock(out)
            try:
                stale = lock.acquire()
                if stale:
                    log.warning("took over a stale lock on %s, left by a run that is no longer running (%s)",
                                out, stale)
            except CheckpointError as e:
                lock, error = None, f"error: {e}"
        if error is None:
            for path in remove_stale_temp_files(out):
                log.warning("removed %s, left by a save that was interrupted", path.name)
            error = _fresh_run_error(args, out)
        if error is not None and lock is not None:
            lock.release()
            lock = None
    error = broadcast_object(error, dist_info)
    if error:
        raise SystemExit(error)
    return lock


def _fresh_run_error(args: argparse.Namespace, out: Path) -> str | None:
    """A fresh run (no --resume) into a folder that holds another run's checkpoints is refused: it would
    overwrite that run's checkpoint-best.pt and log and mix numbered checkpoints of both runs."""
    from .checkpoint import existing_checkpoints, list_checkpoints, load_checkpoint, remove_run_outputs

    found = existing_checkpoints(out)
    if args.resume or not found:
        return None
    if args.overwrite_output_dir:
        for path in remove_run_outputs(out):
            log.warning("--overwrite_output_dir: deleted %s of the previous run", path.name)
        return None
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    what = f"{len(found)} checkpoint files ({names})"
    newest = list_checkpoints(out)
    if newest:
        try:  # the pickle only (tensors stay on disk): cheap even for large checkpoints
            state = load_checkpoint(newest[0], verify=False, mmap=True)
            epochs = (state.get("args") or {}).get("epochs")
            done = epochs is not None and int(state.get("epoch", -1)) >= int(epochs)
            what += (f"; {newest[0].name} is at step {state.get('step')}, epoch {state.get('epoch')} of {epochs}: "
                     f"{'the run is complete' if done else 'the run is unfinished'}")
        except Exception:  # noqa: BLE001 - only for the message
            pass
    return (f"error: --output_dir {out} holds another run's checkpoints: {what}. Continue that run with "
            "--resume auto (a finished run says so and stops), or pass --overwrite_output_dir to delete its "
            "checkpoints and log.jsonl and start over, or choose another --output_dir")


def _train(args: argparse.Namespace, dist_info: DistInfo, device: torch.device) -> dict:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointSaveError, Checkpointer, trim_jsonl
    from .data import ImageFolderDataset, PretrainDataset, ResumableSampler
    from .distributed import (GracefulStop, all_gather_object, any_rank, apply_fsdp, barrier, broadcast_object,
                              isolate_worker_from_signals)
    from .engine import FastPretrainEngine, MIMLoss, PretrainEngine, resolve_amp_dtype
    from .masking import MaskingGenerator
    from .model import build_model, get_config
    from .optim import build_optimizer, cosine_scheduler
    from .pipeline import build_loader_for
    from .rng import rng_state, seed_everything, set_rng_state
    from .sample_data import SampleImages
    from .transforms import TwoViewConfig, TwoViewTransform

    is_main, rank, world = dist_info.is_main, dist_info.rank, dist_info.world_size
    if not is_main:  # one rank speaks
        logging.getLogger("beit_fast").setLevel(logging.WARNING)
    if args.fsdp and not dist_info.active:
        raise SystemExit("error: --fsdp needs a distributed launch: torchrun --nproc_per_node=N -m beit_fast.pretrain ...")
    try:
        amp_dtype = resolve_amp_dtype(args.amp, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.fp8:  # before any work: the device decides
        from .fp8 import fp8_unavailable_reason

        on_fast = args.fast == "on" or (args.fast == "auto" and device.type == "cuda")
        why = fp8_unavailable_reason(device) if on_fast else "it needs the fast step, which --fast auto uses only on CUDA"
        if why is not None:
            raise SystemExit(f"error: --fp8: {why}")
    out = Path(args.output_dir)  # created and locked by _claim_output_dir
    args.world_size = world
    args.global_batch_size = args.batch_size * world * args.update_freq

    # data -> masking/tokenizer -> model -> loss -> loop
    seed_everything(args.seed)
    grid = args.input_size // args.patch_size
    if args.data_path is None:
        # Photographs capped at twice the patch view's side: the colour jitter runs on the whole photograph
        # (official order), and on the 1411 px retina it would cost more than the model's step.
        images = SampleImages(num_samples=args.num_samples, max_side=DEMO_PHOTO_SIDE_PER_VIEW * args.input_size)
    else:
        try:
            images = ImageFolderDataset(args.data_path, max_image_pixels=args.max_image_pixels)
        except (FileNotFoundError, NotADirectoryError, ValueError, PermissionError) as e:
            raise SystemExit(f"error: {e}") from None
    transform = TwoViewTransform(TwoViewConfig(
        input_size=args.input_size, second_input_size=args.second_input_size,
        interpolation=args.train_interpolation, second_interpolation=args.second_interpolation,
        color_jitter=args.color_jitter, imagenet_default_mean_and_std=args.imagenet_default_mean_and_std,
    ))
    masking = MaskingGenerator(
        (grid, grid), args.num_mask_patches, min_num_patches=args.min_mask_patches_per_block,
        max_num_patches=args.max_mask_patches_per_block, fixed_count=args.fixed_mask_count,
    )
    if not any(masking(np.random.default_rng([args.seed, 2**31, i])).any() for i in range(32)):
        raise SystemExit(f"error: these mask settings mask no patch of a {grid}x{grid} grid ({masking}); use "
                         "--fixed_mask_count, or lower --min_mask_patches_per_block, or a larger patch grid")
    dataset = PretrainDataset(images, transform, masking, seed=args.seed)
    # DistributedSampler's partition: rank r takes perm[r::world]. The ranks' batches of step t together
    # are perm[t*B : (t+1)*B] with B the global batch, i.e. the batch of step t of a one-process run with
    # batch B (same samples, other order): see DISTRIBUTED.md.
    sampler = ResumableSampler(len(dataset), seed=args.seed, shuffle=True, rank=rank, world_size=world,
                               drop_last=False)
    micro_per_step = args.batch_size * args.update_freq
    steps_per_epoch = sampler.num_samples // micro_per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images give {sampler.num_samples} per process, fewer than one "
                         f"step of --batch_size {args.batch_size} x --update_freq {args.update_freq}"
                         + (f" on each of {world} processes" if world > 1 else ""))
    total_steps = steps_per_epoch * args.epochs
    if total_steps > 2**31:
        raise SystemExit(f"error: {total_steps} steps ({args.epochs} epochs of {steps_per_epoch}) is not a plausible run")
    num_workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    pin = args.pin_mem if args.pin_mem is not None else device.type == "cuda"
    loader = build_loader_for(args.data_pipeline, dataset, args.batch_size, device, num_workers=num_workers,
                              sampler=sampler, pin_memory=pin, drop_last=True, persistent_workers=num_workers > 0)
    loader.worker_init_fn = isolate_worker_from_signals  # group signals reach only the main process
    # Each new iterator draws its base seed from this generator, not the global RNG, so that a run resumed
    # mid-epoch consumes the global RNG (drop path) exactly like the uninterrupted run.
    loader.generator = torch.Generator().manual_seed(args.seed)

    demo_tokenizer = args.discrete_vae_weight_path is None
    if demo_tokenizer and not is_main:
        barrier(dist_info)  # rank 0 trains (or finds) the demo tokenizer first
    tokenizer = build_tokenizer_for_run(args, device)
    if demo_tokenizer and is_main:
        barrier(dist_info)
    if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"error: --vocab_size {args.vocab_size} does not match the tokenizer's vocabulary "
                         f"of {tokenizer.vocab_size}")
    token_grid = tuple(tokenizer.token_grid(args.second_input_size))
    if token_grid != (grid, grid):
        raise SystemExit(f"error: the tokenizer ({args.discrete_vae_weight_path}) makes a {token_grid[0]}x"
                         f"{token_grid[1]} token grid from the {args.second_input_size}px view, but the patch grid "
                         f"is {grid}x{grid}")
    overrides = dict(img_size=args.input_size, patch_size=args.patch_size, vocab_size=tokenizer.vocab_size,
                     use_shared_rel_pos_bias=args.rel_pos_bias, use_abs_pos_emb=args.abs_pos_emb)
    if args.layer_scale_init_value is not None:
        overrides["init_values"] = args.layer_scale_init_value
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path
    try:
        cfg = get_config(args.model, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seed_everything(args.seed)  # the same initial weights on every rank, whatever ran before
    model = build_model(cfg).to(device)
    # Training randomness (drop path) differs across ranks, as in the official code (seed + rank).
    seed_everything(args.seed + rank)

    fast = args.fast == "on" or (args.fast == "auto" and device.type == "cuda")
    if fast:
        _check_fast_backends(args, device)
        ckpt_mode = args.activation_checkpointing
        model.configure_fast_path(attention=args.attn_backend, fused_embed=args.kernel_backend,
                                  activation_checkpointing=ckpt_mode if ckpt_mode in ("none", "all") else int(ckpt_mode))
    loss_module = MIMLoss(model, num_masked=args.num_mask_patches if fast else None, amp_dtype=amp_dtype,
                          ops_backend=args.kernel_backend if fast else None)
    parallel = "fsdp" if args.fsdp else ("ddp" if dist_info.active and world > 1 else "none")
    if parallel == "fsdp":
        apply_fsdp(loss_module, model.blocks)  # before the optimizer: parameters become sharded DTensors

    optimizer = build_optimizer(model, args.lr, args.weight_decay, tuple(args.opt_betas), args.opt_eps,
                                args.decay_mask_and_bias_table)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                   args.warmup_lr, args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    engine_args = (model, tokenizer, optimizer, device, lr_schedule, wd_schedule)
    engine_kwargs = dict(amp_dtype=amp_dtype, clip_grad=args.clip_grad or None, loss_module=loss_module,
                         parallel=parallel, dist_info=dist_info)
    if fast:
        engine = FastPretrainEngine(*engine_args, **engine_kwargs, num_masked=args.num_mask_patches,
                                    compile=args.compile, ops_backend=args.kernel_backend, fp8=args.fp8,
                                    compile_mode=None if args.compile_mode == "default" else args.compile_mode)
    else:
        engine = PretrainEngine(*engine_args, **engine_kwargs)
    ckpt = Checkpointer(args.output_dir, keep_last=args.keep_last)
    if args.tokenizer_precision in ("fp16", "bf16") or (args.tokenizer_precision == "auto" and device.type == "cuda"):
        try:
            probe = torch.stack([dataset.get(i, epoch=0)[1] for i in range(min(args.batch_size, len(dataset)))])
        except RuntimeError as e:
            err = _data_error(e)
            if err is None:
                raise
            raise err from None
        forced = args.tokenizer_precision != "auto"
        candidates = [args.tokenizer_precision] if forced else ["fp16", "bf16"]
        for name in candidates:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
            agreement = engine.choose_tokenizer_precision(probe, dtype, min_agreement=0.0 if forced else 0.99)
            log.info("tokenizer in %s agrees with fp32 on %.2f%% of token positions", name, 100 * agreement)
            if engine.tokenizer_dtype is not None:
                break
        log.info("tokenizer runs in %s", engine.tokenizer_dtype or torch.float32)
    if args.tokenize_in_loader:
        loader.set_tokenizer(tokenizer, engine.tokenizer_dtype)

    step = 0
    best_loss, best_epoch = math.inf, None
    epoch_loss_sum, epoch_loss_count = 0.0, 0
    if args.resume:
        state = _resume_state(args, dist_info)
        if state is not None:
            restore_error = None
            if is_main and state["_restore_copies"]:
                try:
                    ckpt.restore_copies(state, state["_path"])
                except CheckpointSaveError as e:
                    restore_error = f"error: {e}"
            restore_error = broadcast_object(restore_error, dist_info)
            if restore_error:
                raise SystemExit(restore_error)
            if state.get("model_config") != cfg.to_dict():
                raise SystemExit(f"error: checkpoint {state['_path']} was written for another model config: "
                                 f"{_config_difference(state.get('model_config'), cfg.to_dict())}")
            _warn_if_trajectory_changes(state, args)
            try:
                engine.load_model_state_dict(state["model"])
                engine.load_state_dict(state)
            except (RuntimeError, ValueError, KeyError) as e:
                raise SystemExit(f"error: checkpoint {state['_path']} does not fit this run: {e}") from None
            step = int(state["step"])
            per_rank = state.get("rng_per_rank")
            if per_rank is not None and len(per_rank) == world:
                set_rng_state(per_rank[rank])
            elif world == 1 and state.get("rng") is not None:
                set_rng_state(state["rng"])
            else:
                log.warning("the checkpoint holds RNG states of another number of processes: reseeding "
                            "(drop path will not follow the original run)")
                seed_everything(args.seed + rank + 7919 * step)
            best_loss = float(state.get("best_loss", math.inf))
            best_epoch = state.get("best_epoch")
            epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
            epoch_loss_count = int(state.get("epoch_loss_count", 0))
            log.info("resumed from %s at step %d (epoch %d)", state["_path"], step, step // steps_per_epoch)
            if step >= total_steps:
                log.info("the run in %s is complete (step %d of %d, %d epochs): nothing to train. Give more --epochs "
                         "to continue it, or --overwrite_output_dir to start over", args.output_dir, step,
                         total_steps, args.epochs)
            del state
        if is_main:
            trim_jsonl(out / "log.jsonl", "step", step)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, vocab %d, device %s, amp %s, step %s, %s", args.model, n_params / 1e6,
             cfg.vocab_size, device, engine.amp_dtype,
        "fast" if fast else "eager reference", {"none": "1 process", "ddp": f"DDP x {world}",
                                                "fsdp": f"FSDP2 x {world}"}[parallel])
    log.info("data: %s, %d samples, %d steps/epoch x %d epochs = %d steps of %d images (%d per process x %d "
             "micro-batches x %d processes); %s; --data_pipeline %s", type(images).__name__, len(dataset),
             steps_per_epoch, args.epochs, total_steps, args.global_batch_size, args.batch_size, args.update_freq,
             world, masking, args.data_pipeline)
    if is_main:
        with open(out / "args.json", "w") as f:
            json.dump(vars(args), f, indent=1, default=str)

    def checkpoint_state() -> dict | None:
        """Collective (every rank calls it at the same point); the state on rank 0, None elsewhere."""
        model_state = engine.model_state_dict()
        engine_state = engine.state_dict()
        rngs = all_gather_object(rng_state(), dist_info)
        if not is_main:
            return None
        return {"model": model_state, **engine_state, "step": step, "epoch": step // steps_per_epoch,
                "model_config": cfg.to_dict(), "args": vars(args), "rng": rngs[0], "rng_per_rank": rngs,
                "world_size": world, "best_loss": best_loss, "best_epoch": best_epoch,
                "epoch_loss_sum": epoch_loss_sum, "epoch_loss_count": epoch_loss_count,
                "tokenizer": {"kind": args.tokenizer, "path": args.discrete_vae_weight_path}}

    def save(numbered: str | None = None, best: bool = False) -> None:
        state = checkpoint_state()
        error = None
        if is_main:
            try:
                ckpt.save(state, numbered, best)
            except CheckpointSaveError as e:  # disk full, permissions: stop cleanly, the last good file stays
                error = (f"error: {e}. The run stopped at step {step}; make room (or fix the permissions) and "
                         "continue with --resume auto")
        error = broadcast_object(error, dist_info)
        if error:
            raise SystemExit(error)

    log_file = open(out / "log.jsonl", "a") if is_main else None
    tensorboard = None
    if is_main and args.log_dir:
        from .logs import TensorBoardMissing, TensorBoardWriter

        try:
            tensorboard = TensorBoardWriter(args.log_dir, purge_step=step + 1 if step else None)
        except TensorBoardMissing as e:
            log_file.close()
            raise SystemExit(f"error: {e}") from None
    bad_steps = 0
    history: list[dict] = []
    epoch_losses: list[float] = []
    start_time = time.time()
    stop_reason: str | None = None
    stopper = GracefulStop().install()
    try:
        while step < total_steps and stop_reason is None:
            epoch, start_in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            sampler.set_start(start_in_epoch * micro_per_step)
            window: list = []
            steps_since_log = 0
            bar = tqdm(total=steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=args.no_progress or not is_main, dynamic_ncols=True, leave=False)
            t0 = time.time()
            it = iter(loader)
            while True:
                micro = []
                for _ in range(args.update_freq):
                    batch = _next_batch(it, stopper, world)
                    if batch is None or batch is _WORKERS_GONE:
                        break
                    micro.append(batch)
                if batch is _WORKERS_GONE:
                    stop_reason = f"{stopper.signal_name}, data workers gone"
                    break
                if len(micro) < args.update_freq:  # cannot happen with steps_per_epoch as computed
                    break
                result = engine.train_accumulated(micro, step)
                step += 1
                steps_since_log += 1
                bar.update(1)
                if result.skipped:
                    bad_steps += 1
                    log.warning("step %d: non-finite loss %s or gradient norm %s, update skipped (%d in a row)",
                                step, result.loss, result.grad_norm, bad_steps)
                    if bad_steps >= args.max_bad_steps:
                        save()
                        raise SystemExit(f"error: {bad_steps} consecutive non-finite losses at step {step}; "
                                         f"state saved to {ckpt.last}. Lower --lr, use --amp bf16/none, or check "
                                         "that the masks mask patches.")
                else:
                    bad_steps = 0
                    window.append(result)
                    epoch_loss_sum += result.loss
                    epoch_loss_count += 1
                    bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.mlm_acc:.3f}", lr=f"{result.lr:.2e}")
                    if is_main and (step % args.log_freq == 0 or step == total_steps):
                        elapsed = time.time() - t0
                        record = {"step": step, "epoch": epoch,
                                  **{k: v for k, v in asdict(result).items() if k != "skipped"},
                                  "images_per_s": steps_since_log * args.global_batch_size / max(elapsed, 1e-9),
                                  "step_time_s": elapsed / steps_since_log,
                                  "skipped_images": loader.skipped.num_skipped}
                        record["loss"] = float(np.mean([r.loss for r in window]))
                        record["mlm_acc"] = float(np.mean([r.mlm_acc for r in window]))
                        record["unigram_entropy"], record["unigram_acc"] = engine.unigram_baseline() or (None, None)
                        rss = _rss_mb()
                        if rss is not None:
                            record["rss_mb"] = rss
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        if tensorboard is not None:
                            tensorboard.add_scalars(record, step)
                        history.append(record)
                        window, t0, steps_since_log = [], time.time(), 0
                # Every rank must stop at the same step: a signal seen by any rank stops all of them.
                if any_rank(stopper.requested is not None, dist_info, device):
                    stop_reason = stopper.signal_name or "a signal on another rank"
                elif args.stop_after_steps and step >= args.stop_after_steps:
                    stop_reason = f"--stop_after_steps {args.stop_after_steps}"
                if stop_reason is not None or step % steps_per_epoch == 0:
                    break
                if args.save_ckpt_steps and step % args.save_ckpt_steps == 0:
                    save()
            bar.close()
            del it
            if not (step > epoch * steps_per_epoch and step % steps_per_epoch == 0):  # stopped mid-epoch
                if stop_reason is None:
                    raise RuntimeError(f"the data loader ended epoch {epoch} early, at step {step}")
                save()
                log.info("stopped after step %d (%s); continue with --resume auto (or --resume %s)",
                         step, stop_reason, ckpt.last)
                break
            epoch_done = step // steps_per_epoch
            epoch_loss = epoch_loss_sum / epoch_loss_count if epoch_loss_count else math.nan
            epoch_losses.append(epoch_loss)
            is_best = math.isfinite(epoch_loss) and epoch_loss < best_loss
            if is_best:
                best_loss, best_epoch = epoch_loss, epoch_done
            epoch_loss_sum, epoch_loss_count = 0.0, 0
            numbered = str(epoch_done) if (epoch_done % args.save_ckpt_freq == 0 or step == total_steps) else None
            save(numbered, best=is_best)
            if tensorboard is not None:
                tensorboard.flush()
            log.info("epoch %d/%d: mean loss %.4f nats (unigram baseline %s)%s%s", epoch_done, args.epochs,
                     epoch_loss, _nats(engine.unigram_entropy()),
                     " (best so far)" if is_best else "",
                     f", last {history[-1]['images_per_s']:.1f} img/s" if history else "")
            if stop_reason is not None:  # at an epoch end: the epoch's checkpoints are written, stop here
                log.info("stopped after step %d (%s); continue with --resume auto", step, stop_reason)
    finally:
        stopper.restore()
        if log_file is not None:
            log_file.close()
        if tensorboard is not None:
            tensorboard.close()
        _shutdown_workers(loader)
    minutes = (time.time() - start_time) / 60
    if loader.skipped.num_skipped:
        log.warning("%d unreadable images were skipped: %s", loader.skipped.num_skipped,
                    ", ".join(list(loader.skipped.files)[:5]))
    summary = {"steps": step, "minutes": minutes, "checkpoint": str(ckpt.last), "history": history,
               "interrupted": stop_reason, "best_loss": best_loss if math.isfinite(best_loss) else None,
               "best_epoch": best_epoch, "epoch_losses": epoch_losses, "world_size": world,
               "unigram_entropy": None, "unigram_acc": None}
    summary["unigram_entropy"], summary["unigram_acc"] = engine.unigram_baseline() or (None, None)
    if history:
        log.info("done: %d steps in %.1f min; MIM loss %.4f -> %.4f nats, mlm_acc %.4f -> %.4f; unigram baseline "
                 "(masked tokens predicted by their frequency alone): loss %s, accuracy %s; checkpoint %s", step,
                 minutes, history[0]["loss"], history[-1]["loss"], history[0]["mlm_acc"], history[-1]["mlm_acc"],
                 _nats(summary["unigram_entropy"]),
                 "n/a" if summary["unigram_acc"] is None else f"{summary['unigram_acc']:.4f}", ckpt.last)
    return summary


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f} nats"


def _resume_state(args: argparse.Namespace, dist_info: DistInfo) -> dict | None:
    """The checkpoint every rank resumes from: rank 0 picks it (``auto``: the newest valid one), all
    ranks load that same file. None: nothing to resume (``auto`` on a fresh output folder)."""
    from .checkpoint import LAST_NAME, CheckpointError, find_resume_checkpoint, list_checkpoints, validate_checkpoint
    from .distributed import broadcast_object

    choice: tuple[str | None, str | None] = (None, None)
    state = None
    if dist_info.is_main:
        try:
            if args.resume == "auto":
                path, state = find_resume_checkpoint(args.output_dir, warn=log.warning,
                                                     trust_pickle=args.trust_pickle)
                choice = (str(path) if path else None, None)
                candidates = list_checkpoints(args.output_dir)
                if path is None and candidates:
                    choice = (None, f"error: --resume auto: none of the {len(candidates)} checkpoints in "
                              f"{args.output_dir} can be loaded (see the warnings above); move them away to start "
                              "from scratch, or pass --resume PATH")
                elif path is None:
                    log.info("--resume auto: no checkpoint in %s yet, starting from scratch", args.output_dir)
            else:
                state = validate_checkpoint(args.resume, trust_pickle=args.trust_pickle)
                choice = (args.resume, None)
        except CheckpointError as e:
            choice = (None, f"error: {e}")
    path, error = broadcast_object(choice, dist_info)
    if error:
        raise SystemExit(error)
    if path is None:
        return None
    if state is None:
        try:
            state = validate_checkpoint(path, trust_pickle=args.trust_pickle)
        except CheckpointError as e:
            raise SystemExit(f"error: {e} (rank {dist_info.rank}; multi-node runs need --output_dir on a "
                             "shared file system)") from None
    state["_path"] = path
    # A crash (or a full disk) may have cut short the numbered / best copies of the newest state: re-do
    # them when resuming from it (not when rewinding to an older checkpoint on purpose).
    state["_restore_copies"] = args.resume == "auto" or \
        Path(path).resolve() == (Path(args.output_dir) / LAST_NAME).resolve()
    return state


def _config_difference(old: dict | None, new: dict) -> str:
    """``key: checkpoint X, this run Y`` for each key whose value differs (a key missing on one side: -)."""
    old = old if isinstance(old, dict) else {}
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k, "-") != new.get(k, "-")]
    return "; ".join(f"{k}: checkpoint {old.get(k, '-')!r}, this run {new.get(k, '-')!r}" for k in keys)


def _warn_if_trajectory_changes(state: dict, args: argparse.Namespace) -> None:
    old = state.get("args") or {}
    old_global = old.get("global_batch_size", old.get("batch_size"))
    if old_global is not None and old_global != args.global_batch_size:
        log.warning("the checkpoint was trained with a global batch of %s, this run uses %d: the data order and "
                    "the schedules continue from step %d but do not follow the original run", old_global,
                    args.global_batch_size, int(state["step"]))
    for key in ("seed", "epochs", "lr", "tokenizer"):
        if key in old and old[key] != getattr(args, key):
            log.warning("resuming with --%s %s (the checkpoint's run used %s)", key, getattr(args, key), old[key])
    tok = state.get("tokenizer") or {}
    if tok.get("path") and args.discrete_vae_weight_path and \
            os.path.abspath(tok["path"]) != os.path.abspath(args.discrete_vae_weight_path):
        log.warning("resuming with tokenizer %s; the checkpoint was trained with %s", args.discrete_vae_weight_path,
                    tok["path"])


if __name__ == "__main__":
    main()
