"""What every stage of ``gpu_report.py`` shares: the device, sizes and data, compile switch, timing and rows.

On CUDA: BEiT-B/16 at 224, vocabulary 8192, 75 masked patches, batch 256 (``--batch``), bf16 autocast.
On CPU (the tests, ``gpu_report.py --cpu-smoke``): a tiny model at batch 4, fp32; the numbers mean nothing
there, the code paths (and, unless ``BEIT_FAST_SMOKE_NO_COMPILE=1``, inductor's compiles) are what is checked.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time

import numpy as np
import torch

from report_lib import RowWriter, spread
from step_common import mfu_percent, train_flops_per_image

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA:  # tiny CPU runs: one thread (two contending threads on a shared 2-core machine are 10x slower)
    torch.set_num_threads(1)
SMOKE_NO_COMPILE = os.environ.get("BEIT_FAST_SMOKE_NO_COMPILE") == "1"
NUM_MASKED = 75
SEED = 0


def compile_(obj, **kw):
    if SMOKE_NO_COMPILE:
        return obj
    return torch.compile(obj, **kw)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["graph_break"].values()))
    except Exception:
        return -1


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's count; -1 if it cannot be read)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def amp():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)


# --------------------------------------------------------------------------------------------------
# sizes, data
# --------------------------------------------------------------------------------------------------
def config(batch: int | None):
    from beit_fast.model.beit import get_config

    if CUDA:
        return get_config("base"), batch or 256
    # CPU: 64 px (N = 17, so that the Triton kernels run in the interpreter in seconds), 2 blocks (inductor
    # compiles a step in about 30 s of CPU time)
    return get_config("tiny", vocab_size=1024, img_size=64, depth=2), batch or 4


def make_data(cfg, batch: int, seed: int = 0) -> dict:
    """Images, tokenizer-view images, a blockwise mask of exactly 75 patches (CPU: 40%) and random tokens."""
    from beit_fast.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    grid = cfg.grid_size
    k = NUM_MASKED if grid * grid >= 2 * NUM_MASKED else max(1, int(0.4 * grid * grid))
    gen = MaskingGenerator((grid, grid), k, fixed_count=True, min_num_patches=min(16, k))
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(batch)])).bool()
    return {
        "images": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(DEVICE),
        "tok_images": torch.rand(batch, 3, grid * 8, grid * 8, generator=g).to(DEVICE),
        "masks": masks.to(DEVICE),
        "tokens": torch.randint(0, cfg.vocab_size, (batch, grid * grid), generator=g).to(DEVICE),
        "num_masked": k,
    }




# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def measure(step, start: int, warmup: int, repeats: int, inner: int) -> tuple[list[float], float, int]:
    """Warm up (compile, autotune, allocator), then ``repeats`` timings of ``inner`` steps each (host clock
    between device synchronisations; the steps themselves may sync). Returns (ms per step for each repeat,
    loss of the first step, next step index)."""
    i = start
    first = None
    for _ in range(warmup):
        loss = step(i)
        first = as_float(loss) if first is None else first
        i += 1
    reset_peak()
    per = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            step(i)
            i += 1
        sync()
        per.append((time.perf_counter() - t0) * 1e3 / inner)
    return per, first, i


def step_row(w: RowWriter, name: str, runs: str, per: list[float], cfg, batch: int, k: int, setup_s: float,
             first_loss, **extra) -> dict:
    s = spread(per)
    ips = batch / (s["median"] / 1e3)
    row = dict(name=name, runs=runs, batch=batch, ms=s["median"], ms_min=s["min"], ms_max=s["max"], ms_iqr=s["iqr"],
               repeats=s["n"], images_per_s=ips, setup_s=round(setup_s, 1), first_loss=first_loss,
               peak_mem_gib=peak_gib(), device=torch.cuda.get_device_name() if CUDA else "cpu", **extra)
    if CUDA:
        row["mfu_percent"] = mfu_percent(train_flops_per_image(cfg, k), ips)
    return w.emit("step", **row)



def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def bench_ms(fn, repeats: int) -> list[float]:
    """ms per call, one value per repeat: triton's do_bench (CUDA events, median) on CUDA, host clock on CPU."""
    if CUDA:
        import triton.testing

        return [float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) for _ in range(repeats)]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]

