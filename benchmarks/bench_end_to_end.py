"""End to end: what ``python -m beit_fast.pretrain --data_path ...`` delivers, per input pipeline, and
(``--finetune``) what ``python -m beit_fast.finetune`` delivers, each with its defaults.

    python benchmarks/bench_end_to_end.py                                   # CPU: tiny sizes (a smoke run)
    python benchmarks/bench_end_to_end.py --device cuda --model base --batch 256 --images 4096 \\
        --tokenizer dalle --steps 20 --warmup 5 --finetune --json e2e.json  # the GPU measurement

It runs ``beit_fast.pretrain.main`` itself (the real loop, loader, engine and tokenizer), once per
``--pipelines`` entry (``pil``, ``gpu``), on a folder of JPEGs it makes from the scikit-image photographs
(random crops and rescales, 300-500 px on the long side, quality 90: ImageNet-like files), with a
randomly initialised tokenizer of the real size (DALL-E's encoder: the cost is the same as trained
weights). Measured over the steps after ``--warmup`` (compilation, autotuning, worker start-up):

* ``images_per_s``: global batch x measured steps / wall time of those steps;
* ``data_wait_share``: the share of that time the training loop waited for the next batch (host time in
  the loop's ``next_batch``; with ``--data_pipeline gpu`` plus the time the compute stream waited on the
  GPU for the batch's event). With ``--nonfinite_check host`` the engine synchronises every step (it reads
  the loss), so host waiting is time the GPU had nothing to do; with the device check (the CUDA default)
  the GPU may still be running queued steps while the host waits: the share is then an upper bound. The
  window's ends are synchronised (the GPU has finished the warm-up steps and the measured ones);
* ``step_images_per_s``: the same steps without the waiting (the model step's own speed in this run);
* ``cpu_cores_used``: CPU seconds of the process and its DataLoader workers / wall seconds.

Nothing is timed by hand inside ``pretrain``: the loop's own ``next_batch`` and the engine's
``train_accumulated`` are wrapped (timestamps only), and the loader ``build_loader_for`` returns is kept to
read the GPU pipeline's stream waits. :func:`run_end_to_end` is the function to call from another script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["make_jpeg_folder", "run_end_to_end", "main"]


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def _make_one(args) -> str:
    path, k, seed, min_side, max_side, quality = args
    from beit_fast.data.samples import sample_photographs

    photos = sample_photographs()
    rng = np.random.default_rng([seed, k])
    img = photos[k % len(photos)]
    w, h = img.size
    area = rng.uniform(0.3, 1.0) * w * h
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(np.sqrt(area * ratio)))), min(h, int(round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x, y, x + cw, y + ch))
    side = int(rng.integers(min_side, max_side + 1))
    scale = side / max(cw, ch)
    crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    crop.save(path, "JPEG", quality=quality)
    return path


def make_jpeg_folder(root: str | os.PathLike, n: int, min_side: int = 300, max_side: int = 500, seed: int = 0,
                     quality: int = 90, processes: int | None = None) -> list[str]:
    """``n`` JPEGs ``root/img_XXXXXX.jpg`` from random crops of the scikit-image photographs, rescaled to
    ``min_side``..``max_side`` pixels on the long side. Files already there are reused."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"img_{k:06d}.jpg"), k, seed, min_side, max_side, quality) for k in range(n)]
    todo = [j for j in jobs if not os.path.isfile(j[0])]
    if len(todo) > 64 and (processes or os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
            list(pool.map(_make_one, todo, chunksize=16))
    else:
        for j in todo:
            _make_one(j)
    return [j[0] for j in jobs]


# --------------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------------
def _cpu_seconds_of_tree(root_pid: int) -> float | None:
    """utime + stime of ``root_pid`` and all its descendants (Linux /proc), else None."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
                except (OSError, IndexError, ValueError):
                    continue
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        total, stack = 0.0, [root_pid]
        while stack:
            pid = stack.pop()
            if pid in stats:
                total += stats[pid][1]
            stack.extend(children.get(pid, []))
        return total
    except (OSError, ValueError):
        return None


class _Probe:
    """Timestamps around the loop's data fetches and optimizer steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.fetches: list[tuple[float, float]] = []
        self.steps_done: list[float] = []
        self.window_start: float | None = None
        self.cpu_start: float | None = None
        self.loader = None

    def fetch_started(self) -> float:
        t = time.perf_counter()
        if len(self.steps_done) == self.warmup and self.window_start is None:
            self.window_start = t
            self.cpu_start = _cpu_seconds_of_tree(os.getpid())
        return t


def _random_tokenizer(kind: str, path: Path, vocab: int | None) -> Path:
    if path.is_file():
        return path
    torch.manual_seed(0)
    if kind == "dalle":
        from beit_fast.tokenizer import DalleEncoder

        torch.save(DalleEncoder().state_dict(), path)
    else:
        from beit_fast.tokenizer import DiscreteVAE, DVAEConfig

        DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=vocab or 64, input_size=32)).save(path)
    return path


