"""The fine-tuning step variants that ``bench_finetune_step.py`` and ``gpu_stages.py finetune`` time.

Every variant: the same batch (images and the soft targets of mixup/cutmix with label smoothing 0.1, made
once), the same optimizer (AdamW over ``param_groups_layer_decay``, layer decay 0.65, weight decay 0.05,
fused on CUDA), drop path 0.1 (the recipe's), one optimizer update per step, bf16 autocast on CUDA.
On CUDA: BEiT-B/16 at 224, 1000 classes, batch 256 (``batch``); on CPU: the tiny config at 224, 10
classes, batch 4 (the code paths, not the numbers).

  ft_eager              the eager fine-tuning step of beit_fast.finetune (``--fast off``): the classifier as
                        built (attention "math", the eager reference), forward under autocast, soft-target
                        cross-entropy, backward, fused AdamW, in the same engine, not compiled
  ft_beit_fast          beit_fast.train.loss.build_finetune_loss(fast=True): the classifier's fast path (attention
                        "auto", no activation checkpointing) + the loss as one module, torch.compile
                        (fullgraph, static shapes), run by beit_fast.train.engine.Engine as the fine-tuning
                        run does (schedule, gradient norm, fused AdamW); no host sync in the step (a
                        non-finite loss or gradient skips the update on the device through ``found_inf``)
  ft_beit_fast_triton   the same with attention "triton" (our kernel, each block's table gathered in-kernel)
  ft_timm_compiled      ``timm.create_model("beit_base_patch16_224", pretrained=False)`` (CPU: timm's Beit at
                        the tiny sizes) in the same loss module and the same engine step, torch.compile
"""
from __future__ import annotations


import torch
import torch.nn as nn

VARIANTS = ("ft_eager", "ft_beit_fast", "ft_beit_fast_triton", "ft_timm_compiled")
DROP_PATH = 0.1
LABEL_SMOOTHING = 0.1


def finetune_config(cuda: bool, batch: int | None = None):
    """``(BeitConfig, batch, num_classes)`` of the benchmark."""
    from beit_fast.model.beit import get_config

    if cuda:
        return get_config("base", drop_path_rate=DROP_PATH), batch or 256, 1000
    return get_config("tiny", drop_path_rate=DROP_PATH), batch or 4, 10


def make_finetune_data(cfg, batch: int, num_classes: int, device: torch.device, seed: int = 0) -> dict:
    """Images and mixup/cutmix soft targets (label smoothing folded in), as the fine-tuning loop makes them."""
    from beit_fast.data.transforms import build_mixup

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    torch.manual_seed(seed)
    images, targets = build_mixup(num_classes, 0.8, 1.0, label_smoothing=LABEL_SMOOTHING)(images, labels)
    return {"images": images.to(device), "targets": targets.to(device)}


def _optimizer(model: nn.Module, cuda: bool) -> torch.optim.Optimizer:
    from beit_fast.train.optim import apply_schedule, param_groups_layer_decay

    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.65), lr=1e-4, fused=cuda or None)
    apply_schedule(opt, 1e-4, 0.05)
    return opt


def _timm_model(cfg, num_classes: int, cuda: bool) -> nn.Module:
    import timm

    sizes = {} if cuda else dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                 depth=cfg.depth, num_heads=cfg.num_heads, init_values=cfg.init_values)
    return timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=num_classes,
                             drop_path_rate=DROP_PATH, **sizes)


def _engine_step(task: nn.Module, model: nn.Module, cuda: bool, data: dict, compile_fn):
    """beit_fast's fine-tuning step as the run makes it: :class:`beit_fast.train.engine.Engine` over the task
    module (lr / weight-decay schedule, zero_grad, forward + loss, backward, gradient norm, fused AdamW) with the
    non-finite check on the device (a non-finite loss or gradient skips the update through fused AdamW's
    ``found_inf``; no host read). Returns ``step(i) -> loss tensor``."""
    import numpy as np

    from beit_fast.train.engine import Engine

    engine = Engine(task, _optimizer(model, cuda), data["images"].device, np.full(1, 1e-4), np.full(1, 0.05),
                    prepare=lambda batch: batch, compile=compile_fn, nonfinite_check="device")
    batch = (data["images"], data["targets"])

    def step(i: int):
        return engine.train_step(batch, i).loss

    return step


def build_finetune_variant(name: str, cfg, num_classes: int, data: dict, device: torch.device, compile_fn,
                           seed: int = 0) -> tuple:
    """``(step(i) -> loss, description, keepalive)`` for a variant of the module docstring; ``compile_fn``
    compiles a module (``torch.compile`` with fullgraph/static shapes, or the identity for CPU smoke runs)."""
    from beit_fast.train.loss import ClassificationLoss, build_finetune_loss
    from beit_fast.model.beit import build_classifier

    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda else None
    torch.manual_seed(seed)
    if name == "ft_timm_compiled":
        model = _timm_model(cfg, num_classes, cuda).to(device).train()
        desc = ("timm beit_base_patch16_224 (its fused SDPA attention) + soft-target CE as one module, "
                "torch.compile, in beit_fast's engine (sync-free step)")
        return _engine_step(ClassificationLoss(model, amp_dtype), model, cuda, data, compile_fn), desc, model
    model = build_classifier(cfg, num_classes).to(device).train()
    if name == "ft_eager":
        desc = ("beit_fast.finetune --fast off: the eager step (attention math, autocast, soft-target CE) in the "
                "engine, not compiled")
        task = build_finetune_loss(model, amp_dtype, LABEL_SMOOTHING, fast=False)
        return _engine_step(task, model, cuda, data, False), desc, model
    if name in ("ft_beit_fast", "ft_beit_fast_triton"):
        attention = "triton" if name.endswith("triton") else "auto"
        loss_fn = build_finetune_loss(model, amp_dtype, LABEL_SMOOTHING, fast=True, attention=attention,
                                      activation_checkpointing="none")
        from beit_fast.ops.attention import resolve_attention_backend

        q = torch.empty(1, cfg.num_heads, 4, cfg.embed_dim // cfg.num_heads, device=device,
                        dtype=amp_dtype or torch.float32)
        resolved = resolve_attention_backend(attention, q)
        desc = (f"build_finetune_loss(fast=True): attention={resolved}, no checkpointing, torch.compile(fullgraph),"
                " beit_fast's engine (sync-free step)")
        return _engine_step(loss_fn, model, cuda, data, compile_fn), desc, model
    raise ValueError(f"unknown fine-tuning variant {name!r}; variants: {', '.join(VARIANTS)}")
