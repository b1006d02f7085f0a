"""Forward + backward of attention with BEiT's relative position bias, backend by backend (pytest-benchmark).

    pytest benchmarks/bench_attention.py --benchmark-only                    # CPU shapes (about 1 min)
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_attention.py --benchmark-only  # + BEiT-B shapes on CUDA

One benchmark group per (device, shape, dtype), so backends sit side by side in the report. Each round is
one forward and one backward with the gradients of q, k, v and of the bias, as in training. Two ways of
giving the bias, named in the row id:

* ``dense``: ``attention_with_bias`` with an fp32 ``[H, N, N]`` leaf (what ``RelativePositionBias()``
  returns; the HF / timm patches' path);
* ``table``: ``attention_with_rel_pos_bias`` with the fp32 ``[T, H]`` table leaf and BEiT's index (the
  model's path): "triton" gathers the bias inside its kernels and returns the table gradient; the other
  backends gather ``[H, N, N]`` first and scatter its gradient back, and that cost is in their rows.

``triton-fixedcfg`` is "triton" with ``beit_fast.kernels.attention.AUTOTUNE = False`` (the deterministic
configurations instead of the autotuner's choice); the triton rows record the configurations the
autotuner picked. On CUDA a round ends with a synchronize, and extra_info records the peak memory of one
step above the inputs (MiB) and triton.testing.do_bench's median (ms, CUDA events), the figure to quote.
Use these numbers to order ``beit_fast.ops.attention.AUTO_PRIORITY["cuda"]`` (and record them there). On
CPU "triton" runs under Triton's interpreter (tiny shape only): its time means nothing.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from beit_fast.model.beit import relative_position_index
from beit_fast.ops.attention import attention_with_bias, attention_with_rel_pos_bias, resolve_attention_backend

HAS_CUDA = torch.cuda.is_available()
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton on CPU runs in its interpreter, hundreds of times slower than compiled code: those rows are left
# out unless asked for (a harness check), and then named ..._INTERPRETED (see bench_kernels.py).
RUN_INTERPRETED = os.environ.get("BEIT_FAST_BENCH_INTERPRETED") == "1"

# (device, B, H, grid, Dh, dtype, backends); N = grid^2 + 1
CONFIGS = [
    ("cpu", 2, 2, (4, 4), 16, torch.float32, ["math", "sdpa", "triton"]),  # triton: the interpreter
    ("cpu", 8, 4, (14, 14), 32, torch.float32, ["math", "sdpa"]),
    ("cuda", 256, 12, (14, 14), 64, torch.bfloat16, None),  # BEiT-B at 224, the paper's per-GPU batch
    ("cuda", 64, 12, (24, 24), 64, torch.bfloat16, None),  # BEiT-B fine-tuned at 384 (N = 577)
]
CUDA_BACKENDS = ["math", "sdpa", "flex", "xformers", "triton", "triton-fixedcfg"]
BIAS_KINDS = ["dense", "table"]


def _params():
    out = []
    for device, b, h, grid, d, dtype, backends in CONFIGS:
        for backend in backends or CUDA_BACKENDS:
            for kind in BIAS_KINDS:
                reason = None
                if device == "cuda" and not HAS_CUDA:
                    reason = "needs a CUDA device"
                elif backend == "xformers" and not HAS_XFORMERS:
                    reason = "xformers is not installed"
                elif backend == "flex" and TRITON_INTERPRETED:
                    reason = "TRITON_INTERPRET=1: run with BEIT_FAST_REAL_GPU=1"
                elif backend.startswith("triton") and device == "cpu" and not TRITON_INTERPRETED:
                    reason = "the triton backend runs on CPU only under TRITON_INTERPRET=1"
                elif backend.startswith("triton") and device == "cpu" and not RUN_INTERPRETED:
                    reason = ("Triton on CPU runs in the interpreter (times mean nothing): set "
                              "BEIT_FAST_BENCH_INTERPRETED=1 to run it as a harness check")
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                dt = str(dtype).replace("torch.", "")
                n = grid[0] * grid[1] + 1
                label = f"{backend}_INTERPRETED" if backend.startswith("triton") and device == "cpu" else backend
                out.append(pytest.param(device, (b, h, grid, d), dtype, backend, kind, marks=marks,
                                        id=f"{device}-B{b}-N{n}-{dt}-{label}-{kind}"))
    return out


@pytest.mark.parametrize("device,shape,dtype,backend,kind", _params())
def test_attention_fwd_bwd(benchmark, device, shape, dtype, backend, kind, monkeypatch):
    b, h, grid, d = shape
    n = grid[0] * grid[1] + 1
    dt = str(dtype).replace("torch.", "")
    benchmark.group = f"attention fwd+bwd {device} B={b} H={h} N={n} Dh={d} {dt}"
    name = backend
    if backend == "triton-fixedcfg":
        import beit_fast.kernels.attention as kernels

        monkeypatch.setattr(kernels, "AUTOTUNE", False)
        name = "triton"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(4))
    index = relative_position_index(grid).to(device)
    table = torch.randn(int(index.max()) + 1, h, device=device, generator=g)  # fp32, like the model's table
    bias = table[index].permute(2, 0, 1).contiguous()  # [H, N, N] fp32, like RelativePositionBias()
    leaf = table if kind == "table" else bias
    inputs = tuple(t.requires_grad_() for t in (q, k, v, leaf))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        if kind == "table":
            out = attention_with_rel_pos_bias(q, k, v, table, index, backend=name)
        else:
            out = attention_with_bias(q, k, v, bias, backend=name)
        grads = torch.autograd.grad(out, inputs, dout)
        sync()
        return grads

    step()  # compile (flex) / autotune (triton) / first-call work outside the measurement
    benchmark.extra_info["backend"] = resolve_attention_backend(name, q)
    benchmark.extra_info["bias"] = kind
    if name == "triton" and device == "cpu":
        benchmark.extra_info["interpreter"] = True
    if backend == "triton" and device == "cuda":
        import beit_fast.kernels.attention as kernels

        for label, tuned in (("fwd", kernels._FWD_TUNED), ("dq", kernels._DQ_TUNED), ("dkdv", kernels._DKDV_TUNED),
                             ("table_grad", kernels._TG_TUNED)):
            benchmark.extra_info[f"config_{label}"] = str(getattr(tuned, "best_config", None))
    if device == "cuda":
        import triton.testing

        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(step, warmup=25, rep=100)
        rounds, warmup = 20, 3
    elif name == "triton":
        rounds, warmup = 2, 0  # the interpreter: checks the plumbing, its time means nothing
    else:
        rounds, warmup = 10, 2
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
