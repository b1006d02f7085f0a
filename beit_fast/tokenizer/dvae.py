"""Our own discrete VAE tokenizer (paper section 2.1.2 / appendix C; DALL-E-style training).

Model
    encoder: three stride-2 4x4 convs (3 -> c0 -> c1 -> c2, 8x downsampling), each followed by
    ``num_res_blocks`` residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv, scaled by
    ``1 / n_res_blocks_total``), then ReLU and a 1x1 conv to ``vocab_size`` logits per position.
    codebook: ``vocab_size x code_dim`` embedding.
    decoder: the mirror image: 1x1 conv code_dim -> c2, residual blocks, three stride-2 4x4 transposed
    convs (c2 -> c1 -> c0 -> 3), sigmoid, then ``map_pixels`` so reconstructions live in the same
    ``[eps, 1 - eps]`` range as the input. No normalisation layers and no dropout, so train and eval
    mode compute the same logits.

Relaxation
    Training (``model.train()``): Gumbel-softmax sample ``softmax((logits + g) / T)`` over the vocabulary,
    soft one-hot times codebook. Tokenizing and eval-mode forward: hard argmax (one-hot), the same codes
    that :meth:`DiscreteVAE.get_codebook_indices` returns and :meth:`DiscreteVAE.decode_indices` decodes.
    ``T`` is annealed exponentially from ``temperature_start`` (1) to ``temperature_end`` (1/16).

Objective (see :meth:`DiscreteVAE.loss`)
    ``loss = recon + kl_weight(step) * kl`` where ``recon`` is the mean squared error (``recon_loss="mse"``,
    default) or mean absolute error (``"l1"``) per pixel value between the reconstruction and the input,
    both on the map_pixels scale, and ``kl`` is the mean over token positions of ``KL(q || uniform)`` in
    nats (q = softmax of the logits). ``kl_weight`` ramps linearly from 0 to its final value over
    ``kl_warmup_steps``. DALL-E's beta = 6.6 multiplies a per-image KL sum against a logit-Laplace
    log-likelihood summed over pixels; with our per-value MSE the useful weight is far smaller (3e-4, tuned
    on the scikit-image demo: see ``PRESETS``). Too much KL keeps every position's distribution flat, so
    hard codes reconstruct poorly; none lets the codebook usage collapse.

Checkpoint
    ``dict(config=asdict(cfg), model=state_dict, step=int, metrics=dict)``, written atomically
    (:func:`beit_fast.utils.checkpoint.atomic_save`), read by :meth:`DiscreteVAE.from_checkpoint` through
    :func:`load_dvae_checkpoint` (``weights_only=True`` and a layout check).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, UnsafeCheckpointError, atomic_save, load_checkpoint
from ..utils.limits import DVAE_LIMITS, check_config_limits, check_parameter_budget, check_tensors_hold_their_bytes
from ..utils.options import DVAE_RECOMMENDED_LR
from .base import LOGIT_LAPLACE_EPS, VisualTokenizer

__all__ = [
    "DVAEConfig", "DiscreteVAE", "PRESETS", "RECOMMENDED_LR", "gumbel_softmax", "temperature_at", "kl_weight_at",
    "load_dvae_checkpoint",
]


@dataclass
class DVAEConfig:
    """Architecture and training-schedule settings of :class:`DiscreteVAE`.

    ``temperature_anneal_steps`` / ``kl_warmup_steps`` = ``None`` mean: the whole run / 10% of the run
    (resolved by :func:`temperature_at` / :func:`kl_weight_at` from the run's total steps).
    """

    vocab_size: int = 8192
    code_dim: int = 256
    hidden: int = 128
    channel_mult: tuple[int, int, int] = (1, 2, 4)
    num_res_blocks: int = 2
    input_size: int = 112
    recon_loss: str = "mse"
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_anneal_steps: int | None = None
    kl_weight: float = 3e-4
    kl_warmup_steps: int | None = None
    logit_init_std: float = 1.0
    eps: float = LOGIT_LAPLACE_EPS

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if len(self.channel_mult) != 3:
            raise ValueError(f"channel_mult must have 3 entries (3 stride-2 stages = 8x), got {self.channel_mult}")
        if self.vocab_size < 2 or self.code_dim < 1 or self.hidden < 1 or self.num_res_blocks < 0:
            raise ValueError("vocab_size >= 2, code_dim >= 1, hidden >= 1, num_res_blocks >= 0 required")
        if self.input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {self.input_size}")
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ValueError("temperatures must be > 0")
        if self.kl_weight < 0:
            raise ValueError("kl_weight must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DVAEConfig":
        """``DVAEConfig.preset("tiny", vocab_size=1024)``: a named preset with overrides (None = keep)."""
        if name not in PRESETS:
            raise ValueError(f"unknown dVAE preset {name!r}; choose from {sorted(PRESETS)}")
        base = PRESETS[name]
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DVAEConfig fields {sorted(unknown)}")
        return cls(**dict(d))


#: ``default``: a full-size tokenizer for real datasets (GPU; its kl_weight is the value tuned on the tiny
#: demo, not tuned at scale). ``tiny``: a CPU demo (16/32/64 channels, 512 codes) that trains in one to two
#: minutes on the scikit-image photographs (``python -m beit_fast.train_tokenizer``). Tuning record
#: (tiny, 300 steps x 16 crops, eval on 128 crops of held-out photos, MSE on [0, 1]): lr 5e-3 with
#: kl_weight 3e-4 -> 66-92 codes used, MSE 0.0097-0.0100 over three seeds; kl_weight 1e-3 -> 231 codes
#: but MSE 0.025; at lr 2e-3, kl_weight 0 -> 17 codes (MSE 0.015). Each crop's mean colour: MSE 0.036.
PRESETS: dict[str, DVAEConfig] = {
    "default": DVAEConfig(kl_weight=3e-4),
    "tiny": DVAEConfig(vocab_size=512, code_dim=64, hidden=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                       kl_weight=3e-4),
}

#: Peak AdamW learning rates used by the CLI when ``--lr`` is not given (defined in :mod:`beit_fast.utils.options`).
RECOMMENDED_LR: dict[str, float] = DVAE_RECOMMENDED_LR


# --------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------
def temperature_at(step: int, cfg: DVAEConfig, total_steps: int) -> float:
    """Exponential anneal ``T0 * (T1 / T0) ** min(step / n, 1)`` with ``n = temperature_anneal_steps``
    (default: ``total_steps``): ``temperature_start`` at step 0, ``temperature_end`` from step n on."""
    n = cfg.temperature_anneal_steps if cfg.temperature_anneal_steps is not None else total_steps
    frac = 1.0 if n <= 0 else min(max(step, 0) / n, 1.0)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac


def kl_weight_at(step: int, cfg: DVAEConfig, total_steps: int) -> float:
    """Linear ramp from 0 at step 0 to ``kl_weight`` at ``kl_warmup_steps`` (default: 10% of the run)."""
    n = cfg.kl_warmup_steps if cfg.kl_warmup_steps is not None else max(1, total_steps // 10)
    if n <= 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(max(step, 0) / n, 1.0)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
def gumbel_softmax(logits: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """Relaxed one-hot sample ``softmax((logits + g) / T)``, ``g = -log(-log(u))``, ``u ~ U(0, 1)``
    (same distribution as ``F.gumbel_softmax(hard=False)``, cheaper noise on CPU)."""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
    g = u.log_().neg_().log_().neg_()
    return F.softmax((logits.float() + g) / temperature, dim=dim)


class _ResBlock(nn.Module):
    """``x + gain * conv1x1(relu(conv3x3(relu(x))))`` (VQ-VAE style residual, DALL-E style post gain)."""

    def __init__(self, c: int, gain: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gain * self.conv2(F.relu(self.conv1(F.relu(x))))


def _res_stack(c: int, n: int, gain: float) -> list[nn.Module]:
    return [_ResBlock(c, gain) for _ in range(n)]


class DiscreteVAE(VisualTokenizer):
    """Discrete VAE tokenizer with a Gumbel-softmax relaxation (see the module docstring)."""

    def __init__(self, cfg: DVAEConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = cfg if cfg is not None else DVAEConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.input_size = cfg.input_size
        self.downsample = 8
        c0, c1, c2 = (cfg.hidden * m for m in cfg.channel_mult)
        gain = 1.0 / max(1, 3 * cfg.num_res_blocks)
        n = cfg.num_res_blocks

        self.encoder = nn.Sequential(
            nn.Conv2d(3, c0, 4, stride=2, padding=1), *_res_stack(c0, n, gain),
            nn.Conv2d(c0, c1, 4, stride=2, padding=1), *_res_stack(c1, n, gain),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), *_res_stack(c2, n, gain),
            nn.ReLU(),
            nn.Conv2d(c2, cfg.vocab_size, 1),
        )
        self.codebook = nn.Embedding(cfg.vocab_size, cfg.code_dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, c2, 1), *_res_stack(c2, n, gain),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), *_res_stack(c1, n, gain),
            nn.ConvTranspose2d(c1, c0, 4, stride=2, padding=1), *_res_stack(c0, n, gain),
            nn.ReLU(),
            nn.ConvTranspose2d(c0, 3, 4, stride=2, padding=1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal convs with zero biases (PyTorch's default init shrinks the signal ~2x per layer, which
        leaves the initial logits nearly position-independent and the Gumbel noise dominant: the decoder
        then learns to ignore the codes), unit-variance logits at init, N(0, 1) codebook."""
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)
        logits_conv = self.encoder[-1]
        nn.init.normal_(logits_conv.weight, std=self.cfg.logit_init_std / math.sqrt(logits_conv.in_channels))
        nn.init.normal_(self.codebook.weight, std=1.0)

    # --- encoder ---------------------------------------------------------------------------------------
    def encode_logits(self, images: Tensor) -> Tensor:
        """Logits ``[B, vocab_size, h/8, w/8]`` (fp32) for images in the map_pixels range (centred to
        ``2x - 1`` before the first conv)."""
        return self.encoder(images.float() * 2 - 1)

    # --- decoder ---------------------------------------------------------------------------------------
    def _decode_codes(self, z: Tensor) -> Tensor:
        """Code vectors ``[B, code_dim, gh, gw]`` -> reconstruction on the map_pixels scale."""
        eps = self.cfg.eps
        return (1 - 2 * eps) * torch.sigmoid(self.decoder(z)) + eps

    @torch.no_grad()
    def decode_indices(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Tokens ``[B, gh * gw]`` (row-major) -> images ``[B, 3, 8 gh, 8 gw]`` in ``[0, 1]``.

        ``grid`` defaults to a square grid (``gh = gw = sqrt(num tokens)``).
        """
        if indices.dim() != 2:
            raise ValueError(f"indices must be [B, h*w], got {tuple(indices.shape)}")
        n = indices.shape[1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens do not form a square grid: pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise ValueError(f"grid {grid} does not hold {n} tokens")
        if indices.min() < 0 or indices.max() >= self.vocab_size:
            raise ValueError(f"token values must be in [0, {self.vocab_size})")
        z = self.codebook(indices.long().to(self.codebook.weight.device))  # [B, n, D]
        z = z.transpose(1, 2).reshape(indices.shape[0], -1, *grid)
        return ((self._decode_codes(z) - self.cfg.eps) / (1 - 2 * self.cfg.eps)).clamp(0, 1)

    # --- training forward ------------------------------------------------------------------------------
    def forward(self, images: Tensor, temperature: float = 1.0, hard: bool | None = None) -> tuple[Tensor, Tensor]:
        """``(recon, logits)``: reconstruction ``[B, 3, H, W]`` on the map_pixels scale (same scale as the
        input) and the encoder logits ``[B, V, H/8, W/8]``.

        ``hard=None`` means: Gumbel-softmax relaxation with ``temperature`` in training mode, hard argmax
        codes in eval mode. ``hard=True`` forces argmax codes (no gradient reaches the encoder through
        them); ``hard=False`` forces the relaxation.
        """
        logits = self.encode_logits(images)
        use_hard = (not self.training) if hard is None else hard
        if use_hard:
            one_hot = F.one_hot(logits.argmax(dim=1), self.vocab_size).permute(0, 3, 1, 2).to(logits.dtype)
        else:
            one_hot = gumbel_softmax(logits, temperature)
        z = torch.einsum("bvhw,vd->bdhw", one_hot, self.codebook.weight)
        return self._decode_codes(z), logits

    def loss_terms(self, images: Tensor, recon: Tensor, logits: Tensor,
                   kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, recon_loss, kl)`` 0-dim fp32 tensors: ``recon_loss + kl_weight * KL(q || uniform)`` (see module
        docstring), without reading them on the host."""
        x = images.float()
        if self.cfg.recon_loss == "mse":
            rec = F.mse_loss(recon, x)
        else:
            rec = F.l1_loss(recon, x)
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.vocab_size))).sum(dim=1).mean()
        return rec + kl_weight * kl, rec, kl

    def loss(self, images: Tensor, recon: Tensor, logits: Tensor, kl_weight: float) -> tuple[Tensor, dict[str, float]]:
        """:meth:`loss_terms` as ``(loss, logs)``, the terms read as host floats (``loss``, ``recon``, ``kl``)."""
        total, rec, kl = self.loss_terms(images, recon, logits, kl_weight)
        return total, {"loss": float(total.detach()), "recon": float(rec.detach()), "kl": float(kl.detach())}

    # --- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_dict(self, step: int = 0, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return dict(config=asdict(self.cfg), model={k: v.detach().cpu() for k, v in self.state_dict().items()},
                    step=int(step), metrics=dict(metrics or {}))

    def save(self, path: str | os.PathLike, step: int = 0, metrics: Mapping[str, Any] | None = None) -> str:
        """Atomically write the checkpoint (:func:`beit_fast.utils.checkpoint.atomic_save`); returns the path."""
        return os.fspath(atomic_save(self.checkpoint_dict(step, metrics), path))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "DiscreteVAE":
        """Rebuild the model from a checkpoint written by :meth:`save` / ``train_dvae`` (eval mode).

        The checkpoint's ``step`` and ``metrics`` are attached as ``model.checkpoint_step`` /
        ``model.checkpoint_metrics``."""
        ckpt = load_dvae_checkpoint(path, map_location)
        model = cls(_checked_config(ckpt, os.fspath(path)))
        model.load_state_dict(ckpt["model"], strict=True)
        model.checkpoint_step = int(ckpt.get("step", 0))
        model.checkpoint_metrics = dict(ckpt.get("metrics", {}))
        return model.to(map_location).eval()


