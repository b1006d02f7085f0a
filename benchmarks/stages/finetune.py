"""Stage ``finetune``: the fine-tuning step variants (``benchmarks/finetune_variants.py``; BEiT-B/16 at 224, 1000
classes, mixup/cutmix soft targets, drop path 0.1, fused AdamW over the layer-decay groups): ft_eager
(beit_fast.finetune's eager step), ft_beit_fast (the compiled fast step, attention auto), ft_beit_fast_triton
(attention triton), ft_timm_compiled (timm's beit_base_patch16_224 in the same compiled step). Rows in the
``finetune_step`` table, each timed like the pretraining steps."""
from __future__ import annotations

import time
import traceback

import torch

from report_lib import RowWriter, spread
from stages.common import CUDA, DEVICE, SEED, compile_, free, graph_breaks, measure, peak_gib
from step_common import finetune_flops_per_image, mfu_percent


def stage_finetune(args, w: RowWriter) -> int:
    """The fine-tuning step variants (``finetune_variants.py``), each timed like the pretraining steps."""
    from finetune_variants import build_finetune_variant, finetune_config, make_finetune_data

    cfg, batch, classes = finetune_config(CUDA, args.batch)
    data = make_finetune_data(cfg, batch, classes, DEVICE)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    failures = 0
    for name in filter(None, args.variants.split(",")):
        if name.endswith("_triton") and not CUDA:  # Triton's interpreter at 197 tokens: minutes a step
            w.emit("finetune_step", name=name, error="not run: the Triton attention needs CUDA (on a CPU it would "
                   "run in Triton's interpreter)")
            continue
        t0 = time.time()
        try:
            step, desc, keep = build_finetune_variant(
                name, cfg, classes, data, DEVICE, lambda m: compile_(m, fullgraph=True, dynamic=False), seed=SEED)
            breaks0 = graph_breaks()
            per, first, _ = measure(step, 0, warmup, repeats, inner)
            s = spread(per)
            ips = batch / (s["median"] / 1e3)
            row = dict(name=name, runs=desc, batch=batch, classes=classes, ms=s["median"], ms_min=s["min"],
                       ms_max=s["max"], ms_iqr=s["iqr"], repeats=s["n"], images_per_s=ips,
                       setup_s=round(time.time() - t0 - sum(per) * inner / 1e3, 1), first_loss=first,
                       peak_mem_gib=peak_gib(), device=torch.cuda.get_device_name() if CUDA else "cpu")
            if "compiled" in name or "beit_fast" in name:
                row["graph_breaks"] = graph_breaks() - breaks0
            if CUDA:
                row["mfu_percent"] = mfu_percent(finetune_flops_per_image(cfg, classes), ips)
            w.emit("finetune_step", **row)
            del step, keep
        except Exception as e:  # one variant failing must not cost the others
            failures += 1
            traceback.print_exc()
            w.emit("finetune_step", name=name, error=f"{type(e).__name__}: {str(e)[:400]}",
                   setup_s=round(time.time() - t0, 1))
        free()
    return 1 if failures else 0
