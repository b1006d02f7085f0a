"""Stage ``fp8``: the --fp8 step (torchao float8 GEMMs for QKV and MLP) and its loss curve, compared with the
bf16 curve of the step stage's beit_fast row in the report."""
from __future__ import annotations

import time


from report_lib import RowWriter
from stages.common import CUDA, DEVICE, config, make_data, measure, step_row
from stages.step import loss_curve
from stages.variants import build_variant


def stage_fp8(args, w: RowWriter) -> int:
    from beit_fast.model.fp8 import fp8_unavailable_reason

    why = fp8_unavailable_reason(DEVICE, emulate=not CUDA)
    if why:
        w.emit("step", name="beit_fast_fp8", skip=why, error=f"not run: {why}")
        return 0
    cfg, batch = config(args.batch)
    data = make_data(cfg, batch)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    t0 = time.time()
    step, desc, eng = build_variant("beit_fast_fp8", cfg, data)
    init_state = {k: v.detach().clone() for k, v in eng.model.state_dict().items()}
    per, first, _ = measure(step, 0, warmup, repeats, inner)
    step_row(w, "beit_fast_fp8", desc, per, cfg, batch, data["num_masked"], time.time() - t0 - sum(per) * inner / 1e3,
             first)
    if args.curve_steps:
        loss_curve(eng, cfg, batch, args.curve_steps, w, "fp8", init_state)
    return 0