def _checked_config(ckpt: Mapping[str, Any], path: str) -> DVAEConfig:
    """The config of a dVAE checkpoint, checked before the model is allocated: each field within
    :data:`beit_fast.utils.limits.DVAE_LIMITS`, the weights backed by their own bytes, and a model (built on the
    meta device first) not much larger than the weights the file holds."""
    config, weights = ckpt["config"], ckpt["model"]
    if not isinstance(config, Mapping) or not isinstance(weights, Mapping):
        raise ValueError(f"{path} is not a beit_fast dVAE checkpoint (its config and model are not dicts)")
    check_config_limits(config, DVAE_LIMITS, f"{path}: config")
    mult = config.get("channel_mult", (1, 2, 4))
    if not isinstance(mult, (list, tuple)) or not all(isinstance(m, int) and 0 < m <= 64 for m in mult):
        raise ValueError(f"{path}: config: channel_mult {mult!r} must hold positive integers <= 64")
    try:
        cfg = DVAEConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: config: {e}") from None
    check_tensors_hold_their_bytes(weights, path)
    with torch.device("meta"):
        claimed = sum(p.numel() for p in DiscreteVAE(cfg).parameters())
    check_parameter_budget(claimed, weights.values(), path)
    return cfg


def load_dvae_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a dVAE checkpoint (:func:`beit_fast.utils.checkpoint.load_checkpoint`: checksums, ``weights_only=True``);
    clear errors for a missing file, a corrupt one or a wrong layout."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dVAE checkpoint not found: {path!r}")
    try:
        ckpt = load_checkpoint(path, map_location)
    except UnsafeCheckpointError as e:
        raise ValueError(f"{path} is not a beit_fast dVAE checkpoint (it holds pickled objects beyond tensors "
                         f"and plain containers; a DALL-E encoder.pkl? use kind='dalle'): {str(e)[:300]}") from None
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(ckpt, Mapping) or "config" not in ckpt or "model" not in ckpt:
        keys = list(ckpt.keys())[:6] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path} is not a beit_fast dVAE checkpoint (expected keys 'config' and 'model', found {keys})")
    return dict(ckpt)
