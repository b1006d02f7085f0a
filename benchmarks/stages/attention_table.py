"""Stage ``attention_table``: attention on the model's path, the relative-position table ``[T, H]`` and its index
``[N, N]`` (``beit_fast.ops.attention_with_rel_pos_bias``): forward + backward incl. the table gradient, per
candidate backend, each checked against an fp32 reference (within 2x PyTorch's own error, flash-attention's
rule) before it is timed; then each of our Triton kernels timed on its own (forward, dq with the partial sums of
the bias gradient, dk/dv, table gradient) with the configuration the autotuner chose and every configuration's
time as the autotuner measured it.

q, k, v are views of one ``[B, N, 3, H, Dh]`` tensor, as the model's qkv projection gives them. On CUDA:
B256/N197 (224 px) and B64/N577 (384 px), H 12, Dh 64, bf16; on CPU: tiny shapes, the kernels in Triton's
interpreter (the code paths only).
"""
from __future__ import annotations

import math
import traceback

import torch

from report_lib import RowWriter, spread
from stages.common import CUDA, DEVICE, bench_ms, free, parse_shapes, peak_gib, rel_err, reset_peak

NAMES = ("out", "dq", "dk", "dv", "dtable")


def _window(n: int) -> tuple[int, int]:
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"N = {n} is not a square grid of patches + the class token")
    return side, side


def _inputs(b: int, h: int, n: int, d: int, dtype):
    from beit_fast.ops.rel_pos import relative_position_index

    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    dout = torch.randn(b, h, n, d, device=DEVICE, generator=g).to(dtype)
    index = relative_position_index(_window(n)).to(DEVICE)
    table = torch.randn(int(index.max()) + 1, h, device=DEVICE, generator=g) * 0.5
    return qkv, dout, table, index


def _grads(backend: str, qkv, dout, table, index, scale, dtype=None):
    """[out, dq, dk, dv, dtable] through attention_with_rel_pos_bias (leaves cast to ``dtype`` if given)."""
    from beit_fast.ops.attention import attention_with_rel_pos_bias

    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (*qkv, table)]
    out = attention_with_rel_pos_bias(*leaves[:3], leaves[3], index, scale, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach(), *grads]


def _autotuner_choice(tuned) -> dict:
    """What a Triton autotuner chose for the last key it tuned, and every configuration's measured time."""
    if tuned is None:
        return {"config": "fixed (interpreter)"}
    best = getattr(tuned, "best_config", None)
    timings = getattr(tuned, "configs_timings", None) or {}
    return {"config": str(best) if best is not None else "not tuned",
            "configs_ms": {str(c): (round(float(t[0]), 4) if isinstance(t, (list, tuple)) else round(float(t), 4))
                           for c, t in timings.items()}}


