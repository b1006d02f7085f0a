"""The BEiT Transformer for masked image modeling: the eager reference.

Module and parameter names follow the official ``modeling_pretrain.py`` exactly, so an official
pretraining checkpoint loads with ``strict=True`` (``checkpoint["model"]``). Everything here is plain
PyTorch and written for clarity: it is the reference that every fast path is tested against.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = [
    "BeitConfig",
    "MODEL_CONFIGS",
    "get_config",
    "relative_position_index",
    "RelativePositionBias",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
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


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index into the relative position bias table for every (query, key) pair, ``int64[N+1, N+1]``.

    Patch i to patch j: ``(dh + Gh - 1) * (2 Gw - 1) + (dw + Gw - 1)``; [CLS] query to any key: T - 3;
    any query to the [CLS] key: T - 2; [CLS] to [CLS]: T - 1; T = (2Gh - 1)(2Gw - 1) + 3 table rows.
    """
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    num_table = (2 * gh - 1) * (2 * gw - 1) + 3
    index = torch.zeros((gh * gw + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
    index[0, :] = num_table - 3
    index[:, 0] = num_table - 2
    index[0, 0] = num_table - 1
    return index


def gather_relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table [T, heads]`` looked up at ``index int64[N+1, N+1]``: the bias ``[heads, N+1, N+1]``."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


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
        self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
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
    ``relative_position_bias_table [(2Gh-1)(2Gw-1)+3, heads]`` and a persistent
    ``relative_position_index`` buffer (official key names ``blocks.{i}.attn.relative_position_*``).
    As in the official code, that bias and a ``rel_pos_bias`` passed to ``forward`` (the shared one)
    are both added when both exist. Without ``window_size`` (the pretraining model) nothing changes.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, window_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
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
            num_rel = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.proj = nn.Linear(dim, dim)
        # "reference": the eager math below; any other name goes to beit_fast.ops.attention_with_bias.
        self.attn_backend = "reference"

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

    def forward(
        self, x: torch.Tensor, rel_pos_bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``rel_pos_bias``: the shared bias ``[heads, N+1, N+1]``, its ``(table, index)`` pair (what the
        models pass when a block's attention backend is "triton"), or None."""
        b, n, _ = x.shape
        q, k, v = self.qkv_projection(x)
        table_index = self._table_and_index(rel_pos_bias)
        if table_index is not None:
            from .ops.attention import attention_with_rel_pos_bias

            out = attention_with_rel_pos_bias(q, k, v, *table_index, self.scale, backend="triton")
            return self.proj(out.transpose(1, 2).reshape(b, n, -1))
        if isinstance(rel_pos_bias, tuple):
            rel_pos_bias = gather_relative_position_bias(*rel_pos_bias)
        if self.relative_position_bias_table is not None:
            own = self.table_bias()
            rel_pos_bias = own if rel_pos_bias is None else own + rel_pos_bias
        if self.attn_backend == "reference":
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if rel_pos_bias is not None:
                attn = attn + rel_pos_bias
            out = attn.softmax(dim=-1) @ v
        else:
            from .ops.attention import attention_with_bias

            out = attention_with_bias(q, k, v, rel_pos_bias, self.scale, backend=self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


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


class VisionTransformerForMaskedImageModeling(nn.Module):
    """BEiT pretraining model (official name and state-dict layout).

    ``forward(x [B, 3, H, W] float, bool_masked_pos [B, N] bool) -> logits [M, vocab]`` where M is the
    number of masked patches in the batch, in row-major order of ``bool_masked_pos`` (the order of
    ``tokens[bool_masked_pos]``). The head runs on masked positions only.
    """

    def __init__(self, cfg: BeitConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = replace(cfg or BeitConfig(), **overrides)
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_features = self.embed_dim = dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim)) if cfg.use_abs_pos_emb else None
        self.rel_pos_bias = (
            RelativePositionBias(self.patch_embed.patch_shape, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        )
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.init_values, cfg.layer_norm_eps)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(dim, cfg.vocab_size)
        # Fast-path switches (see configure_fast_path); the defaults are the eager reference.
        self.fused_embed_backend: str | None = None
        self.checkpoint_blocks: frozenset[int] = frozenset()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation, including the 1/sqrt(2l) rescale of each block's output layers."""
        init_vit_weights_(self, self.cfg.init_std, (self.cls_token, self.mask_token))

    def no_weight_decay(self) -> set[str]:
        """Names the official optimizer factory exempts from weight decay (besides 1-D params and biases)."""
        return {"pos_embed", "cls_token"}

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def configure_fast_path(
        self, attention: str = "auto", fused_embed: str | None = "auto", activation_checkpointing: str | int = "none"
    ) -> "VisionTransformerForMaskedImageModeling":
        """Switch parts of the forward to the fast implementations; results stay those of the reference.

        ``attention``: "reference" (the eager math) or a backend of ``beit_fast.ops.attention_with_bias``
        ("auto", "math", "sdpa", "flex", "xformers", "triton"; with "triton" the blocks get the shared table
        and index, and the kernel gathers the bias). ``fused_embed``: None keeps Conv2d + blend, else the
        ``beit_fast.ops.patch_embed_mask`` backend ("auto", "triton", "reference").
        ``activation_checkpointing``: "none", "all", or k to recompute every k-th block (blocks k-1, 2k-1, ...).
        """
        for blk in self.blocks:
            blk.attn.attn_backend = attention
        self.fused_embed_backend = fused_embed
        depth = len(self.blocks)
        if activation_checkpointing in ("none", 0, None):
            self.checkpoint_blocks = frozenset()
        elif activation_checkpointing == "all":
            self.checkpoint_blocks = frozenset(range(depth))
        else:
            every = int(activation_checkpointing)
            if every <= 0:
                raise ValueError(f"activation_checkpointing must be 'none', 'all' or k >= 1, got {activation_checkpointing!r}")
            self.checkpoint_blocks = frozenset(range(every - 1, depth, every))
        return self

    def embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Patch embedding, mask-token substitution, [CLS], position embedding: ``[B, N+1, D]``."""
        b = x.shape[0]
        n = self.patch_embed.num_patches
        if tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the model's "
                             f"{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]}")
        if bool_masked_pos.shape != (b, n):
            raise ValueError(f"bool_masked_pos must have shape {(b, n)}, got {tuple(bool_masked_pos.shape)}")
        if self.fused_embed_backend is not None:
            from .ops.patch_embed import patch_embed_mask

            proj = self.patch_embed.proj
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            x = patch_embed_mask(
                x.to(dtype), proj.weight.to(dtype), proj.bias.to(dtype), self.mask_token.view(-1),
                bool_masked_pos, backend=self.fused_embed_backend,
            )
        else:
            x = self.patch_embed(x)
            w = bool_masked_pos.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: ``[B, N+1, D]`` ([CLS] first)."""
        x = self.embed(x, bool_masked_pos)
        rel_pos_bias = shared_bias_arg(self.rel_pos_bias, self.blocks)
        for i, blk in enumerate(self.blocks):
            if i in self.checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, rel_pos_bias)
        return self.norm(x)

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
class VisionTransformerForClassification(nn.Module):
    """BEiT image classifier with the official fine-tuning state-dict layout.

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
    """

    def __init__(
        self, cfg: BeitConfig, num_classes: int, *, use_mean_pooling: bool = True, use_rel_pos_bias: bool = True,
        init_scale: float = 0.001,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.use_mean_pooling = bool(use_mean_pooling)
        self.use_rel_pos_bias = bool(use_rel_pos_bias)
        self.init_scale = float(init_scale)
        dim = cfg.embed_dim
        self.num_features = self.embed_dim = dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim)) if cfg.use_abs_pos_emb else None
        self.rel_pos_bias = (
            RelativePositionBias(self.patch_embed.patch_shape, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        )
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        window = self.patch_embed.patch_shape if use_rel_pos_bias else None
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.init_values, cfg.layer_norm_eps,
                  window_size=window)
            for i in range(cfg.depth)
        )
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

    def no_weight_decay(self) -> set[str]:
        """The official set: ``pos_embed`` and ``cls_token`` (the bias tables are decayed, as in the official
        fine-tuning unless ``--disable_weight_decay_on_rel_pos_bias``)."""
        return {"pos_embed", "cls_token"}

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def set_drop_path_rate(self, rate: float) -> "VisionTransformerForClassification":
        """Stochastic depth rate, linear from 0 (first block) to ``rate`` (last), as at construction."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        dpr = torch.linspace(0, rate, len(self.blocks), device="cpu").tolist()
        for p, blk in zip(dpr, self.blocks):
            blk.drop_path = DropPath(p) if p > 0 else nn.Identity()
        self.cfg = replace(self.cfg, drop_path_rate=float(rate))
        return self

    def configure_fast_path(self, attention: str = "auto") -> "VisionTransformerForClassification":
        """Attention backend of every block: "reference" (eager math) or an ``attention_with_bias`` backend
        ("auto", "math", "sdpa", "flex", "xformers", "triton"). Results stay those of the reference."""
        for blk in self.blocks:
            blk.attn.attn_backend = attention
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, [CLS], absolute position embedding: ``[B, N+1, D]``."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled and normalised features ``[B, D]``: fc_norm(mean of patch tokens), or norm(x)[:, 0]."""
        x = self.embed(x)
        rel_pos_bias = shared_bias_arg(self.rel_pos_bias, self.blocks)
        for blk in self.blocks:
            x = blk(x, rel_pos_bias)
        x = self.norm(x)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(1))
        return x[:, 0]

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
        for i, blk in enumerate(self.blocks[: max(layers)], start=1):
            x = blk(x, rel_pos_bias)
            if i in wanted:
                pooled = x[:, 1:].mean(1)
                found[i] = torch.cat((x[:, 0], pooled), dim=-1) if include_cls else pooled
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
