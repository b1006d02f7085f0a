"""The pretraining run's configuration (``python -m beit_fast.pretrain``): flags, defaults, validation."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..utils.options import DEFAULT_MAX_IMAGE_PIXELS, torch_file_problem
from .base import finite_problems, jpeg_decoder_error, lr_overflow_problems, positive_problems, seed_problems

__all__ = ["PretrainConfig", "DEMO_DEFAULTS", "DEMO_PRETRAINED_CHECKPOINT", "OFFICIAL_DEFAULTS", "DALLE_ENCODER_URL", "DEFAULT_KEEP_LAST",
           "INTERPOLATIONS"]

#: Numbered checkpoints kept by default (--keep_last): the newest two, besides checkpoint-last.pt and
#: checkpoint-best.pt.
DEFAULT_KEEP_LAST = 2
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
#: What the pretraining demo leaves behind for ``python -m beit_fast.finetune`` to start from by default.
DEMO_PRETRAINED_CHECKPOINT = os.path.join(DEMO_DEFAULTS["output_dir"], "checkpoint-last.pt")
OFFICIAL_DEFAULTS = dict(
    model="base", input_size=224, num_mask_patches=75, min_mask_patches_per_block=16, epochs=800, batch_size=128,
    lr=1.5e-3, warmup_epochs=10, num_samples=None, tokenizer="dalle", tokenizer_steps=None,
    output_dir="runs/beit_pretrain", save_ckpt_freq=20,
)


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run, named like the flags of ``python -m beit_fast.pretrain`` (and
    the official ``run_beit_pretraining.py``); see ``--help`` for each. None: the demo / real default
    (:meth:`resolved`). ``world_size`` and ``global_batch_size`` are filled in by the run."""

    # data
    data_path: str | None = None
    num_samples: int | None = None
    input_size: int | None = None
    second_input_size: int | None = None
    train_interpolation: str = "bicubic"
    second_interpolation: str = "lanczos"
    color_jitter: float = 0.4
    imagenet_default_mean_and_std: bool = False
    num_workers: int | None = None
    pin_mem: bool | None = None
    data_pipeline: str = "pil"
    tokenize_in_loader: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_decoder: str = "auto"
    # masking
    num_mask_patches: int | None = None
    min_mask_patches_per_block: int | None = None
    max_mask_patches_per_block: int | None = None
    fixed_mask_count: bool = False
    # tokenizer
    tokenizer: str | None = None
    discrete_vae_weight_path: str | None = None
    tokenizer_steps: int | None = None
    # model
    model: str | None = None
    vocab_size: int | None = None
    patch_size: int = 16
    rel_pos_bias: bool = True
    abs_pos_emb: bool = False
    layer_scale_init_value: float | None = None
    drop_path: float | None = None
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    update_freq: int = 1
    lr: float | None = None
    min_lr: float = 1e-5
    warmup_lr: float = 0.0
    warmup_epochs: int | None = None
    warmup_steps: int = -1
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    decay_mask_and_bias_table: bool = True
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    clip_grad: float = 3.0
    amp: str = "auto"
    # speed
    fast: str = "auto"
    attn_backend: str = "auto"
    kernel_backend: str = "auto"
    compile: bool = True
    compile_mode: str = "default"
    fp8: bool = False
    tokenizer_precision: str = "auto"
    activation_checkpointing: str = "none"
    # distributed, safety
    fsdp: bool = False
    max_bad_steps: int = 3
    nonfinite_check: str | None = None
    # run
    output_dir: str | None = None
    device: str | None = None
    seed: int = 0
    resume: str = ""
    overwrite_output_dir: bool = False
    trust_pickle: bool = False
    allow_tokenizer_change: bool = False
    save_ckpt_freq: int | None = None
    keep_last: int = DEFAULT_KEEP_LAST
    save_ckpt_steps: int = 0
    log_freq: int = 10
    log_dir: str | None = None
    stop_after_steps: int = 0
    no_progress: bool = False
    # filled in by the run
    world_size: int = 1
    global_batch_size: int | None = None

    @property
    def demo(self) -> bool:
        """The embedded demo (no ``data_path``)."""
        return self.data_path is None

    def resolved(self) -> "PretrainConfig":
        """A copy with the demo / real defaults filled in and the tokenizer view's size derived from the patch
        grid when unset; validate it with :meth:`problems`."""
        defaults = DEMO_DEFAULTS if self.demo else OFFICIAL_DEFAULTS
        cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if cfg.input_size > 0 and cfg.patch_size > 0 and cfg.second_input_size is None:
            grid = cfg.input_size // cfg.patch_size
            if grid >= 1:
                cfg.second_input_size = grid * 8
        return cfg

    def problems(self) -> list[str]:
        """Every problem that can be seen without touching devices (the paths the user typed first), each
        naming its flag. Call on a :meth:`resolved` config."""
        return [*self._path_problems(), *self._number_problems(), *self._grid_problems(),
                *self._combination_problems()]

    def _path_problems(self) -> list[str]:
        problems = []
        if self.data_path is not None:
            if not os.path.exists(self.data_path):
                problems.append(f"--data_path {self.data_path}: image folder not found")
            elif not os.path.isdir(self.data_path):
                problems.append(f"--data_path {self.data_path} is not a folder")
            else:  # an empty or imageless folder is reported with the other problems, not after them
                from ..data.image_folder import IMG_EXTENSIONS, iter_image_files

                if next(iter_image_files(self.data_path), None) is None:
                    problems.append(f"--data_path {self.data_path}: no image files found (searched recursively for "
                                    f"{', '.join(IMG_EXTENSIONS)}; hidden files and folders are ignored)")
        if self.discrete_vae_weight_path and not os.path.exists(self.discrete_vae_weight_path):
            problems.append(f"--discrete_vae_weight_path {self.discrete_vae_weight_path}: tokenizer weights not found")
        elif self.discrete_vae_weight_path:
            problems.append(torch_file_problem("--discrete_vae_weight_path", self.discrete_vae_weight_path,
                                               "tokenizer weights file"))
        if self.resume and self.resume != "auto" and not os.path.exists(self.resume):
            problems.append(f"--resume checkpoint not found: {self.resume}")
        elif self.resume and self.resume != "auto":
            problems.append(torch_file_problem("--resume", self.resume))
        problems = [p for p in problems if p]
        for flag in ("output_dir", "log_dir"):
            value = getattr(self, flag)
            if value is not None and os.path.exists(value) and not os.path.isdir(value):
                problems.append(f"--{flag} {value} exists and is not a folder")
        return problems

    def _number_problems(self) -> list[str]:
        problems = positive_problems(self, ("epochs", "batch_size", "input_size", "patch_size", "save_ckpt_freq",
                                            "log_freq", "min_mask_patches_per_block", "max_bad_steps", "update_freq",
                                            "num_samples", "tokenizer_steps", "max_mask_patches_per_block",
                                            "vocab_size"))
        problems += positive_problems(self, ("warmup_epochs", "save_ckpt_steps", "stop_after_steps", "keep_last",
                                             "num_workers"), strict=False)
        problems += seed_problems(self.seed)
        if self.warmup_steps < -1:
            problems.append(f"--warmup_steps must be a step count, or -1 to use --warmup_epochs; got {self.warmup_steps}")
        problems += finite_problems(self, ("lr", "min_lr", "warmup_lr", "weight_decay", "weight_decay_end",
                                           "opt_eps", "clip_grad", "color_jitter", "drop_path",
                                           "layer_scale_init_value"),
                                    nonnegative=("lr", "min_lr", "warmup_lr", "weight_decay", "weight_decay_end",
                                                 "clip_grad", "color_jitter", "layer_scale_init_value"))
        betas = self.opt_betas
        if not all(math.isfinite(b) for b in betas):
            problems.append(f"--opt_betas must be a finite number, got {betas[0]} {betas[1]}")
        elif not all(0 <= b < 1 for b in betas):
            problems.append(f"--opt_betas must both be in [0, 1), got {betas[0]} {betas[1]}")
        if math.isfinite(self.opt_eps) and self.opt_eps <= 0:
            problems.append(f"--opt_eps must be positive, got {self.opt_eps}")
        if self.drop_path is not None and math.isfinite(self.drop_path) and not 0 <= self.drop_path < 1:
            problems.append(f"--drop_path must be in [0, 1), got {self.drop_path}")
        problems += lr_overflow_problems({"lr": self.lr, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr}, betas)
        if self.max_image_pixels <= 0:
            problems.append(f"--max_image_pixels must be positive, got {self.max_image_pixels}")
        return problems

    def _grid_problems(self) -> list[str]:
        if not (self.input_size > 0 and self.patch_size > 0):
            return []
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"--input_size {self.input_size} is not divisible by --patch_size {self.patch_size}")
        grid = self.input_size // self.patch_size
        if grid >= 1 and not 1 <= self.num_mask_patches <= grid * grid:
            problems.append(f"--num_mask_patches must be in [1, {grid * grid}] for a {grid}x{grid} patch grid, "
                            f"got {self.num_mask_patches}")
        if grid >= 1 and self.second_input_size != grid * 8:
            problems.append(f"--second_input_size {self.second_input_size} gives a {self.second_input_size // 8}x"
                            f"{self.second_input_size // 8} token grid, but the patch grid is {grid}x{grid}: use "
                            f"{grid * 8}")
        return problems

    def _combination_problems(self) -> list[str]:
        problems = []
        if self.tokenizer == "dalle" and not self.discrete_vae_weight_path:
            problems.append(
                f"--tokenizer dalle needs --discrete_vae_weight_path pointing at DALL-E's encoder.pkl, the tokenizer "
                f"of OpenAI's DALL-E release ({DALLE_ENCODER_URL}; download it once). No download needed: train our "
                "dVAE on your images, python -m beit_fast.train_tokenizer --data_path DIR --output dvae.pt, then "
                "pass --tokenizer dvae --discrete_vae_weight_path dvae.pt")
        if self.tokenizer == "dvae" and self.data_path is not None and not self.discrete_vae_weight_path:
            problems.append("--tokenizer dvae with --data_path needs --discrete_vae_weight_path: train one on your "
                            "images with python -m beit_fast.train_tokenizer --data_path DIR --output dvae.pt")
        if self.data_path is not None and self.num_samples is not None:
            problems.append("--num_samples only applies to the embedded demo (no --data_path)")
        if self.activation_checkpointing not in ("none", "all") and not (
                self.activation_checkpointing.isdigit() and int(self.activation_checkpointing) >= 1):
            problems.append(f"--activation_checkpointing must be none, all or a positive integer, "
                            f"got {self.activation_checkpointing!r}")
        if self.data_pipeline == "gpu":
            from ..data.pipeline import device_pipeline_problems

            problems += device_pipeline_problems(self.train_interpolation, self.second_interpolation)
        if jpeg_decoder_error(self.jpeg_decoder):
            problems.append("--" + jpeg_decoder_error(self.jpeg_decoder))
        if self.tokenize_in_loader and self.data_pipeline != "gpu":
            problems.append("--tokenize_in_loader needs --data_pipeline gpu")
        if self.fsdp and self.amp == "fp16":
            problems.append("--fsdp does not support --amp fp16 (loss scaling of sharded gradients); use --amp bf16")
        if self.fp8 and self.fast == "off":
            problems.append("--fp8 needs the fast step; drop --fast off")
        if self.fsdp and self.compile_mode == "reduce-overhead":
            problems.append("--fsdp cannot run with --compile_mode reduce-overhead (CUDA graphs cannot capture FSDP2's "
                            "all-gathers and reduce-scatters); use --compile_mode default or "
                            "max-autotune-no-cudagraphs")
        if self.nonfinite_check not in (None, "host", "device"):
            problems.append(f"--nonfinite_check must be host or device, got {self.nonfinite_check!r}")
        if self.fp8 and self.fsdp:
            problems.append("--fp8 is not supported with --fsdp; use DDP (torchrun without --fsdp) or one GPU")
        if self.resume and self.overwrite_output_dir:
            problems.append("--resume continues the run in --output_dir, --overwrite_output_dir deletes it: choose one")
        return problems

    def nonfinite_check_on(self, device_type: str) -> str:
        """``--nonfinite_check`` for a run on ``device_type``: as given, else "device" on CUDA (nothing read on
        the host per step, the GPU's queue never drains) and "host" elsewhere (the official check before each
        backward; a CPU has no queue to keep full)."""
        return self.nonfinite_check or ("device" if device_type == "cuda" else "host")

    def checkpointing_mode(self) -> str | int:
        """``--activation_checkpointing`` as the model takes it: "none", "all" or every k-th block."""
        mode = self.activation_checkpointing
        return mode if mode in ("none", "all") else int(mode)
