"""Where the fast step's time goes: a torch.profiler table of the top kernels (CUDA; CPU works too).

    python benchmarks/profile_step.py [--batch 256] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import DEVICE, bench_config, make_batch, make_engine  # noqa: E402


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the benchmark's)")
    p.add_argument("--variant", default="fast", choices=["fast", "reference", "fast_ckpt_all"], help="step to profile")
    p.add_argument("--rows", type=int, default=20, help="rows of the table")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    cfg, batch_size = bench_config()
    batch_size = args.batch or batch_size
    batch, tokens = make_batch(cfg, batch_size)
    engine = make_engine(args.variant, cfg, tokens)
    batch = tuple(t.to(DEVICE) for t in batch)
    for step in range(5):
        engine.train_step(batch, step)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(5, 8):
            engine.train_step(batch, step)
    key = "cuda_time_total" if DEVICE.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    header = f"profile: {args.variant} step, D{cfg.embed_dim}xL{cfg.depth}, batch {batch_size}, 3 steps, {DEVICE}\n"
    text = header + table
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
