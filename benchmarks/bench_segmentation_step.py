"""The whole semantic segmentation training step: beit_fast's eager and fast steps against HuggingFace's
``BeitForSemanticSegmentation`` eager and compiled, same batch, same card, same run.

    pytest benchmarks/bench_segmentation_step.py --benchmark-only                        # CPU: D=32, 6 blocks, 64 px
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_segmentation_step.py --benchmark-only   # CUDA: BEiT-B + UperNet,
                                                                                          # 512 px, batch 16, bf16

Rows (each: forward, the loss - decode CE + 0.4 auxiliary CE, ignore 255 -, backward, one AdamW update over the
same parameters; bf16 autocast on CUDA; drop path 0.1; 150 classes on CUDA, 5 on CPU):

  seg_eager              beit_fast.model.segmentation's eager step (attention "math", the reference), in the engine
  seg_beit_fast          the fast step: per-block tables in the fused attention ("auto"), compiled (fullgraph,
                         static shapes), in the engine (the fine-tuning run's step: device-side non-finite check)
  seg_beit_fast_triton   the same with attention "triton" (CUDA only; on a CPU the interpreter's time means nothing)
  seg_hf_eager           transformers' BeitForSemanticSegmentation (attn_implementation "sdpa"), ``model(pixel_values,
                         labels).loss``, eager
  seg_hf_compiled        the same under torch.compile

Size on CUDA: ``BEIT_FAST_BENCH_BATCH`` (default 16), ``BEIT_FAST_BENCH_SEG_SIZE`` (default 512; 640 for the
N = 1601 case). Target (issue 23): seg_beit_fast >= 1.5x seg_hf_compiled at 512 px, batch 16, bf16.
HF's config takes ``out_indices`` (3, 5, 7, 11) (its ADE20K models' own, which read blocks 1, 3, 5, 9, see
beit_fast.interop.segmentation_keys); the work per step is the same: every block runs either way.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
VARIANTS = ("seg_eager", "seg_beit_fast", "seg_beit_fast_triton", "seg_hf_eager", "seg_hf_compiled")


def setup_model():
    """``(our model, batch size, image size, classes)``."""
    from beit_fast.model.segmentation import SegmentationHeadConfig, build_segmenter

    if CUDA:
        batch = int(os.environ.get("BEIT_FAST_BENCH_BATCH", "16"))
        size = int(os.environ.get("BEIT_FAST_BENCH_SEG_SIZE", "512"))
        torch.manual_seed(0)
        return build_segmenter("base", 150, img_size=size, drop_path_rate=0.1), batch, size, 150
    torch.manual_seed(0)
    head = SegmentationHeadConfig(num_classes=5, aux_channels=16)
    return build_segmenter("tiny", 5, img_size=64, head=head, embed_dim=32, depth=6, num_heads=2,
                           drop_path_rate=0.1), 2, 64, 5


def make_data(batch, size, classes):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, classes, (batch, size, size), generator=g)
    labels[:, : size // 16] = 255
    return images.to(DEVICE), labels.to(DEVICE)


def build_ours(variant, model, images, labels):
    from beit_fast.train.segmentation import build_segmentation_engine
    from beit_fast.config.segment import SegmentConfig

    fast = variant != "seg_eager"
    attention = "triton" if variant == "seg_beit_fast_triton" else "auto"
    cfg = SegmentConfig(max_iters=10**6, eval_interval=10**6, batch_size=images.shape[0], fast="on" if fast else "off",
                        attn_backend=attention, amp="bf16" if CUDA else "none", compile=fast, lr=1e-4)
    engine = build_segmentation_engine(model.to(DEVICE), cfg, DEVICE)
    return lambda i: engine.train_step((images, labels), i).loss, f"{variant}: engine step, attention {attention}"


def build_hf(variant, model, images, labels):
    transformers = pytest.importorskip("transformers")
    from beit_fast.interop.segmentation_keys import hf_config_for

    cfg = hf_config_for(_with_blocks(model, (1, 3, 5, 9) if model.cfg.depth == 12 else (0, 1, 2, 3)))
    cfg.drop_path_rate = 0.1
    hf = transformers.BeitForSemanticSegmentation._from_config(cfg, attn_implementation="sdpa").to(DEVICE).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=CUDA or None)

    def loss_fn(x, y):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
            return hf(pixel_values=x, labels=y).loss

    fn = torch.compile(loss_fn, dynamic=False) if variant == "seg_hf_compiled" else loss_fn

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = fn(images, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, f"{variant}: HF BeitForSemanticSegmentation, sdpa"


def build_variant(variant, model, images, labels):
    """``(step(i) -> loss, description)`` of one row (what the gpu_stages ``segmentation`` stage calls)."""
    return (build_hf if variant.startswith("seg_hf") else build_ours)(variant, model, images, labels)


def _with_blocks(model, out_indices):
    """``model`` with other ``out_indices`` (HF's config reads blocks i - 2 and never the last)."""
    model.backbone.out_indices = tuple(out_indices)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_segmentation_step(benchmark, variant):
    if variant == "seg_beit_fast_triton" and not CUDA:
        pytest.skip("the Triton attention would run in Triton's interpreter on a CPU: its time means nothing")
    if variant == "seg_hf_compiled" and not CUDA:
        pytest.skip("compiling HF's model on a CPU takes minutes and says nothing about the GPU")
    model, batch, size, classes = setup_model()
    benchmark.group = f"segmentation_step {DEVICE.type} D{model.cfg.embed_dim}xL{model.cfg.depth} {size}px batch {batch}"
    images, labels = make_data(batch, size, classes)
    step, desc = build_variant(variant, model, images, labels)
    for i in range(3):  # compile, autotune, allocator warm-up
        step(i)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = iter(range(3, 10**6))

    def timed():
        step(next(counter))
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    images_per_s = batch / benchmark.stats.stats.median
    benchmark.extra_info.update({"batch": batch, "size": size, "images_per_s": round(images_per_s, 2), "runs": desc,
                                 "device": torch.cuda.get_device_name() if CUDA else "cpu"})
    if CUDA:
        benchmark.extra_info["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    assert np.isfinite(images_per_s)
