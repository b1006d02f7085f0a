"""Where the fast step's time goes: torch.profiler over a few steps, kernels grouped into components.

    python benchmarks/profile_step.py [--batch 256] [--variant fast] [--out FILE]

Each GPU kernel (on CPU: each leaf operator) is put in one component by :func:`classify`: first by the
operator that launched it (our fused ops and PyTorch's attention ops are custom/aten ops, the optimizer
step is a ``record_function`` range), then by its name (cuBLAS/cuDNN/CUTLASS/inductor naming). The
components: GEMMs, attention, loss (the fused head + cross-entropy), embedding (patch embedding + mask),
norms/elementwise (LayerNorm, GELU, LayerScale, residuals, casts: inductor's fused pointwise and
reduction kernels), optimizer (AdamW + gradient clipping), memcpy/memset, other. ``gpu_report.py``'s
``fast`` stage writes the table from a compiled BEiT-B step on the card.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

IDLE = "idle: outside kernels (launch gaps, host syncs, Python)"
COMPONENTS = ("gemm", "attention", "loss", "embedding", "norm/elementwise", "optimizer", "memcpy/memset", "other")

# Operators (and record_function ranges) that own every kernel launched inside them.
_CALLER_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("loss", re.compile(r"beit_fast::masked_linear_cross_entropy|linear_cross_entropy|aten::cross_entropy"
                        r"|aten::nll_loss|aten::log_softmax|aten::_log_softmax")),
    ("embedding", re.compile(r"beit_fast::patch_embed_mask|aten::convolution|aten::_convolution|aten::conv2d"
                             r"|aten::cudnn_convolution|convolution_backward")),
    ("optimizer", re.compile(r"Optimizer\.step|Optimizer\.zero_grad|clip_grad_norm|_foreach_norm|aten::_fused_adam")),
    ("attention", re.compile(r"scaled_dot_product|_efficient_attention|_flash_attention|_cudnn_attention"
                             r"|flex_attention|memory_efficient_attention|xformers|beit_fast::attention"
                             r"|beit_fast::.*attn")),
)

# Kernel names (device side) or, on CPU, leaf operator names; first match wins.
_NAME_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("memcpy/memset", re.compile(r"^Memcpy|^Memset|memcpy|memset", re.I)),
    ("attention", re.compile(r"fmha|flash|attention|attn|sdpa|(?<!log_)softmax", re.I)),
    ("loss", re.compile(r"_ce_rows_kernel|cross_entropy|nll_loss|log_softmax|linear_ce", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply|foreach|lpnorm|lp_norm", re.I)),
    ("embedding", re.compile(r"_pe_fwd|_pe_bwd|patch_embed|conv2d|convolution|implicit_gemm|fprop|dgrad|wgrad|im2col",
                             re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|triton_tem_fused_(add)?mm|_mm_|^aten::(mm|addmm|bmm|matmul"
                        r"|linear|_scaled_mm|baddbmm)$|scaled_mm|sm90_|sm80_|ampere_|hopper_", re.I)),
    ("norm/elementwise", re.compile(r"^triton_(poi|per|red)_|layer_norm|layernorm|elementwise|vectorized|reduce"
                                    r"|gelu|^aten::(add|mul|sub|div|copy_|to|_to_copy|cat|fill_|index|gather|scatter"
                                    r"|where|clone|sum|mean|neg|rsqrt|pow|masked_fill|expand|zero_)", re.I)),
)


def classify(kernel: str, callers: tuple[str, ...] | list[str] = ()) -> str:
    """The component of a kernel named ``kernel`` launched inside the operators ``callers`` (innermost
    first). Memcpy/memset stay memcpy whoever launched them; otherwise the innermost caller that a caller
    rule knows decides, then the kernel's own name."""
    for comp, pat in _NAME_RULES[:1]:
        if pat.search(kernel):
            return comp
    for caller in callers:
        for comp, pat in _CALLER_RULES:
            if pat.search(caller):
                return comp
    for comp, pat in _NAME_RULES[1:]:
        if pat.search(kernel):
            return comp
    return "other"


