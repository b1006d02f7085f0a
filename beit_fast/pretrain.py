"""BEiT pretraining: ``python -m beit_fast.pretrain [flags]``.

With no ``--data_path`` it runs the embedded default: a tiny BEiT on random crops of the photographs that
ship with scikit-image, with a small discrete VAE tokenizer trained first (or reused), on CPU when there
is no GPU, in a few minutes. Flags are named like the official ``run_beit_pretraining.py``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m beit_fast.pretrain ...`` (DDP, or FSDP2 with
``--fsdp``); ``--batch_size`` is per process, the global batch is ``batch_size x world_size x update_freq``
and the lr is not rescaled. SIGTERM / SIGINT stop at the next step boundary with a checkpoint;
``--resume auto`` continues from the newest valid one. See DISTRIBUTED.md.

This module parses the flags into a :class:`beit_fast.config.PretrainConfig` and calls
:func:`beit_fast.train.pretraining.pretrain`; torch is imported only after the flags are parsed.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/pretrain.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.pretrain as _cli
    _cli.main()
    raise SystemExit(0)

import argparse

from .config import PretrainConfig, defaults_of, exit_on_problems, from_args
from .config.pretrain import DALLE_ENCODER_URL, INTERPOLATIONS
from .utils.logs import cli_logging
from .utils.options import ArgumentParser, JPEG_DECODER_HELP, JPEG_DECODERS, MODEL_NAMES, HelpFormatter

__all__ = ["get_args_parser", "resolve_defaults", "main"]


def _data_flags(p: argparse.ArgumentParser) -> None:
    """Images, their two views and the loader."""
    g = p.add_argument_group("data")
    g.add_argument("--data_path", help="image folder (searched recursively); omit for the embedded demo")
    g.add_argument("--num_samples", type=int,
                   help="demo only: samples per epoch drawn from the sample photographs (demo 1024)")
    g.add_argument("--input_size", type=int, help="image size of the patch view (demo 128 / real 224)")
    g.add_argument("--second_input_size", type=int,
                   help="image size of the tokenizer view (default: input_size / patch_size * 8: demo 64 / real 112)")
    g.add_argument("--train_interpolation", choices=INTERPOLATIONS,
                   help="resize filter of the patch view")
    g.add_argument("--second_interpolation", choices=INTERPOLATIONS,
                   help="resize filter of the tokenizer view")
    g.add_argument("--color_jitter", type=float, help="brightness/contrast/saturation jitter (0: off)")
    g.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise the patch view with ImageNet mean/std instead of 0.5/0.5")
    g.add_argument("--num_workers", type=int,
                   help="DataLoader workers per process (default: on CUDA the cores available to the process, "
                   "shared among the node's processes, less one; on CPU min(8, those cores))")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction,
                   help="pin host memory for faster copies to the GPU (default: on with CUDA)")
    g.add_argument("--data_pipeline", choices=["pil", "gpu"],
                   help="pil: DataLoader workers decode, jitter and resize with Pillow; gpu: workers only read "
                   "JPEG bytes, the training device decodes them (nvJPEG on CUDA) and renders both views with "
                   "Pillow's arithmetic (identical pixels with a CPU decoder; runs on CPU tensors too)")
    g.add_argument("--tokenize_in_loader", action="store_true",
                   help="with --data_pipeline gpu: compute the visual tokens in the input pipeline's prefetch "
                   "thread (a side CUDA stream, overlapping the previous step) instead of in the step")
    g.add_argument("--max_image_pixels", type=int,
                   help="images with more pixels (width x height, read from the file header before decoding) "
                   "are skipped and counted, like unreadable ones: a guard against decompression bombs")
    g.add_argument("--jpeg_decoder", choices=JPEG_DECODERS, help=JPEG_DECODER_HELP)


def _masking_and_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    """Blockwise masking and the visual tokenizer."""
    g = p.add_argument_group("masking")
    g.add_argument("--num_mask_patches", type=int,
                   help="patches to mask per image, about 40%% (demo 26 of 64 / real 75 of 196)")
    g.add_argument("--min_mask_patches_per_block", type=int, help="smallest masked block (demo 4 / real 16)")
    g.add_argument("--max_mask_patches_per_block", type=int, help="largest block (default: num_mask_patches)")
    g.add_argument("--fixed_mask_count", action=argparse.BooleanOptionalAction,
                   help="top every mask up to exactly num_mask_patches (static shapes); off = official algorithm")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["dalle", "dvae"],
                   help="visual tokenizer: DALL-E's released encoder or our discrete VAE (demo dvae / real dalle)")
    g.add_argument("--discrete_vae_weight_path",
                   help=f"tokenizer weights: DALL-E's encoder.pkl ({DALLE_ENCODER_URL}, or a state dict of its "
                   "layout), or a dVAE checkpoint from python -m beit_fast.train_tokenizer; demo: trained first "
                   "if missing")
    g.add_argument("--tokenizer_steps", type=int,
                   help="demo only: steps to train the demo dVAE when no checkpoint is given (demo 300)")


def _model_and_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """The model, the optimizer and its schedules."""
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, help="model size (demo tiny / real base)")
    g.add_argument("--vocab_size", type=int, help="visual vocabulary (default: the tokenizer's)")
    g.add_argument("--patch_size", type=int, help="patch size in pixels")
    g.add_argument("--rel_pos_bias", action=argparse.BooleanOptionalAction,
                   help="one relative position bias table shared by all blocks")
    g.add_argument("--abs_pos_emb", action=argparse.BooleanOptionalAction,
                   help="absolute position embedding")
    g.add_argument("--layer_scale_init_value", type=float,
                   help="LayerScale init (default: the model's, 0.1 base / 1e-5 large); 0 disables")
    g.add_argument("--drop_path", type=float, help="stochastic depth rate (default: the model's)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs (demo 25 / real 800)")
    g.add_argument("--batch_size", type=int,
                   help="batch size per process and micro-batch (demo 32 / real 128); the global batch is "
                   "batch_size x processes x update_freq")
    g.add_argument("--update_freq", type=int,
                   help="gradient accumulation: micro-batches per optimizer step (the lr is not rescaled)")
    g.add_argument("--lr", type=float, help="peak learning rate, not scaled by batch size (1.5e-3)")
    g.add_argument("--min_lr", type=float, help="final learning rate of the cosine schedule")
    g.add_argument("--warmup_lr", type=float, help="learning rate at the start of the warmup")
    g.add_argument("--warmup_epochs", type=int, help="linear warmup epochs (demo 2 / real 10)")
    g.add_argument("--warmup_steps", type=int, help="warmup steps; overrides --warmup_epochs if > 0")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--weight_decay_end", type=float,
                   help="final weight decay of a cosine wd schedule (default: constant)")
    g.add_argument("--decay_mask_and_bias_table", action=argparse.BooleanOptionalAction,
                   help="weight-decay mask_token and the relative position bias table (official: yes; timm: no)")
    g.add_argument("--opt_betas", type=float, nargs=2, help="AdamW betas")
    g.add_argument("--opt_eps", type=float, help="AdamW epsilon")
    g.add_argument("--clip_grad", type=float, help="gradient norm clip (0: off)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision: auto = bf16 on CUDA when supported, else fp16 with a loss scaler; none on CPU")


def _speed_flags(p: argparse.ArgumentParser) -> None:
    """The fast step, distributed training and the non-finite policy."""
    g = p.add_argument_group("speed")
    g.add_argument("--fast", choices=["auto", "on", "off"],
                   help="fast training step (fused kernels, fused attention, static shapes, torch.compile): "
                   "auto = on with CUDA, off (the eager reference step) on CPU")
    g.add_argument("--attn_backend", choices=["auto", "reference", "math", "sdpa", "flex", "xformers", "triton"],
                   help="attention with the relative position bias in the fast step (math: the eager reference; "
                   "'reference' is a deprecated alias of math)")
    g.add_argument("--kernel_backend", choices=["auto", "triton", "reference"],
                   help="fused patch-embedding and linear-cross-entropy ops in the fast step")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the fast step's forward and backward")
    g.add_argument("--compile_mode",
                   choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
                   help="torch.compile mode of the fast step: max-autotune-no-cudagraphs autotunes the GEMMs and "
                   "their bias/GELU epilogues (slower first step), reduce-overhead adds CUDA graphs")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 GEMMs (torchao float8 training, tensorwise scaling) for the blocks' QKV and MLP linears "
                   "in the fast step; needs a CUDA GPU of compute capability >= 8.9 (H100/H200) and torchao "
                   "(pip install -e '.[fp8]' in the clone)")
    g.add_argument("--tokenizer_precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="tokenizer forward precision (channels-last): auto tries fp16 then bf16 on CUDA and keeps "
                   "the first whose token ids agree with fp32 on >= 99%% of the first batch's positions, else fp32; "
                   "fp16/bf16 force that precision (agreement still logged)")
    g.add_argument("--activation_checkpointing",
                   help="recompute blocks in backward to save memory: none, all, or k (every k-th block)")

    g = p.add_argument_group("distributed (launch with torchrun; see DISTRIBUTED.md)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 (fully_shard per block + "
                   "root) instead of replicating them with DDP; for models that do not fit one device")

    g = p.add_argument_group("safety")
    g.add_argument("--max_bad_steps", type=int,
                   help="stop (with a checkpoint) after this many consecutive non-finite losses")
    g.add_argument("--nonfinite_check", choices=["host", "device"],
                   help="how a non-finite loss or gradient norm is caught (the step makes no update either way): "
                   "host reads each loss before its backward (a GPU sync per step); device decides on the GPU "
                   "(fused AdamW's found_inf) and reads the results every --log_freq steps (default: device on "
                   "CUDA, host elsewhere)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Output folder, resume, checkpoints, logs."""
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", help="checkpoints and logs (demo runs/beit_pretrain_demo)")
    g.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, help="seed of model init, data order, augmentation and masks")
    g.add_argument("--resume",
                   help="checkpoint to resume from, or 'auto': output_dir's newest checkpoint that loads (an "
                   "unloadable one is skipped with a warning), or a fresh start if there is none")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a fresh run in an --output_dir that holds another run's checkpoints: they and its "
                   "log.jsonl are deleted first (without this flag such a run is refused; see --resume auto)")
    g.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow --resume checkpoints that pickle Python objects beyond tensors and plain values "
                   "(old or foreign files): they are read with Python's full unpickler, which can run arbitrary "
                   "code stored in the file; only for files you trust")
    g.add_argument("--allow_tokenizer_change", action="store_true",
                   help="resume although the tokenizer's weights differ from those the checkpoint was trained with "
                   "(recorded as a SHA-256 of its weights): the MIM targets change from that step on")
    g.add_argument("--save_ckpt_freq", type=int, help="save a numbered checkpoint every N epochs")
    g.add_argument("--keep_last", type=int,
                   help="keep only the K newest numbered checkpoints (default: %(default)s; 0: keep all); "
                   "checkpoint-last.pt and checkpoint-best.pt (lowest epoch-average loss) are always kept")
    g.add_argument("--save_ckpt_steps", type=int,
                   help="also refresh checkpoint-last.pt every N steps (0: only at epoch ends)")
    g.add_argument("--log_freq", type=int, help="write a log line every N steps")
    g.add_argument("--log_dir",
                   help="also write the logged scalars (loss, MIM accuracy, unigram baseline, lr, ...) as TensorBoard "
                   "events to this folder (needs the tensorboard package); the JSON lines go to output_dir/log.jsonl "
                   "either way")
    g.add_argument("--stop_after_steps", type=int,
                   help="stop after this many global steps with a checkpoint, as if interrupted (for testing resume)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        "python -m beit_fast.pretrain",
        description="BEiT pretraining (masked image modeling with visual tokens). Without --data_path, runs "
        "the embedded CPU-sized demo on scikit-image's sample photographs. Defaults shown as 'demo/real' "
        "differ between the demo and a run with --data_path (the official BEiT-B recipe).",
        formatter_class=HelpFormatter,
    )
    _data_flags(p)
    _masking_and_tokenizer_flags(p)
    _model_and_optimisation_flags(p)
    _speed_flags(p)
    _run_flags(p)
    p.set_defaults(**defaults_of(PretrainConfig))  # the flags' defaults are the config's
    return p


def resolve_defaults(args: argparse.Namespace) -> PretrainConfig:
    """The run's config from parsed flags: demo / real defaults filled in, every problem reported at once."""
    cfg = from_args(PretrainConfig, args).resolved()
    exit_on_problems(cfg.problems())
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run pretraining with command-line flags ``argv`` (default ``sys.argv[1:]``); returns a summary."""
    cfg = resolve_defaults(get_args_parser().parse_args(argv))
    from .train.pretraining import pretrain

    with cli_logging():
        return pretrain(cfg)


if __name__ == "__main__":
    main()
