"""The pieces of a pretraining run, built from its :class:`~beit_fast.config.PretrainConfig`: the data (two
views + blockwise masks, a resumable sampler, the loader of ``--data_pipeline``), the frozen tokenizer, the
model, and the engine (eager reference or fast step, DDP / FSDP2). :mod:`beit_fast.train.pretraining`
assembles them into a run. Problems are ``SystemExit("error: ...")``, as the command line prints them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import PretrainConfig
from .feed import data_error, default_num_workers

__all__ = ["PretrainData", "build_pretrain_data", "build_tokenizer_for_run", "build_pretrain_model",
           "build_pretrain_engine", "choose_tokenizer_precision", "DEMO_PHOTO_SIDE_PER_VIEW"]

log = logging.getLogger("beit_fast.pretrain")

#: The demo's photographs are capped at this many times the patch view's side (2: 448 px for 224 px views).
DEMO_PHOTO_SIDE_PER_VIEW = 2


@dataclass
class PretrainData:
    dataset: object
    sampler: object
    loader: object
    masking: object
    steps_per_epoch: int


def build_pretrain_data(cfg: PretrainConfig, dist_info, device: torch.device) -> PretrainData:
    """Images (the demo's photographs or ``data_path``) -> two views + a mask per sample -> the loader."""
    from ..data.image_folder import ImageFolderDataset
    from ..data.pretraining import PretrainDataset, ResumableSampler
    from .distributed import isolate_worker_from_signals
    from ..data.masking import MaskingGenerator
    from ..data.pipeline import build_loader_for
    from ..data.samples import SampleImages
    from ..data.transforms import TwoViewConfig, TwoViewTransform

    grid = cfg.input_size // cfg.patch_size
    if cfg.demo:
        # Photographs capped at twice the patch view's side: the colour jitter runs on the whole photograph
        # (official order), and on the 1411 px retina it would cost more than the model's step.
        images = SampleImages(num_samples=cfg.num_samples, max_side=DEMO_PHOTO_SIDE_PER_VIEW * cfg.input_size)
    else:
        try:
            images = ImageFolderDataset(cfg.data_path, max_image_pixels=cfg.max_image_pixels,
                                        jpeg_decoder=cfg.jpeg_decoder)
        except (FileNotFoundError, NotADirectoryError, ValueError, PermissionError) as e:
            raise SystemExit(f"error: {e}") from None
    # The PIL pipeline's workers hand over uint8 views, normalised on the device (train.device_feed).
    transform = TwoViewTransform(TwoViewConfig(
        input_size=cfg.input_size, second_input_size=cfg.second_input_size, interpolation=cfg.train_interpolation,
        second_interpolation=cfg.second_interpolation, color_jitter=cfg.color_jitter,
        imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std, uint8_views=cfg.data_pipeline == "pil",
    ))
    masking = MaskingGenerator((grid, grid), cfg.num_mask_patches, min_num_patches=cfg.min_mask_patches_per_block,
                               max_num_patches=cfg.max_mask_patches_per_block, fixed_count=cfg.fixed_mask_count)
    if not any(masking(np.random.default_rng([cfg.seed, 2**31, i])).any() for i in range(32)):
        raise SystemExit(f"error: these mask settings mask no patch of a {grid}x{grid} grid ({masking}); use "
                         "--fixed_mask_count, or lower --min_mask_patches_per_block, or a larger patch grid")
    dataset = PretrainDataset(images, transform, masking, seed=cfg.seed)
    # DistributedSampler's partition: rank r takes perm[r::world]. The ranks' batches of step t together
    # are perm[t*B : (t+1)*B] with B the global batch, i.e. the batch of step t of a one-process run with
    # batch B (same samples, other order): see DISTRIBUTED.md.
    world = dist_info.world_size
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=True, rank=dist_info.rank, world_size=world,
                               drop_last=False)
    steps_per_epoch = sampler.num_samples // (cfg.batch_size * cfg.update_freq)
    if steps_per_epoch == 0:
        too_few = (f"{len(dataset)} images give {sampler.num_samples} per process, fewer than one step of "
                   f"--batch_size {cfg.batch_size} x --update_freq {cfg.update_freq}"
                   + (f" on each of {world} processes" if world > 1 else ""))
        raise SystemExit(f"error: {_unreadable_cause(images) or too_few}")
    if steps_per_epoch * cfg.epochs > 2**31:
        raise SystemExit(f"error: {steps_per_epoch * cfg.epochs} steps ({cfg.epochs} epochs of {steps_per_epoch}) is "
                         "not a plausible run")
    num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device.type)
    pin = cfg.pin_mem if cfg.pin_mem is not None else device.type == "cuda"
    loader = build_loader_for(cfg.data_pipeline, dataset, cfg.batch_size, device, num_workers=num_workers,
                              sampler=sampler, pin_memory=pin, drop_last=True, persistent_workers=num_workers > 0)
    if transform.cfg.uint8_views:
        from .device_feed import DeviceFeed

        loader.device_feed = DeviceFeed(device, transform.normalize)
    loader.worker_init_fn = isolate_worker_from_signals  # group signals reach only the main process
    # Each new iterator draws its base seed from this generator, not the global RNG, so that a run resumed
    # mid-epoch consumes the global RNG (drop path) exactly like the uninterrupted run.
    loader.generator = torch.Generator().manual_seed(cfg.seed)
    return PretrainData(dataset, sampler, loader, masking, steps_per_epoch)


