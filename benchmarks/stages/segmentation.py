"""Stage ``segmentation``: the semantic segmentation training step (``benchmarks/bench_segmentation_step.py``;
BEiT-B + UperNet at 512 px, batch 16, bf16, 150 classes on CUDA): seg_eager (the reference step), seg_beit_fast
(compiled, attention auto), seg_beit_fast_triton (attention triton), seg_hf_eager and seg_hf_compiled (HF's
``BeitForSemanticSegmentation``). Rows in the ``segmentation_step`` table, each timed like the pretraining steps.
Target (issue 23): seg_beit_fast >= 1.5x seg_hf_compiled."""
from __future__ import annotations

import time
import traceback

import torch

from report_lib import RowWriter, spread
from stages.common import CUDA, free, graph_breaks, measure, peak_gib


def stage_segmentation(args, w: RowWriter) -> int:
    from bench_segmentation_step import VARIANTS, build_variant, make_data, setup_model

    warmup, repeats, inner = (3, args.repeats, 2) if CUDA else (1, 2, 1)
    failures = 0
    names = [n for n in args.variants.split(",") if n] if args.variants != "beit_fast" else list(VARIANTS)
    for name in names:
        if name == "seg_beit_fast_triton" and not CUDA:
            w.emit("segmentation_step", name=name, error="not run: the Triton attention needs CUDA (on a CPU it would "
                   "run in Triton's interpreter)")
            continue
        t0 = time.time()
        try:
            model, batch, size, classes = setup_model()
            images, labels = make_data(batch, size, classes)
            step, desc = build_variant(name, model, images, labels)
            breaks0 = graph_breaks()
            per, first, _ = measure(step, 0, warmup, repeats, inner)
            s = spread(per)
            row = dict(name=name, runs=desc, batch=batch, size=size, classes=classes, ms=s["median"],
                       ms_min=s["min"], ms_max=s["max"], ms_iqr=s["iqr"], repeats=s["n"],
                       images_per_s=batch / (s["median"] / 1e3),
                       setup_s=round(time.time() - t0 - sum(per) * inner / 1e3, 1), first_loss=first,
                       peak_mem_gib=peak_gib(),
                       device=torch.cuda.get_device_name() if CUDA else "cpu")
            if "compiled" in name or "beit_fast" in name:
                row["graph_breaks"] = graph_breaks() - breaks0
            w.emit("segmentation_step", **row)
            del step, model
        except Exception as e:  # one variant failing must not cost the others
            failures += 1
            traceback.print_exc()
            w.emit("segmentation_step", name=name, error=f"{type(e).__name__}: {str(e)[:400]}",
                   setup_s=round(time.time() - t0, 1))
        free()
    return 1 if failures else 0
