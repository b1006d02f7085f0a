"""Forward + backward of attention_with_bias, backend by backend (pytest-benchmark).

    pytest benchmarks/bench_attention.py --benchmark-only                    # CPU shape (< 1 min)
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/bench_attention.py --benchmark-only  # + BEiT-B shapes on CUDA

One benchmark group per (device, shape, dtype), so backends sit side by side in the report. Each round
is one forward and one backward (gradients of q, k, v and of the fp32 [H, N, N] bias, as in training);
on CUDA a round ends with a synchronize, and extra_info records the peak memory of one step above the
inputs (MiB) and triton.testing.do_bench's median (ms, CUDA events), the figure to quote. Use these
numbers to order ``beit_fast.ops.attention.AUTO_PRIORITY["cuda"]`` (and record them there).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from beit_fast.ops.attention import attention_with_bias, resolve_attention_backend

HAS_CUDA = torch.cuda.is_available()
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (device, B, H, N, Dh, dtype)
CONFIGS = [
    ("cpu", 8, 4, 197, 32, torch.float32),
    ("cuda", 64, 12, 197, 64, torch.bfloat16),  # BEiT-B
    ("cuda", 256, 12, 197, 64, torch.bfloat16),  # BEiT-B at the paper's per-GPU batch
]
BACKENDS = {"cpu": ["math", "sdpa"], "cuda": ["math", "sdpa", "flex", "xformers"]}


def _params():
    out = []
    for device, b, h, n, d, dtype in CONFIGS:
        for backend in BACKENDS[device]:
            reason = None
            if device == "cuda" and not HAS_CUDA:
                reason = "needs a CUDA device"
            elif backend == "xformers" and not HAS_XFORMERS:
                reason = "xformers is not installed"
            elif backend == "flex" and TRITON_INTERPRETED:
                reason = "TRITON_INTERPRET=1: run with BEIT_FAST_REAL_GPU=1"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            dt = str(dtype).replace("torch.", "")
            out.append(
                pytest.param(device, (b, h, n, d), dtype, backend, marks=marks, id=f"{device}-B{b}-{dt}-{backend}")
            )
    return out


@pytest.mark.parametrize("device,shape,dtype,backend", _params())
def test_attention_fwd_bwd(benchmark, device, shape, dtype, backend):
    b, h, n, d = shape
    dt = str(dtype).replace("torch.", "")
    benchmark.group = f"attention fwd+bwd {device} B={b} H={h} N={n} Dh={d} {dt}"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(4))
    bias = torch.randn(h, n, n, device=device, generator=g)  # fp32, like RelativePositionBias' output
    q, k, v, bias = (t.requires_grad_() for t in (q, k, v, bias))
    inputs = (q, k, v, bias)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = attention_with_bias(q, k, v, bias, backend=backend)
        grads = torch.autograd.grad(out, inputs, dout)
        sync()
        return grads

    step()  # compile (flex) / first-call work outside the measurement
    benchmark.extra_info["backend"] = resolve_attention_backend(backend, q)
    if device == "cuda":
        import triton.testing

        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(step, warmup=25, rep=100)
        rounds, warmup = 20, 3
    else:
        rounds, warmup = 10, 2
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
