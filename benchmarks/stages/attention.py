"""Stage ``attention``: the candidates for BEiT's attention with a dense [H, N, N] bias (the HF / timm patches'
path; ``benchmarks/attention_candidates.py``), forward + backward incl. the bias gradient, each checked
against an fp32 reference (flash-attention's rule: within 2x PyTorch's own error) before it is timed.
The model's path (the relative-position table) is stage ``attention_table``."""
from __future__ import annotations

import math
import traceback

import torch

from report_lib import RowWriter, spread
from stages.common import CUDA, DEVICE, bench_ms, free, parse_shapes, peak_gib, rel_err, reset_peak


def stage_attention(args, w: RowWriter) -> int:
    from attention_candidates import FLEX_LADDER, candidates, cudnn_layout

    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = parse_shapes(args.shapes or ("256x12x197x64,64x12x577x64" if CUDA else "2x2x197x16,1x2x577x16"))
    names = list(filter(None, args.candidates.split(",")))
    rc = 0
    for b, h, n, d in shapes:
        label = f"B{b} H{h} N{n} Dh{d}"
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v, dout = (torch.randn(b, h, n, d, device=DEVICE, generator=g).to(dtype) for _ in range(4))
        bias = torch.randn(h, n, n, device=DEVICE, generator=g)
        scale = d ** -0.5
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        # fp32 reference (math, upcast inputs), and PyTorch's own error in the run dtype (math backend)
        ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
        from beit_fast.ops.attention import attention_with_bias
        ref_out = attention_with_bias(*ref_leaves[:3], ref_leaves[3], scale, backend="math")
        ref = [ref_out.detach(), *torch.autograd.grad(ref_out, ref_leaves, dout.float())]
        del ref_out, ref_leaves
        math_out = attention_with_bias(*leaves[:3], leaves[3], scale, backend="math")
        math_errs = [rel_err(x, r) for x, r in zip([math_out.detach(), *torch.autograd.grad(math_out, leaves, dout)],
                                                    ref)]
        del math_out
        tol = [max(2 * e, 1e-5) for e in math_errs]  # flash-attention's rule: <= 2x PyTorch's own error
        flops = 3.5 * 4 * b * h * n * n * d  # forward 4BHN^2D; backward 2.5x forward
        todo = list(names)
        flex_failed = False
        while todo:
            name = todo.pop(0)
            if name == "flex_ladder":  # only when flex failed here: the tiles that fit, in order
                if flex_failed:
                    todo = [f"flex_tiles:{t}" for t in FLEX_LADDER] + todo
                continue
            cand = candidates([name])[0]
            why = cand.unavailable(leaves[0])
            if why:
                w.emit("attention", path="dense", shape=label, candidate=name, runs=cand.runs, skip=why)
                continue
            try:
                for t in leaves:
                    t.grad = None
                out = cand.fn(*leaves[:3], leaves[3], scale)
                grads = torch.autograd.grad(out, leaves, dout)
                errs = [rel_err(x, r) for x, r in zip([out.detach(), *grads], ref)]
                del out, grads
                ok = all(e <= t for e, t in zip(errs, tol)) and all(math.isfinite(e) for e in errs)

                def fwd_bwd():
                    o = cand.fn(*leaves[:3], leaves[3], scale)
                    torch.autograd.grad(o, leaves, dout)

                def fwd():
                    with torch.no_grad():
                        cand.fn(*leaves[:3], leaves[3], scale)

                reset_peak()
                per = bench_ms(fwd_bwd, args.repeats)
                s = spread(per)
                fwd_ms = spread(bench_ms(fwd, 1))["median"]
                note = cudnn_layout(leaves[0]) if name == "cudnn" else ""
                w.emit("attention", path="dense", shape=label, candidate=name, runs=cand.runs, ms=s["median"], ms_min=s["min"],
                       ms_max=s["max"], fwd_ms=fwd_ms, tflops=flops / (s["median"] * 1e-3) / 1e12,
                       maxrel_err=max(errs), rel_err={"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3],
                                                      "dbias": errs[4]},
                       tolerance=dict(zip(["out", "dq", "dk", "dv", "dbias"], tol)), ok=ok, note=note,
                       peak_mem_gib=peak_gib())
            except Exception as e:
                rc = 1
                if name == "flex":
                    flex_failed = True
                traceback.print_exc()
                w.emit("attention", path="dense", shape=label, candidate=name, runs=cand.runs,
                       error=f"{type(e).__name__}: {str(e)[:400]}")
            free() if name.startswith("flex") else (torch.cuda.empty_cache() if CUDA else None)
    return rc
