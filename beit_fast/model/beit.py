"""The BEiT Transformer: one encoder trunk for masked image modeling and for classification.

Module and parameter names follow the official ``modeling_pretrain.py`` (the pretraining model) and
``modeling_finetune.py`` (the classifier) exactly, so official checkpoints load with ``strict=True``
(``checkpoint["model"]``). Both models are a :class:`BeitEncoder`: patch embedding, [CLS], optional absolute
position embedding, the block loop with a shared and/or per-block relative position bias, activation
checkpointing and drop path are written once there, and the models add their own heads. Attention runs
through :mod:`beit_fast.ops.attention`; its "math" backend (the default) is the eager reference, op for op.
Everything else is plain PyTorch, written for clarity: it is the reference that every fast path is tested
against, and ``configure_fast_path`` switches the same modules to the fast implementations.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..ops.attention import attention_with_bias, attention_with_rel_pos_bias, canonical_attention_backend
from ..ops.rel_pos import gather_relative_position_bias, relative_position_index, relative_position_table_size

__all__ = [
    "BeitConfig",
    "MODEL_CONFIGS",
    "get_config",
    "relative_position_index",
    "relative_position_table_size",
    "RelativePositionBias",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
    "BeitEncoder",
    "VisionTransformerForMaskedImageModeling",
    "masked_index",
    "build_model",
    "VisionTransformerForClassification",
    "build_classifier",
]


@dataclass
class BeitConfig:
    """Architecture of a BEiT pretraining model. Defaults are BEiT-B/16 at 224 with an 8192 vocabulary."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 8192
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    init_values: float = 0.1  # LayerScale init; 0 disables LayerScale (no gamma parameters)
    use_abs_pos_emb: bool = False
    use_shared_rel_pos_bias: bool = True
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "vocab_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BeitConfig.{name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.init_values < 0:
            raise ValueError(f"init_values must be >= 0, got {self.init_values}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_CONFIGS: dict[str, BeitConfig] = {
    # For tests and the CPU demo: the full method at 224/16, a narrow and shallow backbone.
    "tiny": BeitConfig(embed_dim=128, depth=4, num_heads=4, drop_path_rate=0.0),
    "small": BeitConfig(embed_dim=384, depth=12, num_heads=6),
    "base": BeitConfig(embed_dim=768, depth=12, num_heads=12),
    "large": BeitConfig(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}


def get_config(name: str, **overrides) -> BeitConfig:
    """A named config (``tiny``, ``small``, ``base``, ``large``) with optional field overrides."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    return replace(MODEL_CONFIGS[name], **overrides)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at +-std, as the official pretraining code does (not at +-2)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def shared_bias_arg(rel_pos_bias: "RelativePositionBias | None", blocks: nn.ModuleList):
    """What a model passes its blocks for the shared relative position bias: the ``(table, index)`` pair when
    a block's attention backend is "triton" (its kernel gathers the bias from the table), otherwise the
    gathered ``[heads, N+1, N+1]`` bias, computed once for all blocks; None without a shared bias."""
    if rel_pos_bias is None:
        return None
    if any(blk.attn.attn_backend == "triton" for blk in blocks):
        return rel_pos_bias.relative_position_bias_table, rel_pos_bias.relative_position_index
    return rel_pos_bias()


def init_vit_weights_(model: nn.Module, std: float, tokens: tuple[torch.Tensor, ...]) -> None:
    """The official BEiT initialisation, in place: truncated normal (cut at +-std) for ``model.pos_embed``
    (if any), then each of ``tokens``, every Linear/Conv2d weight (biases zero), LayerNorms at (1, 0),
    then each block's output projections divided by sqrt(2 * layer_id)."""
    with torch.no_grad():
        if getattr(model, "pos_embed", None) is not None:
            trunc_normal_(model.pos_embed, std)
        for t in tokens:
            trunc_normal_(t, std)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer_id, block in enumerate(model.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks: table ``[T, heads]``, output ``[heads, N+1, N+1]``."""

    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.num_relative_distance = relative_position_table_size(self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        # Persistent, as in the official code: official checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

    def forward(self) -> torch.Tensor:
        return gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, P, stride P): ``[B, C, H, W] -> [B, N, D]`` with N = (H/P)(W/P), row-major."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if (h, w) != self.img_size:
            raise ValueError(f"input image size {h}x{w} does not match the model's {self.img_size[0]}x{self.img_size[1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep)
        return x * random_tensor / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases (no k bias) and an additive relative position bias.

    ``window_size=(Gh, Gw)`` gives the module its own relative position bias (the fine-tuning model's
    per-block bias, official ``modeling_finetune.Attention``): a zero-initialised
    ``relative_position_bias_table [relative_position_table_size((Gh, Gw)), heads]`` and a
    ``relative_position_index`` buffer (official key names ``blocks.{i}.attn.relative_position_*``;
    persistent as officially, ``persistent_index=False`` for timm's layout). As in the official code, that
    bias and a ``rel_pos_bias`` passed to ``forward`` (the shared one) are both added when both exist.
    Without ``window_size`` (the pretraining model) the bias comes from outside only.

    The attention itself is :func:`beit_fast.ops.attention.attention_with_bias` (or, with the "triton"
    backend and a table, ``attention_with_rel_pos_bias``) with backend ``attn_backend``: "math" (default,
    the eager reference), "auto", "sdpa", "flex", "xformers" or "triton"; "reference" is a deprecated alias
    of "math".
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, window_size: tuple[int, int] | None = None,
        *, persistent_index: bool = True, backend: str = "math",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        if window_size is not None:
            self.window_size = tuple(window_size)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(relative_position_table_size(self.window_size), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.window_size),
                                 persistent=persistent_index)
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = backend

    @property
    def attn_backend(self) -> str:
        """The ``beit_fast.ops.attention`` backend name (set: checked, "reference" mapped to "math")."""
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = canonical_attention_backend(name, stacklevel=3)  # via nn.Module.__setattr__

    def qkv_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, D] -> q, k, v``, each ``[B, heads, N, D/heads]``."""
        b, n, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        if type(self.qkv) is nn.Linear:  # the reference: one F.linear with the q/v bias, as officially
            qkv = F.linear(x, self.qkv.weight, bias)
        else:  # a swapped-in linear (torchao's Float8Linear, --fp8) does its own matmul; the bias follows
            qkv = self.qkv(x)
            if bias is not None:
                qkv = qkv + bias.to(qkv.dtype)
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def table_bias(self) -> torch.Tensor | None:
        """This module's own relative position bias ``[heads, N+1, N+1]`` (None without a window)."""
        if self.relative_position_bias_table is None:
            return None
        return gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)

    def _table_and_index(self, rel_pos_bias) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bias as ``(table, index)`` for the "triton" backend (its kernel gathers it; the official "own +
        shared" sum is a sum of tables), or None where a dense bias is used."""
        if self.attn_backend != "triton":
            return None
        own = self.relative_position_bias_table
        if isinstance(rel_pos_bias, tuple):
            table, index = rel_pos_bias
            return (table, index) if own is None else (own + table, self.relative_position_index)
        if rel_pos_bias is None and own is not None:
            return own, self.relative_position_index
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        rel_pos_bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``softmax(q k^T * scale + own bias + rel_pos_bias) v`` -> ``[B, heads, N, D/heads]``, through the
        ops layer with backend ``attn_backend``."""
        table_index = self._table_and_index(rel_pos_bias)
        if table_index is not None:
            return attention_with_rel_pos_bias(q, k, v, *table_index, self.scale, backend=self.attn_backend)
        if isinstance(rel_pos_bias, tuple):
            rel_pos_bias = gather_relative_position_bias(*rel_pos_bias)
        own = self.table_bias()
        if own is not None:
            rel_pos_bias = own if rel_pos_bias is None else own + rel_pos_bias
        return attention_with_bias(q, k, v, rel_pos_bias, self.scale, backend=self.attn_backend)

    def forward(
        self, x: torch.Tensor, rel_pos_bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [B, N, D] -> [B, N, D]``. ``rel_pos_bias``: the shared bias (broadcastable to
        ``[B, heads, N, N]``, e.g. ``RelativePositionBias()``'s ``[heads, N, N]``), its ``(table, index)``
        pair (what the models pass when a block's attention backend is "triton"), or None."""
        b, n, _ = x.shape
        q, k, v = self.qkv_projection(x)
        out = self.attend(q, k, v, rel_pos_bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, backend={self.attn_backend!r}"


class Block(nn.Module):
    """Pre-norm Transformer block with LayerScale (``gamma_1``, ``gamma_2``) and drop path."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
        init_values: float, eps: float, window_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, window_size=window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self, x: torch.Tensor, rel_pos_bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class BeitEncoder(nn.Module):
    """The BEiT Transformer trunk shared by the pretraining model and the classifier.

    Built by :meth:`_build_trunk` in the official registration order (state-dict keys without any prefix):
    ``patch_embed.proj.*``, ``cls_token``, ``mask_token`` (pretraining only), ``pos_embed``
    (``cfg.use_abs_pos_emb``), ``rel_pos_bias.*`` (``cfg.use_shared_rel_pos_bias``, one table for all
    blocks), ``blocks.{i}.*`` (with their own ``attn.relative_position_*`` when given a window); the
    subclasses add the final norm and their heads.

    Fast-path switches (:meth:`configure_fast_path` of each model): the attention backend of every block,
    the fused patch embedding (``fused_embed_backend``), activation checkpointing (``checkpoint_blocks``).
    The defaults are the eager reference.
    """

    cfg: BeitConfig

    def _build_trunk(self, cfg: BeitConfig, *, mask_token: bool, block_window: tuple[int, int] | None) -> None:
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_features = self.embed_dim = dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim)) if cfg.use_abs_pos_emb else None
        self.rel_pos_bias = (
            RelativePositionBias(self.patch_embed.patch_shape, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        )
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.init_values, cfg.layer_norm_eps,
                  window_size=block_window)
            for i in range(cfg.depth)
        )
        self.fused_embed_backend: str | None = None
        self.checkpoint_blocks: frozenset[int] = frozenset()

    def no_weight_decay(self) -> set[str]:
        """Names the official optimizer factories exempt from weight decay (besides 1-D params and biases):
        ``pos_embed`` and ``cls_token``. The bias tables and ``mask_token`` are decayed, as officially (the
        fine-tuning CLI's ``--disable_weight_decay_on_rel_pos_bias`` exempts the tables)."""
        return {"pos_embed", "cls_token"}

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def set_drop_path_rate(self, rate: float):
        """Stochastic depth rate, linear from 0 (first block) to ``rate`` (last), as at construction."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        dpr = torch.linspace(0, rate, len(self.blocks), device="cpu").tolist()
        for p, blk in zip(dpr, self.blocks):
            blk.drop_path = DropPath(p) if p > 0 else nn.Identity()
        self.cfg = replace(self.cfg, drop_path_rate=float(rate))
        return self

    def _configure_trunk(self, attention: str, fused_embed: str | None, activation_checkpointing: str | int | None):
        """Set the trunk's fast-path switches (see the models' ``configure_fast_path``); returns self."""
        attention = canonical_attention_backend(attention, stacklevel=3)  # warn at the configure_fast_path call
        for blk in self.blocks:
            blk.attn.attn_backend = attention
        self.fused_embed_backend = fused_embed
        self.checkpoint_blocks = checkpoint_block_ids(activation_checkpointing, len(self.blocks))
        return self

    def embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask-token substitution (with ``bool_masked_pos [B, N]``; pretraining), [CLS],
        absolute position embedding: ``[B, N+1, D]``."""
        b = x.shape[0]
        n = self.patch_embed.num_patches
        if tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the model's "
                             f"{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]}")
        if bool_masked_pos is not None and self.mask_token is None:
            raise ValueError("bool_masked_pos was given to a model without a mask_token (the classifier)")
        if bool_masked_pos is not None and bool_masked_pos.shape != (b, n):
            raise ValueError(f"bool_masked_pos must have shape {(b, n)}, got {tuple(bool_masked_pos.shape)}")
        if self.fused_embed_backend is not None:
            from ..ops.patch_embed import patch_embed_mask

            proj = self.patch_embed.proj
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            token = self.mask_token if self.mask_token is not None else proj.weight.new_zeros(proj.weight.shape[0])
            x = patch_embed_mask(
                x.to(dtype), proj.weight.to(dtype), proj.bias.to(dtype), token.view(-1),
                bool_masked_pos, backend=self.fused_embed_backend,
            )
        else:
            x = self.patch_embed(x)
            if bool_masked_pos is not None:
                w = bool_masked_pos.unsqueeze(-1).type_as(x)
                x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Every block on tokens ``[B, N+1, D]``, with the shared relative position bias (gathered once for
        all blocks) and activation checkpointing of the blocks in ``checkpoint_blocks`` when gradients are on."""
        rel_pos_bias = shared_bias_arg(self.rel_pos_bias, self.blocks)
        for i, blk in enumerate(self.blocks):
            x = self._run_block(i, blk, x, rel_pos_bias)
        return x

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, rel_pos_bias) -> torch.Tensor:
        if i in self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
        return blk(x, rel_pos_bias)


def checkpoint_block_ids(activation_checkpointing: str | int | None, depth: int) -> frozenset[int]:
    """Blocks recomputed in the backward: "none" / 0 / None: none; "all": every block; k >= 1: every k-th
    block (0-based ids k-1, 2k-1, ...)."""
    if activation_checkpointing in ("none", 0, None):
        return frozenset()
    if activation_checkpointing == "all":
        return frozenset(range(depth))
    try:
        every = int(activation_checkpointing)
    except (TypeError, ValueError):
        every = 0
    if every <= 0 or isinstance(activation_checkpointing, bool):
        raise ValueError(f"activation_checkpointing must be 'none', 'all' or k >= 1, got {activation_checkpointing!r}")
    return frozenset(range(every - 1, depth, every))


class VisionTransformerForMaskedImageModeling(BeitEncoder):
    """BEiT pretraining model (official name and state-dict layout): the trunk with a mask token, the
    final ``norm`` and ``lm_head``.

    ``forward(x [B, 3, H, W] float, bool_masked_pos [B, N] bool) -> logits [M, vocab]`` where M is the
    number of masked patches in the batch, in row-major order of ``bool_masked_pos`` (the order of
    ``tokens[bool_masked_pos]``). The head runs on masked positions only.
    """

    def __init__(self, cfg: BeitConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = replace(cfg or BeitConfig(), **overrides)
        self._build_trunk(cfg, mask_token=True, block_window=None)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation, including the 1/sqrt(2l) rescale of each block's output layers."""
        init_vit_weights_(self, self.cfg.init_std, (self.cls_token, self.mask_token))

    def configure_fast_path(
        self, attention: str = "auto", fused_embed: str | None = "auto", activation_checkpointing: str | int = "none"
    ) -> "VisionTransformerForMaskedImageModeling":
        """Switch parts of the forward to the fast implementations; results stay those of the reference.

        ``attention``: a backend of ``beit_fast.ops.attention_with_bias`` ("math": the eager reference;
        "auto", "sdpa", "flex", "xformers", "triton"; with "triton" the blocks get the shared table and
        index, and the kernel gathers the bias; "reference": deprecated alias of "math").
        ``fused_embed``: None keeps Conv2d + blend, else the ``beit_fast.ops.patch_embed_mask`` backend
        ("auto", "triton", "reference").
        ``activation_checkpointing``: "none", "all", or k to recompute every k-th block (blocks k-1, 2k-1, ...).
        """
        return self._configure_trunk(attention, fused_embed, activation_checkpointing)

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: ``[B, N+1, D]`` ([CLS] first)."""
        if bool_masked_pos is None:
            raise ValueError("bool_masked_pos is required: [B, N] bool, True = masked")
        return self.norm(self.forward_blocks(self.embed(x, bool_masked_pos)))

    def forward_masked_hidden(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor, num_masked: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of masked patches with static shapes, for a fused head + loss.

        Returns ``hidden [B * K, D]`` and ``index [B, K]`` (int64) with K = ``num_masked``: for each image
        the positions of its masked patches in row-major order, padded with unmasked positions when the
        image has fewer than K (``bool_masked_pos.gather(1, index)`` tells which rows are real). Gathering
        labels with the same index and ignoring the padded rows reproduces ``tokens[bool_masked_pos]``.
        """
        feats = self.forward_features(x, bool_masked_pos)[:, 1:]
        index = masked_index(bool_masked_pos, num_masked)
        hidden = feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return hidden.reshape(-1, feats.shape[-1]), index

    def forward(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor, return_all_tokens: bool = False
    ) -> torch.Tensor:
        x = self.forward_features(x, bool_masked_pos)[:, 1:]
        if return_all_tokens:
            return self.lm_head(x)
        return self.lm_head(x[bool_masked_pos])


def masked_index(bool_masked_pos: torch.Tensor, num_masked: int) -> torch.Tensor:
    """``int64[B, K]``: masked positions first, in row-major order (stable sort), then unmasked ones."""
    if not 0 < num_masked <= bool_masked_pos.shape[1]:
        raise ValueError(f"num_masked must be in [1, {bool_masked_pos.shape[1]}], got {num_masked}")
    order = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, descending=True, stable=True)
    return order[:, :num_masked]


def build_model(name_or_cfg: str | BeitConfig = "base", **overrides) -> VisionTransformerForMaskedImageModeling:
    """Build a pretraining model from a named config or a :class:`BeitConfig`, with field overrides."""
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    return VisionTransformerForMaskedImageModeling(replace(cfg, **overrides))


# --------------------------------------------------------------------------------------------------
# Fine-tuning: image classification (official ``modeling_finetune.VisionTransformer``)
# --------------------------------------------------------------------------------------------------
class VisionTransformerForClassification(BeitEncoder):
    """BEiT image classifier with the official fine-tuning state-dict layout: the trunk (no mask token),
    per-block relative position biases, the pooling norm and ``head``.

    Keys: ``patch_embed.proj.*``, ``cls_token``, ``pos_embed`` (``cfg.use_abs_pos_emb``),
    ``rel_pos_bias.*`` (``cfg.use_shared_rel_pos_bias``), ``blocks.{i}.*`` (with
    ``blocks.{i}.attn.relative_position_bias_table`` / ``relative_position_index`` when
    ``use_rel_pos_bias``, the per-block bias), ``norm.*`` (only with [CLS] pooling: with mean pooling
    ``norm`` is an ``nn.Identity``), ``fc_norm.*`` (mean pooling only), ``head.*``. No ``mask_token``.

    ``forward(x [B, 3, H, W]) -> logits [B, num_classes]``. Mean pooling (default, the paper's):
    ``head(fc_norm(mean of the patch tokens))``, [CLS] excluded; otherwise ``head(norm(x)[:, 0])``.
    Initialisation: the pretraining model's (trunc-normal std 0.02 truncated at +-0.02, 1/sqrt(2l)
    rescale of ``attn.proj`` / ``mlp.fc2``), zero bias tables, then the head's weight and bias
    multiplied by ``init_scale`` (0.001). (The official fine-tuning init leaves the patch-embedding
    conv at PyTorch's default and truncates the normal at +-2; moot when pretrained weights are loaded.)
    ``num_classes=0``: no head (``nn.Identity``), ``forward`` returns the pooled features.
    The fast path (:meth:`configure_fast_path`): fused attention with the per-block (and shared) tables,
    activation checkpointing; static shapes throughout, so the model compiles to one graph
    (:func:`beit_fast.train.loss.build_finetune_loss` builds the compiled fine-tuning loss around it).
    """

    def __init__(
        self, cfg: BeitConfig, num_classes: int, *, use_mean_pooling: bool = True, use_rel_pos_bias: bool = True,
        init_scale: float = 0.001,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.use_mean_pooling = bool(use_mean_pooling)
        self.use_rel_pos_bias = bool(use_rel_pos_bias)
        self.init_scale = float(init_scale)
        grid = (cfg.grid_size, cfg.grid_size)
        self._build_trunk(cfg, mask_token=False, block_window=grid if use_rel_pos_bias else None)
        dim = cfg.embed_dim
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps) if use_mean_pooling else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The pretraining initialisation (incl. the 1/sqrt(2l) rescale), then the head scaled by init_scale."""
        init_vit_weights_(self, self.cfg.init_std, (self.cls_token,))
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(self.init_scale)
            self.head.bias.mul_(self.init_scale)

    def configure_fast_path(
        self, attention: str = "auto", activation_checkpointing: str | int = "none", fused_embed: str | None = None,
    ) -> "VisionTransformerForClassification":
        """Switch parts of the forward to the fast implementations; results stay those of the reference.

        ``attention``: an ``attention_with_bias`` backend ("math": the eager reference; "auto", "sdpa",
        "flex", "xformers", "triton": the kernel gathers each block's own table (plus the shared one) in
        place of a dense bias; "reference": deprecated alias of "math").
        ``activation_checkpointing``: "none", "all", or k to recompute every k-th block (blocks k-1, 2k-1, ...).
        ``fused_embed``: None keeps the Conv2d patch embedding, else a ``patch_embed_mask`` backend ("auto",
        "triton", "reference"; without a mask it is the patch projection alone).
        """
        return self._configure_trunk(attention, fused_embed, activation_checkpointing)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Block output tokens ``[B, N+1, D]`` -> pooled, normalised features ``[B, D]``: fc_norm(mean of the
        patch tokens), or norm(x)[:, 0]."""
        x = self.norm(x)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(1))
        return x[:, 0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled and normalised features ``[B, D]``: fc_norm(mean of patch tokens), or norm(x)[:, 0]."""
        return self.pool(self.forward_blocks(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_layer_features(
        self, x: torch.Tensor, layers, include_cls: bool = False
    ) -> list[torch.Tensor]:
        """Average-pooled patch tokens of intermediate blocks, for linear probing: one ``[B, D]`` tensor per
        entry of ``layers`` (1-based block indices, 1..depth), in that order: the mean over the patch
        tokens ([CLS] excluded) of that block's output, before any final norm. One forward pass that stops
        after the deepest requested block. ``include_cls=True`` returns ``[B, 2D]``: [CLS] then the mean
        (the official ``run_linear_eval.py`` representation)."""
        layers = [int(layer) for layer in layers]
        depth = len(self.blocks)
        if not layers:
            raise ValueError("layers must name at least one block")
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(f"layers must be block indices in 1..{depth}, got {bad}")
        wanted = set(layers)
        x = self.embed(x)
        rel_pos_bias = shared_bias_arg(self.rel_pos_bias, self.blocks)
        found: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(layers)]):
            x = self._run_block(i, blk, x, rel_pos_bias)
            if i + 1 in wanted:
                pooled = x[:, 1:].mean(1)
                found[i + 1] = torch.cat((x[:, 0], pooled), dim=-1) if include_cls else pooled
        return [found[layer] for layer in layers]


def build_classifier(
    name_or_cfg: str | BeitConfig, num_classes: int, *, use_mean_pooling: bool = True, use_rel_pos_bias: bool = True,
    init_scale: float = 0.001, **cfg_overrides,
) -> VisionTransformerForClassification:
    """A fine-tuning classifier from a named config or a :class:`BeitConfig`, with field overrides.

    As in the official fine-tuning, the relative position bias is per block (``use_rel_pos_bias``) and
    not shared: ``use_shared_rel_pos_bias`` defaults to False here (pass it in ``cfg_overrides`` to keep a
    shared table). ``vocab_size`` is accepted and ignored (the classifier has no token head).
    """
    cfg_overrides.setdefault("use_shared_rel_pos_bias", False)
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    return VisionTransformerForClassification(
        replace(cfg, **cfg_overrides), num_classes, use_mean_pooling=use_mean_pooling,
        use_rel_pos_bias=use_rel_pos_bias, init_scale=init_scale,
    )