def run_end_to_end(pipeline: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: str = "tiny",
                   batch: int = 4, steps: int = 3, warmup: int = 1, tokenizer: str = "dvae", device: str = "cpu",
                   input_size: int = 32, patch_size: int = 8, num_workers: int | None = 0,
                   extra_args: list[str] | None = None) -> dict:
    """One ``beit_fast.pretrain`` run with ``--data_pipeline pipeline``; returns the measured fields
    (module docstring). ``input_size`` / ``patch_size``: 224 / 16 for BEiT-B (the CPU smoke default is
    32 / 8, tokenizer view 32)."""
    from beit_fast.data import pipeline as pipeline_mod
    from beit_fast import pretrain

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_images = len([f for f in os.listdir(data_dir) if f.endswith(".jpg")])
    steps_per_epoch = n_images // batch
    if steps_per_epoch < 1:
        raise ValueError(f"{n_images} images are fewer than one batch of {batch}")
    total = warmup + steps
    epochs = math.ceil(total / steps_per_epoch)
    tok_path = _random_tokenizer(tokenizer, out_dir.parent / f"random_{tokenizer}.pt", None)
    grid = input_size // patch_size
    argv = ["--data_path", str(data_dir), "--data_pipeline", pipeline, "--model", model, "--batch_size", str(batch),
            "--tokenizer", tokenizer, "--discrete_vae_weight_path", str(tok_path), "--device", device,
            "--input_size", str(input_size), "--patch_size", str(patch_size),
            "--num_mask_patches", str(min(75, int(0.4 * grid * grid))), "--min_mask_patches_per_block",
            str(16 if grid >= 14 else 2), "--epochs", str(epochs), "--warmup_epochs", "0",
            "--stop_after_steps", str(total), "--log_freq", str(10**6), "--save_ckpt_freq", str(10**6),
            "--no_progress", "--output_dir", str(out_dir / pipeline)]
    if num_workers is not None:
        argv += ["--num_workers", str(num_workers)]
    argv += list(extra_args or [])

    probe = _Probe(warmup)
    # the run imports build_loader_for from beit_fast.data.pipeline when it starts (after parsing its flags)
    real_build = pipeline_mod.build_loader_for

    def build_loader_for(*a, **k):
        probe.loader = real_build(*a, **k)
        return probe.loader

    pipeline_mod.build_loader_for = build_loader_for
    try:
        _timed_run(pretrain.main, argv, probe, total)
    finally:
        pipeline_mod.build_loader_for = real_build
    row = _row(probe, warmup, total, batch)
    return {"task": "pretrain", "pipeline": pipeline,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "model": model,
            "batch": batch, "tokenizer": tokenizer, "images": n_images, **row}


def _timed_run(main, argv: list[str], probe: _Probe, total: int) -> None:
    """``main(argv)`` with the loop's ``next_batch`` and the engine's ``train_accumulated`` timestamped."""
    from beit_fast.train import engine as engine_mod
    from beit_fast.train import feed as loop_mod

    real_next, real_step = loop_mod.next_batch, engine_mod.Engine.train_accumulated

    def next_batch(*a, **k):
        t0 = probe.fetch_started()
        try:
            return real_next(*a, **k)
        finally:
            probe.fetches.append((t0, time.perf_counter()))

    def train_accumulated(self, *a, **k):
        result = real_step(self, *a, **k)
        if self.device.type == "cuda" and len(probe.steps_done) + 1 in (probe.warmup, total):
            torch.cuda.synchronize(self.device)  # the device check reads nothing per step: the GPU may lag
        probe.steps_done.append(time.perf_counter())
        if len(probe.steps_done) == total:
            probe.cpu_end = _cpu_seconds_of_tree(os.getpid())
        return result

    loop_mod.next_batch, engine_mod.Engine.train_accumulated = next_batch, train_accumulated
    try:
        main(argv)
    finally:
        loop_mod.next_batch, engine_mod.Engine.train_accumulated = real_next, real_step
    if len(probe.steps_done) < total or probe.window_start is None:
        raise RuntimeError(f"the run made {len(probe.steps_done)} steps, expected {total}")


def _row(probe: _Probe, warmup: int, total: int, batch: int) -> dict:
    """The measured fields of a run (module docstring)."""
    steps = total - warmup
    wall = probe.steps_done[total - 1] - probe.window_start
    host_wait = sum(b - a for a, b in probe.fetches[warmup:total])
    device_wait = 0.0
    stats = getattr(probe.loader, "stats", None)
    if stats is not None and hasattr(stats, "device_waits"):
        device_wait = sum(stats.device_waits()[warmup:total])
    wait = min(wall, host_wait + device_wait)
    cpu = None if probe.cpu_start is None or getattr(probe, "cpu_end", None) is None else \
        (probe.cpu_end - probe.cpu_start) / wall
    return {
        "measured_steps": steps, "warmup_steps": warmup, "seconds": wall, "images_per_s": steps * batch / wall,
        "data_wait_share": wait / wall, "host_wait_s": host_wait, "device_wait_s": device_wait,
        "step_images_per_s": steps * batch / max(wall - wait, 1e-9), "cpu_cores_used": cpu,
        "num_workers": getattr(probe.loader, "num_workers", None), "logical_cores": os.cpu_count(),
    }


