"""The whole pretraining step, reference against fast, side by side.

    pytest benchmarks/bench_train_step.py --benchmark-only            # CPU: tiny model, batch 4
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_train_step.py --benchmark-only   # CUDA: BEiT-B/16

Variants (all from the same weights and batch; the row names in brackets):
  reference      [reference_eager] the eager reference step (official semantics) under the run's AMP dtype
  fast           [beit_fast_compiled] FastPretrainEngine: fused ops (Triton on CUDA, their PyTorch
                 references on CPU), fused attention, static shapes, torch.compile
  fast_ckpt_all  [beit_fast_compiled_ckpt_all] the same with activation checkpointing on every block
  hf_sdpa        HuggingFace BeitForMaskedImageModeling (attn_implementation="sdpa"), same sizes, when
                 transformers is installed (it computes the head on all 196 tokens: its own design)
Each runs with a fixed-token stand-in tokenizer (the model step alone); ``fast_with_tokenizer`` adds the
DALL-E-sized encoder forward. ``extra_info`` holds images/s, model FLOPs utilisation against the card's
bf16 peak (``BEIT_FAST_PEAK_TFLOPS``, default 989 for H100/H200 SXM), and peak memory (CUDA).
Batch on CUDA: ``BEIT_FAST_BENCH_BATCH`` (default 256).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from beit_fast.train.mim import FastPretrainEngine, PretrainEngine
from beit_fast.data.masking import MaskingGenerator
from beit_fast.model.beit import BeitConfig, build_model, get_config
from beit_fast.train.optim import build_optimizer
from step_common import FixedTokens, mfu_percent, train_flops_per_image

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_MASKED = 75


def bench_config() -> tuple[BeitConfig, int]:
    if CUDA:
        return get_config("base"), int(os.environ.get("BEIT_FAST_BENCH_BATCH", "256"))
    return get_config("tiny", vocab_size=1024), 4


def make_batch(cfg: BeitConfig, batch: int):
    g = torch.Generator().manual_seed(0)
    grid = cfg.grid_size
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    tok_images = torch.rand(batch, 3, grid * 8, grid * 8, generator=g)
    gen = MaskingGenerator((grid, grid), NUM_MASKED, fixed_count=True)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(batch)]))
    tokens = torch.randint(0, cfg.vocab_size, (batch, grid * grid), generator=g)
    return (images, tok_images, masks), tokens.to(DEVICE)


def make_engine(variant: str, cfg: BeitConfig, tokens: torch.Tensor, tokenizer: nn.Module | None = None):
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    tok = tokenizer if tokenizer is not None else FixedTokens(tokens, cfg.vocab_size)
    sched = np.full(10**6, 1e-4)
    amp = torch.bfloat16 if CUDA else None
    args = (model, tok, build_optimizer(model, 1e-4, 0.05), DEVICE, sched, sched)
    if variant == "reference":
        return PretrainEngine(*args, amp_dtype=amp)
    ckpt = "all" if variant == "fast_ckpt_all" else "none"
    model.configure_fast_path(attention="auto", fused_embed="auto", activation_checkpointing=ckpt)
    return FastPretrainEngine(*args, amp_dtype=amp, num_masked=NUM_MASKED, compile=True)


def run_benchmark(benchmark, engine, batch, cfg: BeitConfig, batch_size: int) -> None:
    batch = tuple(t.to(DEVICE) for t in batch)
    for step in range(3):  # compile, autotune, allocator warm-up
        engine.train_step(batch, step)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = iter(range(3, 10**6))

    def step():
        engine.train_step(batch, next(counter))  # .item() inside synchronises

    rounds = 10 if CUDA else 3
    t0 = time.perf_counter()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median if benchmark.stats else (time.perf_counter() - t0) / rounds
    images_per_s = batch_size / seconds
    benchmark.extra_info.update({
        "batch": batch_size,
        "images_per_s": round(images_per_s, 1),
        "model": f"D{cfg.embed_dim}xL{cfg.depth}",
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
    })
    if CUDA:
        benchmark.extra_info["mfu_percent"] = round(mfu_percent(train_flops_per_image(cfg, NUM_MASKED), images_per_s), 1)
        benchmark.extra_info["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


@pytest.mark.parametrize("variant", ["reference", "fast", "fast_ckpt_all"],
                         ids=["reference_eager", "beit_fast_compiled", "beit_fast_compiled_ckpt_all"])
def test_train_step(benchmark, variant):
    if variant == "fast_ckpt_all" and not CUDA:
        pytest.skip("checkpointing trades compute for memory: only meaningful on a GPU")
    cfg, batch_size = bench_config()
    benchmark.group = f"train_step {DEVICE.type} D{cfg.embed_dim}xL{cfg.depth} batch {batch_size}"
    batch, tokens = make_batch(cfg, batch_size)
    engine = make_engine(variant, cfg, tokens)
    run_benchmark(benchmark, engine, batch, cfg, batch_size)


def test_train_step_fast_with_tokenizer(benchmark):
    from beit_fast.tokenizer import build_tokenizer

    cfg, batch_size = bench_config()
    benchmark.group = f"train_step {DEVICE.type} D{cfg.embed_dim}xL{cfg.depth} batch {batch_size}"
    batch, tokens = make_batch(cfg, batch_size)
    if CUDA:  # the DALL-E encoder's size (untrained weights: the cost is the same)
        tok = build_tokenizer("dalle", random_init=True, vocab_size=cfg.vocab_size)
    else:
        tok = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=cfg.vocab_size)
    engine = make_engine("fast", cfg, tokens, tokenizer=tok.to(DEVICE))
    run_benchmark(benchmark, engine, batch, cfg, batch_size)


def test_train_step_hf_sdpa(benchmark):
    transformers = pytest.importorskip("transformers")
    cfg, batch_size = bench_config()
    benchmark.group = f"train_step {DEVICE.type} D{cfg.embed_dim}xL{cfg.depth} batch {batch_size}"
    hf_cfg = transformers.BeitConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size, patch_size=cfg.patch_size, use_mask_token=True,
        use_shared_relative_position_bias=True, use_absolute_position_embeddings=False,
        layer_scale_init_value=cfg.init_values, layer_norm_eps=1e-6,
    )
    try:
        model = transformers.BeitForMaskedImageModeling._from_config(hf_cfg, attn_implementation="sdpa")
    except (ValueError, ImportError) as e:
        pytest.skip(f"transformers' BEiT has no SDPA attention here: {e}")
    model = model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA or None)
    (images, _, masks), tokens = make_batch(cfg, batch_size)
    images, masks = images.to(DEVICE), masks.to(DEVICE)
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(pixel_values=images, bool_masked_pos=masks)
        loss = nn.functional.cross_entropy(out.logits.float()[masks], tokens[masks])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        loss.item()

    for _ in range(2):
        step()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    images_per_s = batch_size / benchmark.stats.stats.median
    benchmark.extra_info.update({"batch": batch_size, "images_per_s": round(images_per_s, 1)})
    if CUDA:
        benchmark.extra_info["mfu_percent"] = round(
            mfu_percent(train_flops_per_image(cfg, NUM_MASKED), images_per_s), 1)
        benchmark.extra_info["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
