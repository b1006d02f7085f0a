"""Stage ``segmentation``: the semantic segmentation training step (``benchmarks/bench_segmentation_step.py``;
BEiT-B + UperNet at 512 px, batch 16, bf16, 150 classes on CUDA): seg_eager (the reference step), seg_beit_fast
(compiled, attention auto), seg_beit_fast_triton (attention triton), seg_hf_eager and seg_hf_compiled (HF's
``BeitForSemanticSegmentation``). Rows in the ``segmentation_step`` table, each timed like the pretraining steps.
Target (issue 23): seg_beit_fast >= 1.5x seg_hf_compiled."""
from __future__ import annotations

from report_lib import RowWriter
from stages.common import CUDA, time_variants


def stage_segmentation(args, w: RowWriter) -> int:
    from bench_segmentation_step import VARIANTS, build_variant, make_data, setup_model

    warmup, repeats, inner = (3, args.repeats, 2) if CUDA else (1, 2, 1)
    names = [n for n in args.variants.split(",") if n] if args.variants != "beit_fast" else list(VARIANTS)

    def build(name):
        model, batch, size, classes = setup_model()
        step, desc = build_variant(name, model, *make_data(batch, size, classes))
        return step, desc, batch, {"size": size, "classes": classes}

    return 1 if time_variants(w, "segmentation_step", names, build, warmup, repeats, inner) else 0
