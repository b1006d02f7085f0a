"""The whole-step variants the step stages time (``build_variant``). Every one: same weights init where the
model is ours, same batch, same masks and tokens, AdamW with clipping at 3.0, one optimizer update per step.

  beit_fast            FastPretrainEngine.train_step: compiled forward+loss+backward (fullgraph, mode
                       "default"), attention "auto", Triton patch embedding + fused linear-CE, fused AdamW + clip
  beit_fast_triton     the same with the attention backend "triton" (our fused kernel, table gathered in-kernel,
                       table gradient without a [B, H, N, N] tensor)
  beit_fast_sdpa       the same with the attention backend "sdpa" (PyTorch's efficient kernel, dense bias)
  beit_fast_sync_free  beit_fast's compiled loss, but no host sync in the step: clipping on the device and fused
                       AdamW's found_inf skipping a non-finite update (the engine reads loss and grad norm with
                       .tolist()/.item(): two syncs per step)
  beit_fast_cudagraphs the sync-free step with torch.compile(mode="reduce-overhead") (CUDA graphs)
  beit_fast_autotune   torch.compile(mode="max-autotune-no-cudagraphs"): inductor autotunes the GEMMs with their
                       bias/GELU epilogues
  beit_fast_fp8        FastPretrainEngine(fp8=True): torchao float8 GEMMs for QKV and MLP
  reference_eager      PretrainEngine: the eager reference step (official semantics) under bf16 autocast
  reference_compiled   the same with torch.compile(MIMLoss) (graph breaks at the boolean-mask indexing)
  hf_eager             transformers' BeitForMaskedImageModeling, attn_implementation="sdpa", with labels (HF's own
                       loss: lm_head on all 196 tokens, then the masked rows)
  hf_compiled          the same under torch.compile
  hf_patched           HF's model after beit_fast.interop.apply_beit_fast_to_hf (eager)
  hf_patched_compiled  the same under torch.compile
  hf_patched_fused     hf_patched with the opt-in fused_loss=True (masked rows only, no [B, N, V] logits)
  timm_compiled        timm's Beit body (beit_base_patch16_224 layout, shared relative position bias, its fused
                       SDPA attention) + a mask token + our masked-only fused head, compiled
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from stages.common import CUDA, DEVICE, SEED, SMOKE_NO_COMPILE, amp, compile_
from step_common import FixedTokens

#: the step variants of the module docstring (the headline rows are the beit_fast ones)
VARIANTS = ("beit_fast", "beit_fast_triton", "beit_fast_sdpa", "beit_fast_sync_free", "beit_fast_cudagraphs",
            "beit_fast_autotune", "beit_fast_fp8", "reference_eager", "reference_compiled", "hf_eager", "hf_compiled",
            "hf_patched", "hf_patched_compiled", "hf_patched_fused", "timm_compiled")


def _schedule(lr: float = 1e-4, n: int = 10**6) -> np.ndarray:
    return np.full(n, lr)


def _our_engine(cfg, data, *, fast: bool, attention: str = "auto", **fast_kw):
    from beit_fast.train.mim import FastPretrainEngine, PretrainEngine
    from beit_fast.model.beit import build_model
    from beit_fast.train.optim import build_optimizer

    torch.manual_seed(SEED)
    model = build_model(cfg).to(DEVICE)
    tok = FixedTokens(data["tokens"], cfg.vocab_size)
    args = (model, tok, build_optimizer(model, 1e-4, 0.05), DEVICE, _schedule(), _schedule(0.05))
    amp_dtype = torch.bfloat16 if CUDA else None
    if not fast:
        return PretrainEngine(*args, amp_dtype=amp_dtype)
    model.configure_fast_path(attention=attention, fused_embed="auto")
    fp8 = fast_kw.pop("fp8", False)
    if fp8 and not CUDA:  # CPU smoke: the same conversion, emulated
        from beit_fast.model.fp8 import convert_to_fp8_training
        convert_to_fp8_training(model, emulate=True)
        fp8 = False
    return FastPretrainEngine(*args, amp_dtype=amp_dtype, num_masked=data["num_masked"],
                              compile=not SMOKE_NO_COMPILE, fp8=fp8, **fast_kw)


def fast_description(engine) -> str:
    from beit_fast.ops.attention import resolve_attention_backend
    from beit_fast.ops.backend import resolve_backend

    cfg = engine.model.cfg
    q = torch.empty(1, cfg.num_heads, 4, cfg.embed_dim // cfg.num_heads, device=DEVICE,
                    dtype=torch.bfloat16 if CUDA else torch.float32)
    attn = resolve_attention_backend(engine.model.blocks[0].attn.attn_backend, q)
    ops = resolve_backend(None, q)
    return (f"FastPretrainEngine, torch.compile(fullgraph) of fwd+loss+bwd; attention={attn}, "
            f"patch embed + linear-CE={ops}; fused AdamW + clip")


def sync_free_step(engine, batch, i: int):
    """engine.train_step without its two host syncs: the gradient norm stays on the device, and fused
    AdamW skips the update itself when it is not finite (``found_inf``, as under a GradScaler)."""
    engine.apply_schedule(i)
    engine.model.train()
    engine.optimizer.zero_grad(set_to_none=True)
    images, tok_images, masks = batch
    tokens = engine.tokenize(tok_images, masks)
    loss, _ = engine.compute_loss(images, masks, tokens)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(engine._params, engine.clip_grad or math.inf, foreach=True)
    if engine.optimizer.defaults.get("fused"):
        engine.optimizer.found_inf = (~torch.isfinite(norm)).float()
    engine.optimizer.step()
    return loss.detach()


class TimmMIM(nn.Module):
    """timm's Beit body with the pretraining layout (shared relative position bias, no absolute
    position embedding, LayerScale), a mask token, and our masked-only fused head + loss."""

    def __init__(self, cfg, num_masked: int) -> None:
        super().__init__()
        from timm.models.beit import Beit

        self.body = Beit(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                         drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values, use_abs_pos_emb=False,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.num_masked = num_masked

    def forward(self, images, masks, tokens):
        from beit_fast.model.beit import masked_index
        from beit_fast.ops.cross_entropy import masked_linear_cross_entropy

        b = self.body
        x = b.patch_embed(images)
        w = masks.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.type_as(x) * w
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1).type_as(x), x), dim=1)
        x = b.pos_drop(x)
        rel = b.rel_pos_bias()
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        x = b.norm(x)[:, 1:]
        index = masked_index(masks, self.num_masked)
        hidden = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])
        labels = tokens.gather(1, index).masked_fill(~masks.gather(1, index), -100).reshape(-1)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else hidden.dtype
        return masked_linear_cross_entropy(hidden.to(dtype), self.lm_head.weight.to(dtype),
                                           self.lm_head.bias.to(dtype), labels, ignore_index=-100)


def _hf_model(cfg, patched: bool, fused_loss: bool = False):
    import transformers

    from beit_fast.interop import apply_beit_fast_to_hf

    hf_cfg = transformers.BeitConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size, patch_size=cfg.patch_size, use_mask_token=True,
        use_shared_relative_position_bias=True, use_absolute_position_embeddings=False,
        layer_scale_init_value=cfg.init_values, layer_norm_eps=cfg.layer_norm_eps,
        drop_path_rate=cfg.drop_path_rate, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(SEED)
    model = transformers.BeitForMaskedImageModeling._from_config(hf_cfg, attn_implementation="sdpa")
    model = model.to(DEVICE).train()
    if patched:
        apply_beit_fast_to_hf(model, fused_loss=fused_loss)
    return model


def _plain_step(module, params, forward, clip: float = 3.0):
    """zero_grad, forward under autocast -> loss, backward, clip, fused AdamW, one host read of the loss."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=CUDA or None)

    def step(i):
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss.item()

    return step


