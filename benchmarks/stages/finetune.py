"""Stage ``finetune``: the fine-tuning step variants (``benchmarks/finetune_variants.py``; BEiT-B/16 at 224, 1000
classes, mixup/cutmix soft targets, drop path 0.1, fused AdamW over the layer-decay groups): ft_eager
(beit_fast.finetune's eager step), ft_beit_fast (the compiled fast step, attention auto), ft_beit_fast_triton
(attention triton), ft_timm_compiled (timm's beit_base_patch16_224 in the same compiled step). Rows in the
``finetune_step`` table, each timed like the pretraining steps."""
from __future__ import annotations

from report_lib import RowWriter
from stages.common import CUDA, DEVICE, SEED, compile_, time_variants
from step_common import finetune_flops_per_image


def stage_finetune(args, w: RowWriter) -> int:
    """The fine-tuning step variants (``finetune_variants.py``), each timed like the pretraining steps."""
    from finetune_variants import build_finetune_variant, finetune_config, make_finetune_data

    cfg, batch, classes = finetune_config(CUDA, args.batch)
    data = make_finetune_data(cfg, batch, classes, DEVICE)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)

    def build(name):
        step, desc, keep = build_finetune_variant(
            name, cfg, classes, data, DEVICE, lambda m: compile_(m, fullgraph=True, dynamic=False), seed=SEED)
        return step, desc, batch, {"classes": classes}

    failures = time_variants(w, "finetune_step", [n for n in args.variants.split(",") if n], build, warmup, repeats,
                             inner, finetune_flops_per_image(cfg, classes))
    return 1 if failures else 0
