"""The tokenizer at speed: DALL-E's encoder in fp32, and in bf16 / fp16 channels-last, eager and compiled.

    python benchmarks/bench_tokenizer.py                       # CPU: the tiny dVAE, batch 8 (a smoke run)
    python benchmarks/bench_tokenizer.py --device cuda         # DALL-E-sized encoder, batch 256
    pytest benchmarks/bench_tokenizer.py --benchmark-only

Inputs are real tokenizer views (the PIL pipeline's 112 px Lanczos views of random crops of the
scikit-image photographs), so the token agreement with fp32 is measured on photographs. The weights are
random unless ``--weights`` gives DALL-E's ``encoder.pkl`` (or a state dict of its layout): speed does not
depend on them, agreement does (a trained encoder has more decided argmaxes; report both when you can).
Variants use the engine's own ``beit_fast.tokenizer.base.tokenize`` (autocast + channels-last); "weights kept"
casts the convolution weights once (``keep_weights_in``, as a pretraining run does); ``compiled`` wraps the
encoder's ``encode_logits`` in ``torch.compile``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from beit_fast.tokenizer.base import tokenize
from beit_fast.data.samples import sample_photographs
from beit_fast.data.transforms import TokenizerViewTransform, TwoViewConfig

__all__ = ["tokenizer_views", "measure_tokenizer", "main"]


def tokenizer_views(n: int, size: int = 112, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` map_pixels'd tokenizer views of random crops of the photographs."""
    tf = TokenizerViewTransform(TwoViewConfig(second_input_size=size))
    photos = sample_photographs(max_side=512)
    torch.manual_seed(seed)
    return torch.stack([tf(photos[i % len(photos)]) for i in range(n)])


def _build(kind: str, device: torch.device, weights: str | None):
    from beit_fast.tokenizer import build_tokenizer

    if weights:
        return build_tokenizer(kind, weights, device=device)
    torch.manual_seed(0)
    extra = {"preset": "tiny"} if kind == "dvae" else {}
    return build_tokenizer(kind, random_init=True, device=device, **extra)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    fn()  # warm-up (compile, autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_tokenizer(device: str = "cpu", batch: int | None = None, kind: str | None = None,
                      weights: str | None = None, repeats: int = 5, compile: bool | None = None) -> list[dict]:
    """One row per variant: ms per batch, images/s, token agreement with fp32 on the same views."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    batch = batch or (256 if cuda else 8)
    kind = kind or ("dalle" if cuda else "dvae")
    compile = cuda if compile is None else compile
    tok = _build(kind, dev, weights)
    views = tokenizer_views(batch, tok.input_size).to(dev)
    ref = tokenize(tok, views)
    variants: list[tuple[str, torch.dtype | None, bool, bool]] = [("fp32", None, False, False)]
    low = [torch.bfloat16] + ([torch.float16] if cuda else [])
    variants += [(f"{str(d).split('.')[-1]} channels-last", d, False, False) for d in low]
    # what a pretraining run uses: weights kept in the half precision (PretrainEngine.settle_tokenizer)
    variants += [(f"{str(d).split('.')[-1]} channels-last, weights kept {str(d).split('.')[-1]}", d, False, True)
                 for d in low]
    if compile:
        variants += [(f"{str(d).split('.')[-1]} channels-last, weights kept, compiled", d, True, True) for d in low]
    rows = []
    for name, dtype, compiled, kept in variants:
        run_tok = copy.deepcopy(tok).keep_weights_in(dtype) if kept else tok
        eager = run_tok.encode_logits
        encode = torch.compile(eager) if compiled else eager
        if dtype is not None:
            run_tok.to(memory_format=torch.channels_last)
        seconds = _time(lambda: tokenize(run_tok, views, dtype, encode), dev, repeats)
        ids = tokenize(run_tok, views, dtype, encode)
        rows.append({"variant": name, "tokenizer": kind, "batch": batch, "device": device,
                     "ms": 1e3 * seconds, "images_per_s": batch / seconds,
                     "agreement_with_fp32": (ids == ref).float().mean().item(),
                     "weights": "trained" if weights else "random"})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokenizer", choices=["dalle", "dvae"], default=None)
    p.add_argument("--weights", default=None, help="DALL-E encoder.pkl / state dict (default: random weights)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--rows", default=None, help="append the rows to this JSON-lines file (table 'tokenizer'), as "
                   "the stages of benchmarks/gpu_report.py do")
    args = p.parse_args(argv)
    rows = measure_tokenizer(args.device, args.batch, args.tokenizer, args.weights, compile=args.compile)
    if args.rows:
        with open(args.rows, "a") as f:
            for r in rows:
                f.write(json.dumps({"table": "tokenizer", **r}) + "\n")
    print("| variant | ms / batch | images/s | token agreement with fp32 |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['tokenizer']} {r['variant']} (batch {r['batch']}, {r['weights']} weights) | {r['ms']:.1f} | "
              f"{r['images_per_s']:.0f} | {100 * r['agreement_with_fp32']:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def test_tokenizer_variants(benchmark):
    rows: list[dict] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark.group = "tokenizer"
    benchmark.pedantic(lambda: rows.extend(measure_tokenizer(device, repeats=2)), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    assert rows and all(0.0 <= r["agreement_with_fp32"] <= 1.0 for r in rows)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