def build_variant(name: str, cfg, data) -> tuple:
    """``(step(i) -> loss, description, keepalive)`` for a variant of the module docstring."""
    batch = (data["images"], data["tok_images"], data["masks"])
    if name in ("beit_fast", "beit_fast_triton", "beit_fast_sdpa"):
        attention = {"beit_fast": "auto", "beit_fast_triton": "triton", "beit_fast_sdpa": "sdpa"}[name]
        eng = _our_engine(cfg, data, fast=True, attention=attention)
        return (lambda i: eng.train_step(batch, i).loss), fast_description(eng), eng
    if name == "beit_fast_sync_free":
        eng = _our_engine(cfg, data, fast=True)
        return (lambda i: sync_free_step(eng, batch, i)), "beit_fast without host syncs (device-side skip)", eng
    if name == "beit_fast_cudagraphs":
        eng = _our_engine(cfg, data, fast=True, compile_mode="reduce-overhead")
        return (lambda i: sync_free_step(eng, batch, i)), "beit_fast sync-free, compile mode reduce-overhead " \
                                                          "(CUDA graphs)", eng
    if name == "beit_fast_autotune":
        eng = _our_engine(cfg, data, fast=True, compile_mode="max-autotune-no-cudagraphs")
        return (lambda i: eng.train_step(batch, i).loss), "beit_fast, compile mode max-autotune-no-cudagraphs " \
                                                          "(GEMM + epilogue autotuning)", eng
    if name == "beit_fast_fp8":
        eng = _our_engine(cfg, data, fast=True, fp8=True)
        return (lambda i: eng.train_step(batch, i).loss), "beit_fast with --fp8 (torchao float8 GEMMs for QKV " \
                                                          "and MLP, tensorwise scaling)", eng
    if name in ("reference_eager", "reference_compiled"):
        eng = _our_engine(cfg, data, fast=False)
        desc = "PretrainEngine (official semantics), eager, bf16 autocast"
        if name == "reference_compiled":
            eng.train_module = compile_(eng.loss_module)
            desc = "PretrainEngine with torch.compile(MIMLoss) (default mode)"
        return (lambda i: eng.train_step(batch, i).loss), desc, eng
    if name.startswith("hf_"):
        patched = name.startswith("hf_patched")
        fused = name == "hf_patched_fused"
        model = _hf_model(cfg, patched, fused_loss=fused)
        fwd = compile_(model) if name.endswith("_compiled") else model
        labels = data["tokens"][data["masks"]]

        def forward():
            return fwd(pixel_values=data["images"], bool_masked_pos=data["masks"], labels=labels).loss

        desc = ("HF BeitForMaskedImageModeling (sdpa)" + (" + apply_beit_fast_to_hf" if patched else "")
                + (" (fused_loss=True)" if fused else "")
                + (", torch.compile" if name.endswith("_compiled") else ", eager") + ", HF's loss with labels")
        return _plain_step(model, list(model.parameters()), forward), desc, model
    if name == "timm_compiled":
        torch.manual_seed(SEED)
        model = TimmMIM(cfg, data["num_masked"]).to(DEVICE).train()
        fwd = compile_(model)

        def forward():
            return fwd(data["images"], data["masks"], data["tokens"])

        desc = ("timm Beit body (beit_base_patch16_224 layout, shared rel-pos bias, fused SDPA) + mask token + "
                "beit_fast masked-only fused head, torch.compile")
        return _plain_step(model, list(model.parameters()), forward), desc, model
    raise ValueError(f"unknown variant {name!r}")
