"""The visual-tokenizer interface shared by the DALL-E encoder and our own discrete VAE.

A tokenizer turns the *tokenizer view* of an image (BEIT_SPEC.md section 1: the 112x112 crop in [0, 1]
passed through :func:`map_pixels`) into a grid of discrete visual tokens, flattened row-major:
``[B, 3, h, w] -> [B, (h / 8) * (w / 8)]`` with values in ``[0, vocab_size)``.

Tokenizers always compute in fp32, without gradients, with autocast switched off, whatever the caller
is doing (the pretraining loop runs under bf16/fp16 autocast: the targets must not depend on that).
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor, nn

from ..utils.amp import autocast_or_null

__all__ = ["VisualTokenizer", "map_pixels", "unmap_pixels", "LOGIT_LAPLACE_EPS", "tokenize"]

# The one definition of DALL-E's pixel mapping; beit_fast.data.transforms (the data pipeline) re-exports it.
#: The ``eps`` of OpenAI's ``dall_e.utils.logit_laplace_eps``.
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """``[0, 1] -> [eps, 1 - eps]``: ``(1 - 2 * eps) * x + eps`` (as ``dall_e.utils.map_pixels``)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Inverse of :func:`map_pixels`, clamped to ``[0, 1]`` (as ``dall_e.utils.unmap_pixels``)."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class VisualTokenizer(nn.Module, abc.ABC):
    """Abstract visual tokenizer.

    Attributes (set by subclasses):
        vocab_size: number of distinct tokens (8192 for DALL-E).
        input_size: side of the square tokenizer view it expects (112 in BEiT).
        downsample: spatial reduction factor (8: 112x112 -> 14x14 tokens).
    """

    vocab_size: int
    input_size: int
    downsample: int = 8

    def token_grid(self, h: int | None = None, w: int | None = None) -> tuple[int, int]:
        """Token grid ``(h / downsample, w / downsample)`` for an ``h x w`` view (default: input_size)."""
        h = self.input_size if h is None else h
        w = h if w is None else w
        return h // self.downsample, w // self.downsample

    @property
    def num_tokens(self) -> int:
        """Tokens per image at ``input_size`` (196 for 112 / 8)."""
        gh, gw = self.token_grid()
        return gh * gw

    #: Module types whose weights autocast casts to its lower precision on every call (their weights can be kept
    #: in that precision instead, :meth:`keep_weights_in`).
    _AUTOCAST_CAST = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

    def keep_weights_in(self, dtype: torch.dtype) -> "VisualTokenizer":
        """Cast the weights that autocast to ``dtype`` would cast on every call (convolutions, linears) once,
        now: the same token ids under ``autocast(dtype)``, without a cast of every weight each step. The module
        then runs only under that autocast (its fp32 path, :meth:`get_codebook_indices`, no longer). Returns self."""
        for module in self.modules():
            if isinstance(module, self._AUTOCAST_CAST) or getattr(module, "autocast_lower_precision", False):
                module.to(dtype)
        return self

    def _param_device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _prepare_images(self, images: Tensor) -> Tensor:
        """Validate ``[B, 3, h, w]`` (h, w multiples of ``downsample``) and return an fp32 copy/view on
        the tokenizer's device."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, h, w], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image side {h}x{w} is not a multiple of the tokenizer's downsampling factor {self.downsample}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in the map_pixels range [0.1, 0.9], got dtype {images.dtype}"
            )
        return images.to(device=self._param_device(), dtype=torch.float32)

    @abc.abstractmethod
    def encode_logits(self, images: Tensor) -> Tensor:
        """fp32 logits ``[B, vocab_size, h / 8, w / 8]`` for ``images`` in the map_pixels range."""

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """Tokens ``[B, (h / 8) * (w / 8)]`` (int64, row-major, in ``[0, vocab_size)``).

        ``images``: ``[B, 3, h, w]`` float in the map_pixels range (``map_pixels`` of a [0, 1] image).
        Always computed in fp32 with autocast off and the module temporarily in eval mode.
        """
        x = self._prepare_images(images)
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = self.encode_logits(x)
        finally:
            if was_training:
                self.train(True)
        return logits.float().argmax(dim=1).flatten(1)


@torch.no_grad()
def tokenize(tokenizer: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None,
             encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Token ids ``int64[B, h*w]``; ``dtype`` None: the tokenizer's own fp32 path, else its encoder under
    autocast to ``dtype`` with channels-last activations, the argmax taken on the ``dtype`` logits (the same
    ids as on their fp32 copy, ties included: the conversion is exact and monotone). ``encode``: the
    tokenizer's ``encode_logits`` to call (e.g. compiled; default: the method itself)."""
    if dtype is None:
        return tokenizer.get_codebook_indices(images)
    x = tokenizer._prepare_images(images).contiguous(memory_format=torch.channels_last)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with autocast_or_null(x.device.type, dtype):
            logits = (encode or tokenizer.encode_logits)(x)
    finally:
        tokenizer.train(was_training)
    return logits.argmax(dim=1).flatten(1)
