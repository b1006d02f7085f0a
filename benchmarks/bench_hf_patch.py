"""Do the drop-in patches pay? Patched vs unpatched HF and timm BEiT, per part, eager and compiled, one run.

    pytest benchmarks/bench_hf_patch.py --benchmark-only                        # CPU: tiny models
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_hf_patch.py --benchmark-only   # CUDA: BEiT-B/16, batch 64
    ... -k eager | -k compiled | -k hf | -k timm                                # a subset

Rows are named by what they run, ``<mode>-<model>-<patch>``; one benchmark group per model and mode, so
every row of a group has the same weights, batch and mode, and the unpatched row (run first) is its
baseline. ``extra_info["vs_unpatched"]``: the unpatched row's median / this row's median, both from this
process (> 1: the patch is faster).

Models (training step = forward + loss + backward, no optimizer; bf16 autocast on CUDA):
  hf    transformers' ``BeitForMaskedImageModeling`` built with ``attn_implementation="sdpa"`` (HF's
        default), shared relative position bias, ``model(pixel_values, bool_masked_pos, labels).loss``
  timm  ``timm.models.beit.Beit`` (per-block relative position bias, as in fine-tuning; 1000 classes;
        ``fused_attn`` on, timm's default), cross-entropy on the logits
Patches (``apply_beit_fast_to_hf`` keywords; every other part switched off for a single-part row):
  unpatched            the model as shipped
  attention            ``attention="auto"`` (BeitAttention -> attention_with_bias; for timm the whole patch)
  rel_pos_gather       ``fast_rel_pos_bias=True``
  embed                ``fused_embed=True``
  fused_loss           ``fused_loss=True`` (opt-in: masked-only loss, no [B, N, vocab] logits)
  default              ``apply_beit_fast_to_hf(model)``: attention + rel_pos_gather + embed
  all                  default + fused_loss
Modes: ``eager``, and ``compiled`` = ``torch.compile(model)`` (inductor, default mode; dynamo is reset
before each row so no row inherits another's graphs or hits the recompile limit; the first steps compile).

A part whose rows are not faster than ``unpatched`` in both modes should be off by default in
``apply_beit_fast_to_hf`` (INTEROP.md lists the defaults and the measurement behind them).
Cost on an H200 (estimate): eager rows a few seconds each, compiled rows ~1 minute each (compilation);
``-k eager`` for a quick look. Batch on CUDA: ``BEIT_FAST_BENCH_BATCH`` (default 64).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit_fast.data.masking import MaskingGenerator

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MODES = ("eager", "compiled")
HF_PATCHES = ("unpatched", "attention", "rel_pos_gather", "embed", "fused_loss", "default", "all")
TIMM_PATCHES = ("unpatched", "attention")
_OFF = dict(attention=None, fast_rel_pos_bias=False, fused_embed=False, fused_loss=False)
HF_PATCH_KWARGS = {  # patch name -> apply_beit_fast_to_hf keywords (None: not patched)
    "unpatched": None,
    "attention": {**_OFF, "attention": "auto"},
    "rel_pos_gather": {**_OFF, "fast_rel_pos_bias": True},
    "embed": {**_OFF, "fused_embed": True},
    "fused_loss": {**_OFF, "fused_loss": True},
    "default": {},
    "all": {"fused_loss": True},
}
_BASELINE_MS: dict[str, float] = {}  # group -> median of its unpatched row, this process


def sizes() -> dict:
    if CUDA:  # BEiT-B/16 at 224, vocabulary 8192, 75 of 196 patches masked
        return dict(hidden=768, layers=12, heads=12, image=224, patch=16, vocab=8192, masked=75, classes=1000,
                    batch=int(os.environ.get("BEIT_FAST_BENCH_BATCH", "64")))
    return dict(hidden=64, layers=2, heads=4, image=64, patch=8, vocab=1024, masked=26, classes=100, batch=8)


def build_hf(patch: str, s: dict) -> torch.nn.Module:
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
    if HF_PATCH_KWARGS[patch] is not None:
        apply_beit_fast_to_hf(model, **HF_PATCH_KWARGS[patch])
    return model


def build_timm(patch: str, s: dict) -> torch.nn.Module:
    timm_beit = pytest.importorskip("timm.models.beit")
    from beit_fast.interop import apply_beit_fast_to_timm

    torch.manual_seed(0)
    model = timm_beit.Beit(img_size=s["image"], patch_size=s["patch"], embed_dim=s["hidden"], depth=s["layers"],
                           num_heads=s["heads"], num_classes=s["classes"], use_abs_pos_emb=False,
                           use_rel_pos_bias=True, init_values=0.1)
    model = model.to(DEVICE).train()
    if patch == "attention":
        apply_beit_fast_to_timm(model, attention="auto")
    return model


def make_batch(s: dict):
    g = torch.Generator().manual_seed(0)
    grid = s["image"] // s["patch"]
    gen = MaskingGenerator((grid, grid), s["masked"], fixed_count=True)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(s["batch"])]))
    images = torch.randn(s["batch"], 3, s["image"], s["image"], generator=g)
    tokens = torch.randint(0, s["vocab"], (s["batch"], grid * grid), generator=g)
    classes = torch.randint(0, s["classes"], (s["batch"],), generator=g)
    return images.to(DEVICE), masks.to(DEVICE), tokens[masks].to(DEVICE), classes.to(DEVICE)


def run_rows(benchmark, kind: str, mode: str, patch: str, model: torch.nn.Module, loss_fn) -> None:
    s = sizes()
    group = (f"{kind}_train_step {mode} {DEVICE.type} D{s['hidden']}xL{s['layers']} {s['image']}/{s['patch']} "
             f"batch {s['batch']}")
    benchmark.group = group
    torch._dynamo.reset()  # no graphs or recompile counts carried over from another row
    fn = torch.compile(model) if mode == "compiled" else model
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)

    def step():
        model.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(fn)
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()
        return loss

    first_loss = step().item()  # compiles in "compiled" mode
    step()
    step()  # allocator / kernel / autotuning warm-up
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if patch == "unpatched":
        _BASELINE_MS[group] = median
    info = {"model": kind, "mode": mode, "patch": patch, "batch": s["batch"],
            "images_per_s": round(s["batch"] / median, 1), "first_loss": round(first_loss, 6),
            "device": torch.cuda.get_device_name() if CUDA else "cpu"}
    if group in _BASELINE_MS:
        info["vs_unpatched"] = round(_BASELINE_MS[group] / median, 3)
    if CUDA:
        info["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("patch", HF_PATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_hf_mim_step(benchmark, mode, patch):
    """HF BeitForMaskedImageModeling, masked image modeling step with HF's labels (one token per masked patch)."""
    s = sizes()
    model = build_hf(patch, s)
    images, masks, labels, _ = make_batch(s)
    run_rows(benchmark, "hf_mim", mode, patch, model,
             lambda fn: fn(pixel_values=images, bool_masked_pos=masks, labels=labels).loss)


@pytest.mark.parametrize("patch", TIMM_PATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_timm_beit_step(benchmark, mode, patch):
    """timm Beit (per-block relative position bias), classification step."""
    s = sizes()
    model = build_timm(patch, s)
    images, _, _, classes = make_batch(s)
    run_rows(benchmark, "timm_beit", mode, patch, model, lambda fn: F.cross_entropy(fn(images).float(), classes))
