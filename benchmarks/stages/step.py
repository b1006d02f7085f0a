"""Stage ``step``: whole pretraining steps (the variants of ``stages.variants``), each timed in this one process,
one after the other (a failing variant writes an error row and the next one runs).

``--extras`` act on our headline variants (beit_fast, beit_fast_triton, beit_fast_sdpa) on their already
compiled engines, so they cost no compile: ``sync_free`` (the first of them without host syncs), ``curve``
(the bf16 loss curve the fp8 stage compares against, on the first of them), ``profile`` (torch.profiler's
component table of the fastest of them, right after the last of them was timed). ``setup_s`` of a row is its
compile + warm-up time: what the compile cost.
"""
from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path

import numpy as np

from report_lib import RowWriter
from stages.common import CUDA, compiled_graphs, config, free, graph_breaks, make_data, measure, step_row
from stages.variants import build_variant, sync_free_step

OURS = ("beit_fast", "beit_fast_triton", "beit_fast_sdpa")  # the headline rows: extras run on their engines


def stage_step(args, w: RowWriter) -> int:
    cfg, batch = config(args.batch)
    data = make_data(cfg, batch)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    failures = 0
    extras = set(filter(None, args.extras.split(",")))
    names = list(filter(None, args.variants.split(",")))
    last_ours = max((i for i, n in enumerate(names) if n in OURS), default=-1)
    engine_batch = (data["images"], data["tok_images"], data["masks"])
    measured: list[tuple[float, str, object, int]] = []  # (ms, name, engine, next step index) of our variants
    for pos, name in enumerate(names):
        t0 = time.time()
        try:
            step, desc, keep = build_variant(name, cfg, data)
            init_state = None
            first_ours = name in OURS and not measured
            if "curve" in extras and first_ours:
                init_state = {k: v.detach().clone() for k, v in keep.model.state_dict().items()}
            breaks0, graphs0 = graph_breaks(), compiled_graphs()
            per, first, nxt = measure(step, 0, warmup, repeats, inner)
            extra = {"compiled_graphs": compiled_graphs() - graphs0}
            if name not in OURS and ("compiled" in name or "timm" in name):
                extra["graph_breaks"] = graph_breaks() - breaks0
            row = step_row(w, name, desc, per, cfg, batch, data["num_masked"], time.time() - t0 - sum(per) *
                           inner / 1e3, first, **extra)
            if name in OURS:
                if "sync_free" in extras and first_ours:
                    _extra(w, "sync_free", lambda: _sync_free_row(w, keep, engine_batch, nxt, cfg, batch, data,
                                                                    warmup, repeats, inner))
                    nxt += warmup + repeats * inner
                if "curve" in extras and first_ours:
                    _extra(w, "curve", lambda: loss_curve(keep, cfg, batch, args.curve_steps, w, "bf16", init_state))
                if "profile" in extras:
                    measured.append((row["ms"], name, keep, nxt))
            del step, keep
        except Exception as e:  # one variant failing must not cost the others
            failures += 1
            traceback.print_exc()
            w.emit("step", name=name, error=f"{type(e).__name__}: {str(e)[:400]}", setup_s=round(time.time() - t0, 1))
        if pos == last_ours and measured:  # profile the fastest of ours, then let their engines go
            ms, fastest, engine, nxt = min(measured, key=lambda m: m[0])
            _extra(w, "profile", lambda: run_profile(engine, engine_batch, nxt + 10, ms, w, args.profile_out,
                                                     fastest))
            measured.clear()
            del engine
        free()
    return 1 if failures else 0


def loss_curve(engine, cfg, batch: int, steps: int, w: RowWriter, variant: str, init_state: dict) -> None:
    """``steps`` optimizer steps from ``init_state`` over 4 fixed batches in turn (lr warmup over 20 steps
    to 1e-3, then constant; weight decay 0.05): the curve the fp8 stage is compared against."""
    engine.model.load_state_dict(init_state)
    engine.optimizer.state.clear()
    n = steps + 1
    engine.lr_schedule = np.array([1e-3 * min(1.0, (i + 1) / 20) for i in range(n)])
    engine.wd_schedule = np.full(n, 0.05)
    batches = [make_data(cfg, batch, seed=100 + j) for j in range(4)]
    losses = []
    for i in range(steps):
        d = batches[i % 4]
        engine.tokenizer.tokens = d["tokens"]
        losses.append(engine.train_step((d["images"], d["tok_images"], d["masks"]), i).loss)
    w.emit("loss_curve", variant=variant, batch=batch, steps=steps, losses=[round(x, 5) for x in losses])


def run_profile(engine, batch, start: int, step_ms: float, w: RowWriter, text_out: str | None,
                variant: str = "beit_fast") -> None:
    """torch.profiler over 3 steps of ``engine``: the component table and the top kernels (rows name the
    variant)."""
    from profile_step import component_rows, format_components, kernel_records, profile_steps

    steps = 3
    prof = profile_steps(lambda i: engine.train_step(batch, start + i), steps=steps, cuda=CUDA)
    comp, top = component_rows(kernel_records(prof.events()), steps=steps, step_ms=step_ms)
    for r in comp:
        w.emit("profile", variant=variant, **r)
    for r in top[:15]:
        w.emit("profile_top", variant=variant, **r)
    if text_out:
        key = "cuda_time_total" if CUDA else "cpu_time_total"
        Path(text_out).write_text(format_components(comp) + "\n\n"
                                  + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def _extra(w: RowWriter, what: str, fn) -> None:
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        w.emit("step", name=f"beit_fast[{what}]", error=f"{type(e).__name__}: {str(e)[:400]}")


def _sync_free_row(w, engine, batch, start, cfg, bsz, data, warmup, repeats, inner) -> None:
    t0 = time.time()
    per, first, _ = measure(lambda i: sync_free_step(engine, batch, i), start, warmup, repeats, inner)
    with contextlib.suppress(AttributeError):
        del engine.optimizer.found_inf
    step_row(w, "beit_fast_sync_free", "beit_fast's compiled loss, no host syncs in the step (device-side clip "
             "and found_inf skip)", per, cfg, bsz, data["num_masked"], time.time() - t0 - sum(per) * inner / 1e3, first)
