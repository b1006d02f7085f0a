"""What feeding the step costs, in counts that a CPU can measure: bytes copied to the device per step (uint8
views vs float32), host reads of device values per step (``--nonfinite_check host`` vs ``device``), loader
workers per process, tokenizer ids of the fast path against the previous one.

    PYTHONPATH=. python benchmarks/measure_feed.py [--batch 256] [--json out.json]

Timings are not measured here (they need the GPU: benchmarks/bench_end_to_end.py, bench_tokenizer.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from beit_fast.data.samples import sample_photographs
from beit_fast.train import feed, host_reads
from beit_fast.data.transforms import TwoViewConfig, TwoViewTransform


def bytes_per_step(batch: int, size: int = 224, patch: int = 16) -> dict:
    """Bytes of one step's batch as the loader ships it (views of a real photograph, the mask)."""
    photo = sample_photographs(max_side=448)[0]
    out = {}
    for name, uint8 in (("float32", False), ("uint8", True)):
        torch.manual_seed(0)
        views = TwoViewTransform(TwoViewConfig(input_size=size, second_input_size=size // 2, uint8_views=uint8))(photo)
        out[name] = batch * (sum(v.nbytes for v in views) + (size // patch) ** 2)  # + bool mask
    return out


def host_reads_per_step(steps: int = 20, log_freq: int = 10) -> dict:
    """Host reads per optimizer step of a tiny pretraining run, each non-finite check."""
    from PIL import Image

    from beit_fast import pretrain
    from beit_fast.tokenizer.dvae import DiscreteVAE, DVAEConfig
    from beit_fast.train.mim import PretrainEngine

    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    os.makedirs(f"{tmp}/images")
    for i in range(steps * 2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(f"{tmp}/images/{i}.png")
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=64, input_size=32)).save(f"{tmp}/tok.pt")
    marks: list[int] = []
    real = PretrainEngine.train_accumulated
    PretrainEngine.train_accumulated = lambda self, b, t: (marks.append(host_reads.count()), real(self, b, t))[1]
    result = {}
    try:
        for check in ("host", "device"):
            marks.clear()
            pretrain.main(["--data_path", f"{tmp}/images", "--tokenizer", "dvae", "--discrete_vae_weight_path",
                           f"{tmp}/tok.pt", "--model", "tiny", "--input_size", "32", "--patch_size", "8",
                           "--num_mask_patches", "6", "--min_mask_patches_per_block", "2", "--batch_size", "2",
                           "--num_workers", "0", "--amp", "none", "--epochs", "1", "--log_freq", str(log_freq),
                           "--no_progress", "--nonfinite_check", check, "--output_dir", f"{tmp}/{check}"])
            marks.append(host_reads.count())
            per_step = np.diff(marks).tolist()
            result[check] = {"reads_per_step": per_step, "mean": float(np.mean(per_step)),
                             "steps_without_reads": sum(1 for r in per_step if r == 0)}
    finally:
        PretrainEngine.train_accumulated = real
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    b = bytes_per_step(args.batch)
    reads = host_reads_per_step()
    workers = {"cores_per_process": feed.cores_per_process(), "cuda": feed.default_num_workers("cuda"),
               "cpu_pretraining": feed.default_num_workers("cpu"),
               "cpu_finetuning": feed.default_num_workers("cpu", on_cpu=0)}
    out = {"bytes_per_step": b, "host_reads": reads, "workers": workers}
    print(f"batch {args.batch} at 224/112 px: float32 views {b['float32'] / 1e6:.1f} MB, uint8 views "
          f"{b['uint8'] / 1e6:.1f} MB per step ({b['float32'] / b['uint8']:.2f}x fewer bytes)")
    for check, r in reads.items():
        print(f"--nonfinite_check {check}: {r['mean']:.2f} host reads per step on average, {r['steps_without_reads']} "
              f"of {len(r['reads_per_step'])} steps without any ({r['reads_per_step']})")
    print(f"workers on this machine: {workers}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
