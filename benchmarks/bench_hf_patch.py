"""HuggingFace BeitForMaskedImageModeling training step (forward + backward): as shipped vs patched.

    pytest benchmarks/bench_hf_patch.py --benchmark-only                        # CPU: a tiny model
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_hf_patch.py --benchmark-only   # CUDA: BEiT-B/16, batch 64

Variants, same weights and batch, one benchmark group:
  hf          transformers' model as shipped (attn_implementation="sdpa"): lm_head on all N patches, then
              the masked rows, then cross-entropy (HF's own loss with ``labels``)
  hf_patched  the same instance after ``apply_beit_fast_to_hf(model)``: fused attention with the relative
              position bias, fused patch embedding + mask token, masked-only fused linear + cross-entropy
              (no [B, N, vocab] logits)
The step is ``model(pixel_values, bool_masked_pos, labels).loss.backward()`` (no optimizer). CUDA runs
under bf16 autocast. ``extra_info``: images/s, the loss of the first step (the two must agree), and on
CUDA the peak memory of a step (``peak_mem_MiB``). Batch on CUDA: ``BEIT_FAST_BENCH_BATCH`` (default 64).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from beit_fast.masking import MaskingGenerator

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def sizes() -> dict:
    if CUDA:  # BEiT-B/16 at 224, vocabulary 8192, 75 of 196 patches masked
        return dict(hidden=768, layers=12, heads=12, image=224, patch=16, vocab=8192, masked=75,
                    batch=int(os.environ.get("BEIT_FAST_BENCH_BATCH", "64")))
    return dict(hidden=64, layers=2, heads=4, image=64, patch=8, vocab=1024, masked=26, batch=8)


def build(variant: str, s: dict):
    from beit_fast.interop import apply_beit_fast_to_hf

    cfg = transformers.BeitConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=4 * s["hidden"], image_size=s["image"], patch_size=s["patch"], vocab_size=s["vocab"],
        use_mask_token=True, use_shared_relative_position_bias=True, use_absolute_position_embeddings=False,
        layer_scale_init_value=0.1, layer_norm_eps=1e-6, drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BeitForMaskedImageModeling._from_config(cfg, attn_implementation="sdpa")
    model = model.to(DEVICE).train()
    if variant == "hf_patched":
        apply_beit_fast_to_hf(model)
    return model


def make_batch(s: dict):
    g = torch.Generator().manual_seed(0)
    grid = s["image"] // s["patch"]
    gen = MaskingGenerator((grid, grid), s["masked"], fixed_count=True)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(s["batch"])]))
    images = torch.randn(s["batch"], 3, s["image"], s["image"], generator=g)
    tokens = torch.randint(0, s["vocab"], (s["batch"], grid * grid), generator=g)
    return images.to(DEVICE), masks.to(DEVICE), tokens[masks].to(DEVICE)


@pytest.mark.parametrize("variant", ["hf", "hf_patched"])
def test_hf_mim_train_step(benchmark, variant):
    s = sizes()
    benchmark.group = (f"hf_mim_train_step {DEVICE.type} D{s['hidden']}xL{s['layers']} {s['image']}/{s['patch']} "
                       f"V{s['vocab']} batch {s['batch']}")
    model = build(variant, s)
    images, masks, labels = make_batch(s)
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)

    def step():
        model.zero_grad(set_to_none=True)
        with amp:
            loss = model(pixel_values=images, bool_masked_pos=masks, labels=labels).loss
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()
        return loss

    first_loss = step().item()
    step()  # allocator / kernel warm-up
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({
        "variant": variant,
        "batch": s["batch"],
        "images_per_s": round(s["batch"] / benchmark.stats.stats.median, 1),
        "first_loss": round(first_loss, 6),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
    })
    if CUDA:
        benchmark.extra_info["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