def _unreadable_cause(images, shown: int = 3) -> str | None:
    """The real cause when a folder too small for one step holds unreadable files (None when all read), told
    before the count: with every file unreadable, 'fewer than one step' alone points the wrong way."""
    if not hasattr(images, "unreadable_files"):  # the demo's photographs
        return None
    bad = images.unreadable_files()
    if not bad:
        return None
    probed = min(len(images), 64)
    first = "; ".join(f"{path}: {reason}" for path, reason in bad[:shown])
    of = "" if probed == len(images) else f" (of the first {probed} tried)"
    return (f"{len(bad)} of the {len(images)} image files under {images.root}{of} cannot be read, which leaves "
            f"fewer readable images than one step needs; first failures: {first}")


def build_tokenizer_for_run(cfg: PretrainConfig, device: torch.device, dist_info=None):
    """The frozen visual tokenizer of this run, on ``device`` in eval mode. The demo trains a small dVAE once
    (rank 0; the other ranks wait) and reuses it afterwards; ``cfg.discrete_vae_weight_path`` is set to it."""
    from .distributed import barrier
    from ..tokenizer import build_tokenizer

    demo_tokenizer = cfg.discrete_vae_weight_path is None
    is_main = dist_info is None or dist_info.is_main
    if demo_tokenizer and not is_main:
        barrier(dist_info)  # rank 0 trains (or finds) the demo tokenizer first
    path = cfg.discrete_vae_weight_path
    if path is None:
        path = str(Path(cfg.output_dir) / "tokenizer.pt")
        if is_main:
            _demo_tokenizer(cfg, path, device)
        cfg.discrete_vae_weight_path = path
    if demo_tokenizer and is_main and dist_info is not None:
        barrier(dist_info)
    try:
        tokenizer = build_tokenizer(cfg.tokenizer, path)
    except Exception as e:  # corrupt file, another tokenizer's weights, ...
        raise SystemExit(f"error: cannot load the {cfg.tokenizer} tokenizer from {path}: "
                         f"{type(e).__name__}: {e}") from None
    return tokenizer.to(device).eval().requires_grad_(False)


def _demo_tokenizer(cfg: PretrainConfig, path: str, device: torch.device) -> None:
    if os.path.isfile(path):
        log.info("reusing the demo dVAE tokenizer %s", path)
        return
    from .tokenizer_training import train_tokenizer

    log.info("training the demo dVAE tokenizer (%d steps) -> %s", cfg.tokenizer_steps, path)
    metrics = train_tokenizer(path, preset="tiny", steps=cfg.tokenizer_steps, input_size=cfg.second_input_size,
                              seed=cfg.seed, device=str(device), progress=not cfg.no_progress)
    log.info("demo tokenizer: held-out reconstruction MSE %.4f (untrained %.4f, each crop's mean colour %.4f), %d of "
             "%d codes used", metrics["recon_mse"], metrics["initial"]["recon_mse"], metrics["mean_color_mse"],
             metrics["codes_used"], metrics["vocab_size"])


