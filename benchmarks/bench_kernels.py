"""Benchmarks of the fused kernels against their baselines, forward + backward, with peak memory.

    pytest benchmarks/ --benchmark-only                   # CPU: small shapes, < 2 minutes
    BEIT_FAST_REAL_GPU=1 pytest benchmarks/ --benchmark-only   # CUDA: BEiT-B shapes as well

Cross-entropy head (rows = 256 images x 75 masked tokens, D = 768, V = 8192, bf16 on CUDA):
  reference_fp32      masked_linear_cross_entropy_reference (fp32 logits, the definition)
  eager_<dtype>       F.cross_entropy(F.linear(h, w, b).float(), y) with h, w in <dtype> (bf16: what
                      autocast does; fp32 on the CPU shapes)
  torch_lce           torch.nn.functional.linear_cross_entropy, chunked (if this torch has it)
  liger               Liger-Kernel's fused linear cross entropy (if importable)
  beit_fast_triton    masked_linear_cross_entropy(backend="triton")
Patch embedding + mask (B = 256, 224x224, P = 16, D = 768, 75 of 196 patches masked, bf16 on CUDA):
  conv2d_reference    patch_embed_mask_reference (conv2d + flatten + blend, eager)
  beit_fast_triton    patch_embed_mask(backend="triton")

On CUDA, ``benchmark.extra_info`` records the peak memory allocated above the inputs (MiB) of one
forward+backward. On CPU the Triton kernels would run in Triton's interpreter, hundreds of times slower
than compiled code: those rows are left out unless ``BEIT_FAST_BENCH_INTERPRETED=1``, and then they are
named ``..._INTERPRETED`` (at tiny sizes; they check that the harness works, their times mean nothing).

Correctness gate (benchmarks/correctness.py): before timing, each row's loss / output and every gradient
are compared once with an fp64 definition (F.linear + F.cross_entropy; F.conv2d + blend), by the tests'
rule (fp32: 1e-5 x each tensor's scale; bf16: flash-attention's 2x rule, with the eager row's dtype path
as PyTorch's own); a wrong row fails ("WRONG ANSWER") and is not timed.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from beit_fast.ops import (
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_reference,
    patch_embed_mask,
    patch_embed_mask_reference,
)
from beit_fast.ops.backend import triton_available, triton_interpreting
from correctness import LOW_PRECISION, check, run_once

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
IGN = -100
RUN_INTERPRETED = os.environ.get("BEIT_FAST_BENCH_INTERPRETED") == "1"
INTERPRETED_SKIP = ("Triton kernels on CPU run in the interpreter (times mean nothing): set "
                    "BEIT_FAST_BENCH_INTERPRETED=1 to run them as a harness check")


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _label(variant: str, dtype: torch.dtype) -> str:
    """The row name: what runs, in which dtype, and whether Triton is interpreted."""
    if variant == "eager":
        return f"eager_{_dt(dtype)}"
    if variant == "beit_fast_triton" and not CUDA:
        return "beit_fast_triton_INTERPRETED"
    return variant


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _bench(benchmark, fn, leaves, grad_out=None, on_cpu_rounds=3):
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad_out)
        _sync()

    if CUDA:
        step()  # compile / autotune / cuBLAS heuristics outside the measurement
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_mem_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    else:
        benchmark.pedantic(step, rounds=on_cpu_rounds, iterations=1, warmup_rounds=1)


# --------------------------------------------------------------------------------------------------
# Cross-entropy head
# --------------------------------------------------------------------------------------------------
CE_SHAPES = {
    # name: (rows, D, V, dtype, devices)
    "beit_b": (256 * 75, 768, 8192, torch.bfloat16, ("cuda",)),
    "cpu_small": (512, 64, 1024, torch.float32, ("cpu", "cuda")),
    "tiny": (64, 32, 256, torch.float32, ("cpu", "cuda")),
}
CE_VARIANTS = ["reference_fp32", "eager", "torch_lce", "liger", "beit_fast_triton"]


def _ce_params():
    return [pytest.param(shape, variant, id=f"{shape}-{_label(variant, CE_SHAPES[shape][3])}")
            for shape in CE_SHAPES for variant in CE_VARIANTS]


def _ce_inputs(rows, D, V, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(rows, D, device=DEV, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=DEV, generator=g) * D**-0.5).to(dtype).requires_grad_()
    b = torch.zeros(V, device=DEV).to(dtype).requires_grad_()
    y = torch.randint(0, V, (rows,), device=DEV, generator=g)
    return h, w, b, y


def _ce_fn(variant, h, w, b, y):
    if variant == "reference_fp32":
        return lambda: masked_linear_cross_entropy_reference(h, w, b, y, ignore_index=IGN)
    if variant == "eager":
        return lambda: F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=IGN)
    if variant == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            pytest.skip("this torch has no F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(h, w, y, linear_bias=b, ignore_index=IGN, options=opts)
    if variant == "liger":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception:
            pytest.skip("liger_kernel is not importable")
        if not CUDA:
            pytest.skip("Liger-Kernel needs CUDA")
        return lambda: liger_fused_linear_cross_entropy(h, w, y, bias=b, ignore_index=IGN)
    if variant == "beit_fast_triton":
        if not triton_available():
            pytest.skip("triton is not available")
        return lambda: masked_linear_cross_entropy(h, w, b, y, ignore_index=IGN, backend="triton")
    raise AssertionError(variant)


@pytest.mark.parametrize("shape,variant", _ce_params())
def test_bench_linear_cross_entropy(benchmark, shape, variant):
    rows, D, V, dtype, devices = CE_SHAPES[shape]
    if DEV not in devices:
        pytest.skip(f"shape {shape} runs on {devices} only")
    interpreted = variant == "beit_fast_triton" and not CUDA
    if interpreted and not RUN_INTERPRETED:
        pytest.skip(INTERPRETED_SKIP)
    if interpreted and shape != "tiny":
        pytest.skip("Triton interpreter: tiny shape only on CPU")
    if shape == "tiny" and CUDA:
        pytest.skip("tiny shape is for the CPU interpreter")
    h, w, b, y = _ce_inputs(rows, D, V, dtype)
    y[::4] = IGN  # ignored rows on every path
    fn = _ce_fn(variant, h, w, b, y)
    leaves64 = [t.detach().double().requires_grad_() for t in (h, w, b)]
    check(benchmark, run_once(fn, [h, w, b]),
          run_once(lambda: F.cross_entropy(F.linear(*leaves64), y, ignore_index=IGN), leaves64),
          run_once(_ce_fn("eager", h, w, b, y), [h, w, b]) if dtype in LOW_PRECISION else None,
          ["loss", "grad hidden", "grad weight", "grad bias"])
    benchmark.group = f"linear_ce[{shape}: rows={rows} D={D} V={V} {_dt(dtype)} {DEV}]"
    benchmark.extra_info["interpreter"] = bool(interpreted and triton_interpreting())
    benchmark.extra_info["runs"] = _label(variant, dtype)
    _bench(benchmark, fn, [h, w, b])


# --------------------------------------------------------------------------------------------------
# Patch embedding + mask
# --------------------------------------------------------------------------------------------------
PE_SHAPES = {
    # name: (B, H, D, P, n_masked, dtype, devices)
    "beit_b": (256, 224, 768, 16, 75, torch.bfloat16, ("cuda",)),
    "cpu_small": (8, 64, 96, 8, 26, torch.float32, ("cpu", "cuda")),
    "tiny": (1, 32, 64, 8, 6, torch.float32, ("cpu", "cuda")),
}


def _pe_inputs(B, H, D, P, n_masked, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    px = torch.randn(B, 3, H, H, device=DEV, generator=g).to(dtype)
    w = (torch.randn(D, 3, P, P, device=DEV, generator=g) * 0.02).to(dtype).requires_grad_()
    b = torch.zeros(D, device=DEV).to(dtype).requires_grad_()
    tok = (torch.randn(D, device=DEV, generator=g) * 0.02).to(dtype).requires_grad_()
    N = (H // P) ** 2
    scores = torch.rand(B, N, device=DEV, generator=g)
    mask = scores.argsort(dim=1).argsort(dim=1) < n_masked  # exactly n_masked per image
    return px, w, b, tok, mask


@pytest.mark.parametrize("shape,variant", [pytest.param(shape, v, id=f"{shape}-{_label(v, PE_SHAPES[shape][5])}")
                                           for shape in PE_SHAPES for v in ("conv2d_reference", "beit_fast_triton")])
def test_bench_patch_embed_mask(benchmark, shape, variant):
    B, H, D, P, n_masked, dtype, devices = PE_SHAPES[shape]
    if DEV not in devices:
        pytest.skip(f"shape {shape} runs on {devices} only")
    interpreted = variant == "beit_fast_triton" and not CUDA
    if interpreted and not RUN_INTERPRETED:
        pytest.skip(INTERPRETED_SKIP)
    if interpreted and shape != "tiny":
        pytest.skip("Triton interpreter: tiny shape only on CPU")
    if shape == "tiny" and CUDA:
        pytest.skip("tiny shape is for the CPU interpreter")
    if variant == "beit_fast_triton" and not triton_available():
        pytest.skip("triton is not available")
    px, w, b, tok, mask = _pe_inputs(B, H, D, P, n_masked, dtype)
    grad_out = torch.randn(B, (H // P) ** 2, D, device=DEV).to(dtype)
    if variant == "conv2d_reference":
        def fn():
            return patch_embed_mask_reference(px, w, b, tok, mask)
    else:
        def fn():
            return patch_embed_mask(px, w, b, tok, mask, backend="triton")
    px64, mask64 = px.double(), mask.unsqueeze(-1).double()
    w64, b64, tok64 = (t.detach().double().requires_grad_() for t in (w, b, tok))

    def definition():
        x = F.conv2d(px64, w64, b64, stride=P).flatten(2).transpose(1, 2)
        return x * (1 - mask64) + tok64 * mask64

    check(benchmark, run_once(fn, [w, b, tok], grad_out), run_once(definition, [w64, b64, tok64], grad_out.double()),
          run_once(lambda: patch_embed_mask_reference(px, w, b, tok, mask), [w, b, tok], grad_out)
          if dtype in LOW_PRECISION else None, ["out", "grad weight", "grad bias", "grad mask_token"])
    benchmark.group = f"patch_embed_mask[{shape}: B={B} {H}x{H} P={P} D={D} {_dt(dtype)} {DEV}]"
    benchmark.extra_info["interpreter"] = bool(interpreted and triton_interpreting())
    benchmark.extra_info["runs"] = _label(variant, dtype)
    _bench(benchmark, fn, [w, b, tok], grad_out=grad_out)