def time_triton_kernels(qkv, dout, table, index, scale, repeats: int, w: RowWriter, label: str) -> None:
    """Each of our kernels alone, at these inputs, with the launchers' own argument builders (autotuned on
    CUDA): rows of the ``attention_kernels`` table."""
    import beit_fast.kernels.attention as KA
    from beit_fast.kernels._common import is_interpreted
    from beit_fast.kernels.attention_forward import _attn_fwd_kernel
    from beit_fast.ops.attention_triton import _table_plan

    q, k, v = qkv
    scale = float(scale)
    interp = is_interpreted(_attn_fwd_kernel)
    table_t, compact, compact_t, positions = _table_plan(table, index)
    out, lse = KA.attention_forward(q, k, v, None, table_t, compact, scale)
    B, H, N, D = q.shape
    groups, per = KA.batch_groups(B, H, N, interp, device=q.device)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    part = torch.empty((groups, H, N, N), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dtable = torch.empty((table.shape[0], H), dtype=torch.float32, device=q.device)
    o2 = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    lse2 = torch.empty_like(lse)
    kernels = [
        ("forward", KA._FWD_TUNED, lambda: KA._launch(KA.fwd_launch(q, k, v, o2, lse2, None, table_t, compact, scale,
                                                                   interp))),
        ("dq + delta + bias partial sums", KA._DQ_TUNED, lambda: KA._launch(KA.dq_launch(
            q, k, v, out, dout, lse, delta, dq, part, None, table_t, compact, scale, groups, per, True, interp))),
        ("dk, dv", KA._DKDV_TUNED, lambda: KA._launch(KA.dkdv_launch(q, k, v, dout, lse, delta, dk, dv, None,
                                                                     table_t, compact_t, scale, interp))),
        ("table gradient", getattr(KA, "_TG_TUNED", None),
         lambda: KA._launch(KA.table_grad_launch(part, positions, dtable, interp))),
    ]
    for name, tuned, fn in kernels:
        try:
            fn()  # autotunes on the first call (the dq call first: the dk/dv and table kernels read its outputs)
            s = spread(bench_ms(fn, repeats))
            w.emit("attention_kernels", shape=label, kernel=name, ms=s["median"], ms_min=s["min"], ms_max=s["max"],
                   programs_note=f"dq batch groups {groups} x {per}" if name.startswith("dq") else "",
                   **_autotuner_choice(tuned))
        except Exception as e:
            traceback.print_exc()
            w.emit("attention_kernels", shape=label, kernel=name, error=f"{type(e).__name__}: {str(e)[:300]}")


def stage_attention_table(args, w: RowWriter) -> int:
    from beit_fast.ops.attention import resolve_attention_backend

    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = parse_shapes(args.shapes or ("256x12x197x64,64x12x577x64" if CUDA else "2x2x17x16,1x2x50x16"))
    names = list(filter(None, args.candidates.split(",")))
    rc = 0
    for b, h, n, d in shapes:
        label = f"B{b} H{h} N{n} Dh{d}"
        qkv, dout, table, index = _inputs(b, h, n, d, dtype)
        scale = d ** -0.5
        ref = _grads("math", qkv, dout, table, index, scale, dtype=torch.float32)
        mine = _grads("math", qkv, dout, table, index, scale)
        tol = [max(2 * rel_err(x, r), 1e-5) for x, r in zip(mine, ref)]  # 2x PyTorch's own error
        del mine
        flops = 3.5 * 4 * b * h * n * n * d  # forward 4BHN^2D; backward 2.5x forward
        for name in names:
            try:
                resolve_attention_backend(name, qkv[0])
            except (RuntimeError, ValueError) as e:
                w.emit("attention", path="table", shape=label, candidate=name, skip=str(e)[:300])
                continue
            try:
                got = _grads(name, qkv, dout, table, index, scale)
                errs = [rel_err(x, r) for x, r in zip(got, ref)]
                del got
                ok = all(e <= t for e, t in zip(errs, tol)) and all(math.isfinite(e) for e in errs)
                reset_peak()
                s = spread(bench_ms(lambda: _grads(name, qkv, dout, table, index, scale), args.repeats))

                def fwd():
                    from beit_fast.ops.attention import attention_with_rel_pos_bias

                    with torch.no_grad():
                        attention_with_rel_pos_bias(*qkv, table, index, scale, backend=name)

                fwd_ms = spread(bench_ms(fwd, 1))["median"]
                w.emit("attention", path="table", shape=label, candidate=name,
                       runs=f"attention_with_rel_pos_bias(backend={name!r})", ms=s["median"], ms_min=s["min"],
                       ms_max=s["max"], fwd_ms=fwd_ms, tflops=flops / (s["median"] * 1e-3) / 1e12,
                       max_rel_err=max(errs), rel_err=dict(zip(NAMES, errs)), tolerance=dict(zip(NAMES, tol)), ok=ok,
                       peak_mem_gib=peak_gib())
                if name == "triton":
                    time_triton_kernels(qkv, dout, table, index, scale, args.repeats, w, label)
            except Exception as e:
                rc = 1
                traceback.print_exc()
                w.emit("attention", path="table", shape=label, candidate=name, error=f"{type(e).__name__}: {str(e)[:400]}")
            free() if name == "flex" else (torch.cuda.empty_cache() if CUDA else None)
    return rc