def build_pretrain_model(cfg: PretrainConfig, tokenizer, device: torch.device, rank: int = 0):
    """The MIM model of this run (its vocabulary the tokenizer's), the same initial weights on every rank."""
    from ..model.beit import build_model, get_config
    from ..utils.rng import seed_everything

    grid = cfg.input_size // cfg.patch_size
    if cfg.vocab_size is not None and cfg.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"error: --vocab_size {cfg.vocab_size} does not match the tokenizer's vocabulary "
                         f"of {tokenizer.vocab_size}")
    token_grid = tuple(tokenizer.token_grid(cfg.second_input_size))
    if token_grid != (grid, grid):
        raise SystemExit(f"error: the tokenizer ({cfg.discrete_vae_weight_path}) makes a {token_grid[0]}x"
                         f"{token_grid[1]} token grid from the {cfg.second_input_size}px view, but the patch grid "
                         f"is {grid}x{grid}")
    overrides = dict(img_size=cfg.input_size, patch_size=cfg.patch_size, vocab_size=tokenizer.vocab_size,
                     use_shared_rel_pos_bias=cfg.rel_pos_bias, use_abs_pos_emb=cfg.abs_pos_emb)
    if cfg.layer_scale_init_value is not None:
        overrides["init_values"] = cfg.layer_scale_init_value
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    try:
        model_cfg = get_config(cfg.model, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seed_everything(cfg.seed)  # the same initial weights on every rank, whatever ran before
    model = build_model(model_cfg).to(device)
    # Training randomness (drop path) differs across ranks, as in the official code (seed + rank).
    seed_everything(cfg.seed + rank)
    return model


def _check_fast_backends(cfg: PretrainConfig, device: torch.device) -> None:
    from ..ops.attention import available_attention_backends
    from ..ops.backend import triton_available, triton_interpreting

    if cfg.attn_backend not in ("auto", "reference") and cfg.attn_backend not in available_attention_backends(device):
        raise SystemExit(f"error: --attn_backend {cfg.attn_backend} cannot run on {device.type}; available there: "
                         f"{', '.join(['auto'] + available_attention_backends(device))}")
    if cfg.kernel_backend == "triton":
        if not triton_available():
            raise SystemExit("error: --kernel_backend triton but Triton (or the beit_fast kernels) cannot be imported")
        if device.type != "cuda" and not triton_interpreting():
            raise SystemExit("error: --kernel_backend triton needs a CUDA device (on CPU only under "
                             "TRITON_INTERPRET=1); use --kernel_backend auto or reference")


def build_pretrain_engine(cfg: PretrainConfig, model, tokenizer, device: torch.device, dist_info, amp_dtype,
                          steps_per_epoch: int):
    """The engine of this run: the eager reference step, or (``--fast``) the fast static-shape step; DDP for
    several processes, FSDP2 with ``--fsdp``. Returns ``(engine, fast)``."""
    from .distributed import apply_fsdp
    from .optim import build_optimizer, cosine_scheduler
    from .loss import MIMLoss
    from .mim import FastPretrainEngine, PretrainEngine

    fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
    if fast:
        _check_fast_backends(cfg, device)
        model.configure_fast_path(attention=cfg.attn_backend, fused_embed=cfg.kernel_backend,
                                  activation_checkpointing=cfg.checkpointing_mode())
    loss_module = MIMLoss(model, num_masked=cfg.num_mask_patches if fast else None, amp_dtype=amp_dtype,
                          ops_backend=cfg.kernel_backend if fast else None)
    parallel = "fsdp" if cfg.fsdp else ("ddp" if dist_info.active and dist_info.world_size > 1 else "none")
    if parallel == "fsdp":
        # before the optimizer: parameters become sharded DTensors; bf16 all-gathers in a bf16 run
        apply_fsdp(loss_module, model.blocks, param_dtype=amp_dtype if amp_dtype == torch.bfloat16 else None)
    nonfinite_check = cfg.nonfinite_check_on(device.type)
    # The device check skips through fused AdamW's found_inf (any other optimizer would read the flag each step).
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.opt_betas), cfg.opt_eps,
                                cfg.decay_mask_and_bias_table, fused=True if nonfinite_check == "device" else None)
    lr_schedule = cosine_scheduler(cfg.lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                                   cfg.warmup_lr, cfg.warmup_steps)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd_schedule = cosine_scheduler(cfg.weight_decay, wd_end, cfg.epochs, steps_per_epoch)
    engine_args = (model, tokenizer, optimizer, device, lr_schedule, wd_schedule)
    engine_kwargs = dict(amp_dtype=amp_dtype, clip_grad=cfg.clip_grad or None, loss_module=loss_module,
                         parallel=parallel, dist_info=dist_info, nonfinite_check=nonfinite_check)
    if not fast:
        return PretrainEngine(*engine_args, **engine_kwargs), False
    return FastPretrainEngine(*engine_args, **engine_kwargs, num_masked=cfg.num_mask_patches, compile=cfg.compile,
                              ops_backend=cfg.kernel_backend, fp8=cfg.fp8,
                              compile_mode=None if cfg.compile_mode == "default" else cfg.compile_mode), True


def choose_tokenizer_precision(cfg: PretrainConfig, engine, dataset, device: torch.device) -> None:
    """``--tokenizer_precision``: fp16 / bf16 (channels-last) when its token ids agree with fp32 on the first
    batch (auto: on >= 99% of the positions, fp16 tried first; CUDA only), else fp32. Then the tokenizer is
    settled: its convolution weights kept in that precision, its forward compiled where the step is."""
    if not (cfg.tokenizer_precision in ("fp16", "bf16") or (cfg.tokenizer_precision == "auto" and device.type == "cuda")):
        return
    try:
        probe = torch.stack([dataset.get(i, epoch=0)[1] for i in range(min(cfg.batch_size, len(dataset)))])
        if probe.dtype == torch.uint8:
            probe = dataset.transform.normalize_tokenizer_view(probe)
    except RuntimeError as e:
        err = data_error(e)
        if err is None:
            raise
        raise err from None
    forced = cfg.tokenizer_precision != "auto"
    for name in [cfg.tokenizer_precision] if forced else ["fp16", "bf16"]:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        agreement = engine.choose_tokenizer_precision(probe, dtype, min_agreement=0.0 if forced else 0.99)
        log.info("tokenizer in %s agrees with fp32 on %.2f%% of token positions", name, 100 * agreement)
        if engine.tokenizer_dtype is not None:
            break
    engine.settle_tokenizer(compile=engine.compiled)
    log.info("tokenizer runs in %s%s", engine.tokenizer_dtype or torch.float32,
             ", compiled" if engine.compiled and engine.tokenizer_dtype is not None else "")