def kernel_records(events) -> list[tuple[str, float, tuple[str, ...]]]:
    """``(kernel name, microseconds, callers innermost first)`` from ``prof.events()``.

    With CUDA activity: every device kernel, attached by the profiler to the CPU event that launched it.
    CPU only: every CPU operator with its self time (its own time, without its children's)."""
    records = []
    has_device = False
    for evt in events:
        kernels = getattr(evt, "kernels", None) or []
        if kernels:
            has_device = True
            callers = []
            e = evt
            while e is not None:
                callers.append(e.name)
                e = e.cpu_parent
            for k in kernels:
                records.append((k.name, float(k.duration), tuple(callers)))
    if has_device:
        return records
    for evt in events:
        name = evt.name
        if name.startswith(("ProfilerStep", "step ")) or not str(getattr(evt, "device_type", "CPU")).endswith("CPU"):
            continue
        if evt.self_cpu_time_total <= 0:
            continue
        callers = []
        e = evt.cpu_parent
        while e is not None:
            callers.append(e.name)
            e = e.cpu_parent
        records.append((name, float(evt.self_cpu_time_total), tuple(callers)))
    return records


def component_rows(records, steps: int, step_ms: float | None = None) -> tuple[list[dict], list[dict]]:
    """Per-component and per-kernel tables (ms per step) from :func:`kernel_records`. ``step_ms``: the
    step's wall time measured without the profiler; the rest of it appears as "GPU idle" (launch gaps,
    host syncs) when the kernels add up to less."""
    per_comp: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    per_kernel: dict[str, list] = {}
    for name, us, callers in records:
        comp = classify(name, callers)
        per_comp[comp] += us
        count[comp] += 1
        k = per_kernel.setdefault(name, [comp, 0.0, 0])
        k[1] += us
        k[2] += 1
    busy = sum(per_comp.values()) / 1e3 / steps
    total = max(busy, step_ms or 0.0)
    comp_rows = []
    for comp in COMPONENTS:
        if comp not in per_comp:
            continue
        ms = per_comp[comp] / 1e3 / steps
        top = max((n for n, v in per_kernel.items() if v[0] == comp), key=lambda n: per_kernel[n][1], default="")
        comp_rows.append({"component": comp, "ms_per_step": ms, "percent": 100 * ms / total if total else 0.0,
                          "kernels_per_step": count[comp] / steps, "top_kernel": top})
    if step_ms and step_ms > busy:
        comp_rows.append({"component": IDLE, "ms_per_step": step_ms - busy,
                          "percent": 100 * (step_ms - busy) / total, "kernels_per_step": 0, "top_kernel": ""})
    comp_rows.sort(key=lambda r: -r["ms_per_step"])
    top_rows = [{"kernel": n, "component": v[0], "ms_per_step": v[1] / 1e3 / steps, "calls_per_step": v[2] / steps}
                for n, v in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])]
    return comp_rows, top_rows


def profile_steps(step_fn, steps: int = 3, cuda: bool = False):
    """Run ``step_fn(i)`` ``steps`` times under torch.profiler; returns the profiler."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            with torch.profiler.record_function(f"step {i}"):
                step_fn(i)
        if cuda:
            torch.cuda.synchronize()
    return prof


def format_components(comp_rows: list[dict]) -> str:
    lines = [f"{'component':<36} {'ms/step':>9} {'%':>6}  largest kernel"]
    for r in comp_rows:
        lines.append(f"{r['component']:<36} {r['ms_per_step']:9.3f} {r['percent']:6.1f}  {r['top_kernel'][:80]}")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the benchmark's)")
    p.add_argument("--variant", default="fast", choices=["fast", "reference", "fast_ckpt_all"], help="step to profile")
    p.add_argument("--rows", type=int, default=20, help="rows of the kernel table")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train_step import DEVICE, bench_config, make_batch, make_engine

    cfg, batch_size = bench_config()
    batch_size = args.batch or batch_size
    batch, tokens = make_batch(cfg, batch_size)
    engine = make_engine(args.variant, cfg, tokens)
    batch = tuple(t.to(DEVICE) for t in batch)
    for step in range(3):
        engine.train_step(batch, step)
    prof = profile_steps(lambda i: engine.train_step(batch, 3 + i), steps=3, cuda=DEVICE.type == "cuda")
    comp, top = component_rows(kernel_records(prof.events()), steps=3)
    key = "cuda_time_total" if DEVICE.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    text = (f"profile: {args.variant} step, D{cfg.embed_dim}xL{cfg.depth}, batch {batch_size}, 3 steps, {DEVICE}\n\n"
            + format_components(comp) + "\n\n" + table)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