def run_finetune_end_to_end(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: str = "tiny",
                            batch: int = 4, steps: int = 3, warmup: int = 1, device: str = "cpu",
                            input_size: int = 32, num_workers: int | None = None,
                            extra_args: list[str] | None = None) -> dict:
    """One ``beit_fast.finetune`` run (from random weights: the speed is the same) on the JPEGs of
    ``data_dir`` filed into two classes (hard links, ``train/`` and a small ``val/``), with its defaults
    unless ``num_workers`` / ``extra_args`` say otherwise; the same measured fields as
    :func:`run_end_to_end` (``pipeline``: the fine-tuning transforms' PIL pipeline)."""
    from beit_fast import finetune

    out_dir = Path(out_dir)
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".jpg"))
    total = warmup + steps
    if len(files) < (total + 1) * batch + 2:
        raise ValueError(f"{len(files)} images are too few for {total} steps of {batch} in one epoch")
    root = out_dir / "labelled"
    for k, name in enumerate(files):
        split = "val" if k < 2 else "train"
        target = root / split / f"c{k % 2}" / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(Path(data_dir) / name, target)
    argv = ["--data_path", str(root), "--model", model, "--input_size", str(input_size), "--batch_size", str(batch),
            "--epochs", "1", "--warmup_epochs", "0", "--stop_after_steps", str(total), "--no-save_ckpt",
            "--no_progress", "--device", device, "--output_dir", str(out_dir / "finetune")]
    if num_workers is not None:
        argv += ["--num_workers", str(num_workers)]
    argv += list(extra_args or [])
    probe = _Probe(warmup)
    _timed_run(finetune.main, argv, probe, total)
    return {"task": "finetune", "pipeline": "pil", "model": model, "batch": batch, "tokenizer": None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "images": len(files),
            **_row(probe, warmup, total, batch)}


def markdown(rows: list[dict]) -> str:
    lines = ["| task | pipeline | device | model | batch | images/s | step alone images/s | waiting for data | "
             "CPU cores used |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cpu = "" if r["cpu_cores_used"] is None else f"{r['cpu_cores_used']:.1f} of {r['logical_cores']}"
        lines.append(f"| {r.get('task', 'pretrain')} | {r['pipeline']} | {r['device']} | {r['model']} | {r['batch']} | "
                     f"{r['images_per_s']:.1f} | "
                     f"{r['step_images_per_s']:.1f} | {100 * r['data_wait_share']:.1f}% | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pipelines", default="pil,gpu", help="comma-separated --data_pipeline values")
    p.add_argument("--finetune", action="store_true",
                   help="also a fine-tuning row (beit_fast.finetune with its defaults, the same JPEGs in two classes)")
    p.add_argument("--model", default=None, help="tiny on CPU, base on CUDA")
    p.add_argument("--batch", type=int, default=None, help="4 on CPU, 256 on CUDA")
    p.add_argument("--images", type=int, default=None, help="JPEGs to make (CPU 16, CUDA 4096)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (CPU 3, CUDA 20)")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (CPU 1, CUDA 5)")
    p.add_argument("--tokenizer", choices=["dalle", "dvae"], default=None, help="dvae (tiny) on CPU, dalle on CUDA")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: pretrain's)")
    p.add_argument("--work_dir", default=None, help="where the JPEGs and runs go (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--rows", default=None, help="append each row to this JSON-lines file (table 'end_to_end'), "
                   "as the stages of benchmarks/gpu_report.py do")
    p.add_argument("extra", nargs="*", help="more pretrain flags, after --")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    model = args.model or ("base" if cuda else "tiny")
    batch = args.batch or (256 if cuda else 4)
    n = args.images or (4096 if cuda else 16)
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    tokenizer = args.tokenizer or ("dalle" if cuda else "dvae")
    size, patch = (224, 16) if cuda or model != "tiny" else (32, 8)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="beit_e2e_"))
    lo, hi = (300, 500) if size == 224 else (48, 96)
    t0 = time.time()
    make_jpeg_folder(work / "jpegs", n, lo, hi)
    print(f"{n} JPEGs in {work / 'jpegs'} ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    workers = args.num_workers if args.num_workers is not None else (None if cuda else 0)
    runs = [lambda p=p: run_end_to_end(p, work / "jpegs", work / "runs", model=model, batch=batch, steps=steps,
                                       warmup=warmup, tokenizer=tokenizer, device=args.device, input_size=size,
                                       patch_size=patch, num_workers=workers, extra_args=args.extra)
            for p in filter(None, args.pipelines.split(","))]
    if args.finetune:
        runs.append(lambda: run_finetune_end_to_end(work / "jpegs", work / "runs", model=model, batch=batch,
                                                    steps=steps, warmup=warmup, device=args.device, input_size=size,
                                                    num_workers=workers))
    for run in runs:
        row = run()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.rows:
            with open(args.rows, "a") as f:
                f.write(json.dumps({"table": "end_to_end", **row}) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
