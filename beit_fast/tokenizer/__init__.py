"""Visual tokenizers for BEiT (BEIT_SPEC.md section 3).

* ``dalle``: OpenAI's DALL-E dVAE encoder (:class:`DalleEncoder`), loaded from the released
  ``encoder.pkl`` or a state dict of the same layout, without the ``dall_e`` package.
* ``dvae``: our own discrete VAE (:class:`DiscreteVAE`), trained with :func:`beit_fast.train.dvae.train_dvae` /
  ``python -m beit_fast.train_tokenizer``.

Both take the same tokenizer view (112x112 image in [0, 1] passed through :func:`map_pixels`) and return
``[B, 196]`` int64 tokens via ``get_codebook_indices`` (fp32, no grad, eval mode, autocast off).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .base import LOGIT_LAPLACE_EPS, VisualTokenizer, map_pixels, unmap_pixels
from .dalle import DalleEncoder, DalleTokenizer, dalle_state_dict_from_file, load_dalle_encoder
from .dvae import PRESETS, DiscreteVAE, DVAEConfig, kl_weight_at, temperature_at

__all__ = [
    "VisualTokenizer", "map_pixels", "unmap_pixels", "LOGIT_LAPLACE_EPS", "build_tokenizer", "TOKENIZER_KINDS",
    "DalleEncoder", "DalleTokenizer", "load_dalle_encoder", "dalle_state_dict_from_file",
    "DiscreteVAE", "DVAEConfig", "PRESETS", "temperature_at", "kl_weight_at",
]

TOKENIZER_KINDS = ("dalle", "dvae")


def build_tokenizer(kind: str, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                    input_size: int | None = None, **kw: Any) -> VisualTokenizer:
    """Load a frozen (``requires_grad=False``), eval-mode, fp32 tokenizer.

    Args:
        kind: ``"dalle"`` (``path`` = OpenAI's ``encoder.pkl`` or a state dict with its keys) or ``"dvae"``
            (``path`` = a checkpoint written by :func:`beit_fast.train.dvae.train_dvae` / ``python -m beit_fast.train_tokenizer``).
        path: weights file (required; a missing file raises ``FileNotFoundError`` naming it).
        device: where to put it (default: CPU).
        input_size: override the expected tokenizer-view side (default: 112 for DALL-E, the checkpoint's
            ``input_size`` for the dVAE).
        **kw: ``random_init=True`` builds an untrained tokenizer instead (``path`` must then be ``None``;
            for DALL-E the remaining keywords go to :class:`DalleEncoder`, for the dVAE to
            :meth:`DVAEConfig.preset` with ``preset=`` naming the preset). Meant for tests and benchmarks.
    """
    if not isinstance(kind, str) or kind.lower() not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    kind = kind.lower()
    random_init = bool(kw.pop("random_init", False))
    if random_init:
        if path is not None:
            raise ValueError("random_init=True builds an untrained tokenizer: do not pass a path")
        if kind == "dalle":
            tok: VisualTokenizer = DalleEncoder(**kw, **({"input_size": input_size} if input_size else {}))
        else:
            preset = kw.pop("preset", "default")
            if input_size:
                kw["input_size"] = input_size
            tok = DiscreteVAE(DVAEConfig.preset(preset, **kw))
    else:
        if kw:
            raise TypeError(f"unexpected keyword arguments {sorted(kw)} (only with random_init=True)")
        if path is None:
            hint = ("OpenAI's encoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl) or a state dict of its layout"
                    if kind == "dalle" else "a checkpoint from `python -m beit_fast.train_tokenizer`")
            raise ValueError(f"tokenizer {kind!r} needs a weights path: {hint} (or random_init=True for an "
                             "untrained one)")
        if kind == "dalle":
            tok = load_dalle_encoder(path, input_size=input_size or 112)
        else:
            tok = DiscreteVAE.from_checkpoint(path)
            if input_size:
                tok.input_size = int(input_size)
    if device is not None:
        tok = tok.to(device)
    return tok.float().eval().requires_grad_(False)
