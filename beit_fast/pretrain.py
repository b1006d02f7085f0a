"""BEiT pretraining: ``python -m beit_fast.pretrain [flags]``.

With no ``--data_path`` it runs the embedded default: a tiny BEiT on random crops of the photographs that
ship with scikit-image, with a small discrete VAE tokenizer trained first (or reused), on CPU when there
is no GPU, in a few minutes. Flags are named like the official ``run_beit_pretraining.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_save, load_checkpoint
from .data import PretrainDataset, ImageFolderDataset, ResumableSampler, build_pretrain_loader
from .engine import FastPretrainEngine, PretrainEngine, resolve_amp_dtype
from .masking import MaskingGenerator
from .model import MODEL_CONFIGS, build_model, get_config
from .optim import build_optimizer, cosine_scheduler
from .sample_data import SampleImages
from .transforms import TwoViewConfig, TwoViewTransform

log = logging.getLogger("beit_fast.pretrain")

# Values that differ between the embedded CPU demo (no --data_path) and a real run (official recipe).
DEMO_DEFAULTS = dict(
    model="tiny", epochs=8, batch_size=32, lr=1.5e-3, warmup_epochs=1, num_samples=1024,
    tokenizer="dvae", tokenizer_steps=600, output_dir="runs/beit_pretrain_demo", save_ckpt_freq=1,
)
OFFICIAL_DEFAULTS = dict(
    model="base", epochs=800, batch_size=128, lr=1.5e-3, warmup_epochs=10, num_samples=None,
    tokenizer="dalle", tokenizer_steps=None, output_dir="runs/beit_pretrain", save_ckpt_freq=20,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m beit_fast.pretrain",
        description="BEiT pretraining (masked image modeling with visual tokens). Without --data_path, runs "
        "the embedded CPU-sized demo on scikit-image's sample photographs. Defaults shown as 'demo/real' "
        "differ between the demo and a run with --data_path (the official BEiT-B recipe).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="image folder (searched recursively); omit for the embedded demo")
    g.add_argument("--num_samples", type=int, default=None,
                   help="demo only: samples per epoch drawn from the sample photographs (demo 1024)")
    g.add_argument("--input_size", type=int, default=224, help="image size of the patch view")
    g.add_argument("--second_input_size", type=int, default=None,
                   help="image size of the tokenizer view (default: input_size / patch_size * 8, i.e. 112)")
    g.add_argument("--train_interpolation", default="bicubic", help="resize filter of the patch view")
    g.add_argument("--second_interpolation", default="lanczos", help="resize filter of the tokenizer view")
    g.add_argument("--color_jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter (0: off)")
    g.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise the patch view with ImageNet mean/std instead of 0.5/0.5")
    g.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: min(8, cores))")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pin host memory for faster copies to the GPU (default: on with CUDA)")

    g = p.add_argument_group("masking")
    g.add_argument("--num_mask_patches", type=int, default=75, help="patches to mask per image (about 40%%)")
    g.add_argument("--min_mask_patches_per_block", type=int, default=16, help="smallest masked block")
    g.add_argument("--max_mask_patches_per_block", type=int, default=None, help="largest block (default: num_mask_patches)")
    g.add_argument("--fixed_mask_count", action=argparse.BooleanOptionalAction, default=False,
                   help="top every mask up to exactly num_mask_patches (static shapes); off = official algorithm")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["dalle", "dvae"], default=None,
                   help="visual tokenizer: DALL-E's released encoder or our discrete VAE (demo dvae / real dalle)")
    g.add_argument("--discrete_vae_weight_path", default=None,
                   help="tokenizer weights: DALL-E encoder.pkl (or a state dict of its layout), or a dVAE "
                   "checkpoint from beit_fast.train_tokenizer; demo: trained first if missing")
    g.add_argument("--tokenizer_steps", type=int, default=None,
                   help="demo only: steps to train the demo dVAE when no checkpoint is given (demo 600)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(MODEL_CONFIGS), help="model size (demo tiny / real base)")
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
    g.add_argument("--epochs", type=int, default=None, help="epochs (demo 8 / real 800)")
    g.add_argument("--batch_size", type=int, default=None, help="batch size per process (demo 32 / real 128)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, not scaled by batch size (1.5e-3)")
    g.add_argument("--min_lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    g.add_argument("--warmup_lr", type=float, default=0.0, help="learning rate at the start of the warmup")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear warmup epochs (demo 1 / real 10)")
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
    g.add_argument("--attn_backend", default="auto", choices=["auto", "reference", "math", "sdpa", "flex", "xformers"],
                   help="attention with the relative position bias in the fast step")
    g.add_argument("--kernel_backend", default="auto", choices=["auto", "triton", "reference"],
                   help="fused patch-embedding and linear-cross-entropy ops in the fast step")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the fast step's forward and backward")
    g.add_argument("--tokenizer_precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="tokenizer forward precision (channels-last): auto tries fp16 then bf16 on CUDA and keeps "
                   "the first whose token ids agree with fp32 on >= 99%% of the first batch's positions, else fp32; "
                   "fp16/bf16 force that precision (agreement still logged)")
    g.add_argument("--activation_checkpointing", default="none",
                   help="recompute blocks in backward to save memory: none, all, or k (every k-th block)")

    g = p.add_argument_group("safety")
    g.add_argument("--max_bad_steps", type=int, default=3,
                   help="stop (with a checkpoint) after this many consecutive non-finite losses")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="checkpoints and logs (demo runs/beit_pretrain_demo)")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentation and masks")
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' for output_dir's latest")
    g.add_argument("--save_ckpt_freq", type=int, default=None, help="save a numbered checkpoint every N epochs")
    g.add_argument("--save_ckpt_steps", type=int, default=0,
                   help="also refresh checkpoint-last.pt every N steps (0: only at epoch ends)")
    g.add_argument("--log_freq", type=int, default=10, help="write a log line every N steps")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this many global steps with a checkpoint, as if interrupted (for testing resume)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags whose default depends on demo vs real run, and validate everything."""
    defaults = DEMO_DEFAULTS if args.data_path is None else OFFICIAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.save_ckpt_freq is None:
        args.save_ckpt_freq = defaults["save_ckpt_freq"]
    errors = []
    for name in ("epochs", "batch_size", "input_size", "patch_size", "save_ckpt_freq", "log_freq",
                 "min_mask_patches_per_block", "max_bad_steps"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "clip_grad"):
        if getattr(args, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.warmup_epochs < 0:
        errors.append(f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")
    if args.num_workers is not None and args.num_workers < 0:
        errors.append("--num_workers must be >= 0")
    if args.num_samples is not None and args.num_samples <= 0:
        errors.append("--num_samples must be positive")
    if args.patch_size > 0 and args.input_size % args.patch_size:
        errors.append(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
    grid = args.input_size // max(args.patch_size, 1)
    if not 1 <= args.num_mask_patches <= grid * grid:
        errors.append(f"--num_mask_patches must be in [1, {grid * grid}] for a {grid}x{grid} patch grid, "
                      f"got {args.num_mask_patches}")
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        errors.append(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if args.second_input_size is None:
        args.second_input_size = grid * 8
    elif args.second_input_size != grid * 8:
        errors.append(f"--second_input_size {args.second_input_size} gives a {args.second_input_size // 8}x"
                      f"{args.second_input_size // 8} token grid, but the patch grid is {grid}x{grid}: use {grid * 8}")
    if args.tokenizer == "dalle" and not args.discrete_vae_weight_path:
        errors.append("--tokenizer dalle needs --discrete_vae_weight_path pointing at DALL-E's encoder.pkl "
                      "(this machine cannot download it); or use --tokenizer dvae")
    if args.discrete_vae_weight_path and not os.path.isfile(args.discrete_vae_weight_path):
        errors.append(f"tokenizer weights not found: {args.discrete_vae_weight_path}")
    if args.tokenizer == "dvae" and args.data_path is not None and not args.discrete_vae_weight_path:
        errors.append("--tokenizer dvae with --data_path needs --discrete_vae_weight_path (train one with "
                      "python -m beit_fast.train_tokenizer --data_path ...)")
    if args.activation_checkpointing not in ("none", "all"):
        try:
            if int(args.activation_checkpointing) < 1:
                raise ValueError
        except ValueError:
            errors.append(f"--activation_checkpointing must be none, all or a positive integer, "
                          f"got {args.activation_checkpointing!r}")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        errors.append(f"--resume checkpoint not found: {args.resume}")
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_tokenizer_for_run(args: argparse.Namespace, device: torch.device):
    """The frozen visual tokenizer of this run, on ``device`` in eval mode."""
    from .tokenizer import build_tokenizer

    path = args.discrete_vae_weight_path
    if path is None:  # demo: train a small dVAE once, reuse it afterwards
        path = str(Path(args.output_dir) / "tokenizer.pt")
        if not os.path.isfile(path):
            from .train_tokenizer import main as train_tokenizer

            log.info("training the demo dVAE tokenizer (%d steps) -> %s", args.tokenizer_steps, path)
            train_tokenizer(["--output", path, "--preset", "tiny", "--steps", str(args.tokenizer_steps),
                             "--input_size", str(args.second_input_size), "--seed", str(args.seed),
                             "--device", str(device)] + (["--no_progress"] if args.no_progress else []))
        else:
            log.info("reusing the demo dVAE tokenizer %s", path)
        args.discrete_vae_weight_path = path
    tokenizer = build_tokenizer(args.tokenizer, path)
    return tokenizer.to(device).eval().requires_grad_(False)


class Checkpointer:
    """Writes ``checkpoint-last.pt`` (and numbered copies) atomically into the output directory."""

    def __init__(self, output_dir: str) -> None:
        self.dir = Path(output_dir)

    @property
    def last(self) -> Path:
        return self.dir / "checkpoint-last.pt"

    def save(self, state: dict, numbered: str | None = None) -> Path:
        atomic_save(state, self.last)
        if numbered:
            atomic_save(state, self.dir / f"checkpoint-{numbered}.pt")
        return self.last


def main(argv: list[str] | None = None) -> dict:
    args = resolve_defaults(get_args_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)

    # data -> masking/tokenizer -> model -> loss -> loop
    grid = args.input_size // args.patch_size
    if args.data_path is None:
        images = SampleImages(num_samples=args.num_samples)
    else:
        try:
            images = ImageFolderDataset(args.data_path)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
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
    dataset = PretrainDataset(images, transform, masking, seed=args.seed)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"error: {len(dataset)} images are fewer than one batch of {args.batch_size}")
    sampler = ResumableSampler(len(dataset), seed=args.seed, shuffle=True, drop_last=False)
    num_workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    pin = args.pin_mem if args.pin_mem is not None else device.type == "cuda"
    loader = build_pretrain_loader(dataset, args.batch_size, num_workers=num_workers, sampler=sampler,
                                   pin_memory=pin, drop_last=True, persistent_workers=num_workers > 0)
    # Each new iterator draws its base seed from this generator, not the global RNG, so that a run resumed
    # mid-epoch consumes the global RNG (drop path) exactly like the uninterrupted run.
    loader.generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = sampler.num_samples // args.batch_size
    total_steps = steps_per_epoch * args.epochs

    tokenizer = build_tokenizer_for_run(args, device)
    if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"error: --vocab_size {args.vocab_size} does not match the tokenizer's vocabulary "
                         f"of {tokenizer.vocab_size}")
    overrides = dict(img_size=args.input_size, patch_size=args.patch_size, vocab_size=tokenizer.vocab_size,
                     use_shared_rel_pos_bias=args.rel_pos_bias, use_abs_pos_emb=args.abs_pos_emb)
    if args.layer_scale_init_value is not None:
        overrides["init_values"] = args.layer_scale_init_value
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path
    cfg = get_config(args.model, **overrides)
    model = build_model(cfg).to(device)

    optimizer = build_optimizer(model, args.lr, args.weight_decay, tuple(args.opt_betas), args.opt_eps,
                                args.decay_mask_and_bias_table)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                   args.warmup_lr, args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    engine_args = (model, tokenizer, optimizer, device, lr_schedule, wd_schedule)
    engine_kwargs = dict(amp_dtype=resolve_amp_dtype(args.amp, device), clip_grad=args.clip_grad or None)
    fast = args.fast == "on" or (args.fast == "auto" and device.type == "cuda")
    if fast:
        ckpt_mode = args.activation_checkpointing
        model.configure_fast_path(attention=args.attn_backend, fused_embed=args.kernel_backend,
                                  activation_checkpointing=ckpt_mode if ckpt_mode in ("none", "all") else int(ckpt_mode))
        engine = FastPretrainEngine(*engine_args, **engine_kwargs, num_masked=args.num_mask_patches,
                                    compile=args.compile, ops_backend=args.kernel_backend)
    else:
        engine = PretrainEngine(*engine_args, **engine_kwargs)
    ckpt = Checkpointer(args.output_dir)
    if args.tokenizer_precision in ("fp16", "bf16") or (args.tokenizer_precision == "auto" and device.type == "cuda"):
        probe = torch.stack([dataset.get(i, epoch=0)[1] for i in range(min(args.batch_size, len(dataset)))])
        forced = args.tokenizer_precision != "auto"
        candidates = [args.tokenizer_precision] if forced else ["fp16", "bf16"]
        for name in candidates:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
            agreement = engine.choose_tokenizer_precision(probe, dtype, min_agreement=0.0 if forced else 0.99)
            log.info("tokenizer in %s agrees with fp32 on %.2f%% of token positions", name, 100 * agreement)
            if engine.tokenizer_dtype is not None:
                break
        log.info("tokenizer runs in %s", engine.tokenizer_dtype or torch.float32)

    step = 0
    resume = str(ckpt.last) if args.resume == "auto" else args.resume
    if resume and os.path.isfile(resume):
        state = load_checkpoint(resume)
        if state.get("model_config") != cfg.to_dict():
            raise SystemExit(f"error: checkpoint {resume} was written for another model config:\n"
                             f"  checkpoint: {state.get('model_config')}\n  this run:   {cfg.to_dict()}")
        model.load_state_dict(state["model"])
        engine.load_state_dict(state)
        set_rng_state(state["rng"])
        step = int(state["step"])
        log.info("resumed from %s at step %d (epoch %d)", resume, step, step // steps_per_epoch)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, vocab %d, device %s, amp %s, step %s", args.model, n_params / 1e6,
             cfg.vocab_size, device, engine.amp_dtype, "fast" if fast else "eager reference")
    log.info("data: %s, %d samples, %d steps/epoch x %d epochs = %d steps; %s", type(images).__name__,
             len(dataset), steps_per_epoch, args.epochs, total_steps, masking)
    with open(out / "args.json", "w") as f:
        json.dump(vars(args), f, indent=1, default=str)

    def state_dict() -> dict:
        return {"model": model.state_dict(), **engine.state_dict(), "step": step,
                "epoch": step // steps_per_epoch, "model_config": cfg.to_dict(), "args": vars(args),
                "rng": rng_state(), "tokenizer": {"kind": args.tokenizer, "path": args.discrete_vae_weight_path}}

    log_file = open(out / "log.jsonl", "a")
    bad_steps = 0
    history: list[dict] = []
    start_time = time.time()
    stopped_early = False
    while step < total_steps and not stopped_early:
        epoch, start_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.set_start(start_in_epoch * args.batch_size)
        window: list = []
        bar = tqdm(total=steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress, dynamic_ncols=True, leave=False)
        t0 = time.time()
        for batch in loader:
            result = engine.train_step(batch, step)
            step += 1
            bar.update(1)
            if result.skipped:
                bad_steps += 1
                log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step, result.loss, bad_steps)
                if bad_steps >= args.max_bad_steps:
                    ckpt.save(state_dict())
                    log_file.close()
                    raise SystemExit(f"error: {bad_steps} consecutive non-finite losses at step {step}; "
                                     f"state saved to {ckpt.last}. Lower --lr or use --amp bf16/none.")
                continue
            bad_steps = 0
            window.append(result)
            bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.mlm_acc:.3f}", lr=f"{result.lr:.2e}")
            if step % args.log_freq == 0 or step == total_steps:
                elapsed = time.time() - t0
                record = {"step": step, "epoch": epoch, **{k: v for k, v in asdict(result).items() if k != "skipped"},
                          "images_per_s": len(window) * args.batch_size / max(elapsed, 1e-9),
                          "skipped_images": loader.skipped.num_skipped}
                record["loss"] = float(np.mean([r.loss for r in window]))
                record["mlm_acc"] = float(np.mean([r.mlm_acc for r in window]))
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                history.append(record)
                window, t0 = [], time.time()
            if args.save_ckpt_steps and step % args.save_ckpt_steps == 0:
                ckpt.save(state_dict())
            if args.stop_after_steps and step >= args.stop_after_steps:
                stopped_early = True
                break
            if step % steps_per_epoch == 0:
                break
        bar.close()
        if stopped_early:
            ckpt.save(state_dict())
            log.info("stopped after step %d as asked; resume with --resume %s", step, ckpt.last)
            break
        epoch_done = step // steps_per_epoch
        numbered = str(epoch_done) if (epoch_done % args.save_ckpt_freq == 0 or step == total_steps) else None
        ckpt.save(state_dict(), numbered)
        if history:
            last = history[-1]
            log.info("epoch %d/%d: loss %.4f, mlm_acc %.4f, lr %.2e, %.1f img/s", epoch_done, args.epochs,
                     last["loss"], last["mlm_acc"], last["lr"], last["images_per_s"])
    log_file.close()
    minutes = (time.time() - start_time) / 60
    if loader.skipped.num_skipped:
        log.warning("%d unreadable images were skipped: %s", loader.skipped.num_skipped,
                    ", ".join(list(loader.skipped.files)[:5]))
    summary = {"steps": step, "minutes": minutes, "checkpoint": str(ckpt.last), "history": history}
    if history:
        log.info("done: %d steps in %.1f min; loss %.4f -> %.4f, mlm_acc %.4f -> %.4f; checkpoint %s", step, minutes,
                 history[0]["loss"], history[-1]["loss"], history[0]["mlm_acc"], history[-1]["mlm_acc"], ckpt.last)
    return summary


if __name__ == "__main__":
    main()
