"""The whole fine-tuning step: the eager step, beit_fast's fast step and timm compiled, side by side.

    pytest benchmarks/bench_finetune_step.py --benchmark-only                        # CPU: tiny, batch 4
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_finetune_step.py --benchmark-only   # CUDA: BEiT-B/16, 224,
                                                                                      # batch 256, 1000 classes

Rows (``finetune_variants.py`` builds them; the same batch, soft targets, optimizer and drop path in every
row): ``ft_eager`` (the baseline of the group: beit_fast.finetune's eager step), ``ft_beit_fast`` (the
compiled fast step, attention "auto"), ``ft_beit_fast_triton`` (attention "triton"; CUDA only: on a CPU it
would run in Triton's interpreter), ``ft_timm_compiled`` (timm's beit_base_patch16_224, compiled, in the
same step). ``extra_info``: images/s, MFU against ``BEIT_FAST_PEAK_TFLOPS`` (default 989), peak memory.
Batch on CUDA: ``BEIT_FAST_BENCH_BATCH`` (default 256). Targets (issue 13): ft_beit_fast >= 2x ft_eager and
>= 1.2x ft_timm_compiled, in the same run (``benchmarks/gpu_report.py``'s finetune stage records them).
Every timed step's loss must be finite (benchmarks/correctness.py); the fast step's values are held to the
eager step's by tests/test_finetune_fast.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_variants import (  # noqa: E402
    build_finetune_variant,
    finetune_config,
    make_finetune_data,
)
from correctness import check_steps  # noqa: E402
from step_common import finetune_flops_per_image, mfu_percent  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _compile(module):
    return torch.compile(module, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("variant", ["ft_eager", "ft_beit_fast", "ft_beit_fast_triton", "ft_timm_compiled"])
def test_finetune_step(benchmark, variant):
    if variant == "ft_beit_fast_triton" and not CUDA:
        pytest.skip("the Triton attention would run in Triton's interpreter on a CPU: its time means nothing")
    if variant == "ft_timm_compiled":
        pytest.importorskip("timm")
    batch_size = int(os.environ.get("BEIT_FAST_BENCH_BATCH", "256")) if CUDA else None
    cfg, batch_size, classes = finetune_config(CUDA, batch_size)
    benchmark.group = f"finetune_step {DEVICE.type} D{cfg.embed_dim}xL{cfg.depth} batch {batch_size} {classes} classes"
    data = make_finetune_data(cfg, batch_size, classes, DEVICE)
    step, desc, _keep = build_finetune_variant(variant, cfg, classes, data, DEVICE, _compile)
    for i in range(3):  # compile, autotune, allocator warm-up
        step(i)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = iter(range(3, 10**6))
    losses = []

    def timed():
        losses.append(step(next(counter)))
        if CUDA:  # the fast steps never synchronise themselves
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    check_steps(benchmark, losses)
    images_per_s = batch_size / benchmark.stats.stats.median
    benchmark.extra_info.update({"batch": batch_size, "images_per_s": round(images_per_s, 1), "runs": desc,
                                 "device": torch.cuda.get_device_name() if CUDA else "cpu"})
    if CUDA:
        benchmark.extra_info["mfu_percent"] = round(
            mfu_percent(finetune_flops_per_image(cfg, classes), images_per_s), 1)
        benchmark.extra_info["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
