"""Load: a long run of a micro config (16-pixel images, 2x2 patch grid, tiny model) with two data
workers, an epoch boundary and a checkpoint every 50 steps; no memory growth after warm-up (main process
and workers) and no slow-down.

2,000 steps by default (about 70 s on an idle 2-core machine, where the tiny model's step costs ~35 ms,
all per-op overhead; 40 epoch boundaries, 8 checkpoints); ``BEIT_FAST_LONG_RUN_STEPS=20000`` makes it a
longer soak test. Measured figures are printed (``pytest -s``): RSS of the main process (from the log, which
records it) and of the two workers (sampled from /proc while it runs), and median step times.
"""
import os
import sys
import time

import numpy as np
import pytest

from beit_fast.utils.checkpoint import load_checkpoint
from test_pretrain import join_all, make_toy_images, make_toy_tokenizer, read_log, start_forked

STEPS = int(os.environ.get("BEIT_FAST_LONG_RUN_STEPS", 2000))
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")]


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_long_run_has_bounded_memory_and_stable_step_time(tmp_path):
    images = make_toy_images(tmp_path / "images", n=400, size=20)
    tok = make_toy_tokenizer(tmp_path / "tok.pt", input_size=16)
    out = tmp_path / "out"
    batch = 8
    steps_per_epoch = 400 // batch
    epochs = STEPS // steps_per_epoch
    argv = ["--data_path", images, "--tokenizer", "dvae", "--discrete_vae_weight_path", tok, "--model", "tiny",
            "--input_size", 16, "--patch_size", 8, "--num_mask_patches", 2, "--min_mask_patches_per_block", 1,
            "--fixed_mask_count", "--batch_size", batch, "--num_workers", 2, "--amp", "none", "--epochs", epochs,
            "--warmup_epochs", 1, "--save_ckpt_freq", 5, "--keep_last", 1, "--log_freq", 25, "--no_progress",
            "--output_dir", out]
    (proc,) = start_forked(argv)
    samples = []  # (time, total RSS of the data workers)
    t0 = time.time()
    finished = False
    try:
        while proc.is_alive() and time.time() - t0 < 900:
            workers = children(proc.pid)
            if len(workers) == 2:
                values = [rss_mb(w) for w in workers]
                if None not in values and min(values) > 0 and not (out / f"checkpoint-{epochs}.pt").is_file():
                    samples.append((time.time(), sum(values)))  # (none once the run ends: workers exit)
            time.sleep(0.1)
        finished = not proc.is_alive()
    finally:
        codes = join_all([proc], timeout=60 if finished else 0.1)  # killed if still running
    assert codes == [0]
    wall = time.time() - t0

    log = read_log(out)
    total = steps_per_epoch * epochs
    assert [r["step"] for r in log] == list(range(25, total + 1, 25))
    assert all(np.isfinite(r["loss"]) for r in log)
    assert np.mean([r["loss"] for r in log[-4:]]) < np.mean([r["loss"] for r in log[:2]])
    assert load_checkpoint(out / "checkpoint-last.pt")["step"] == total

    # Main process: RSS once warm (after a fifth of the run: allocator pools, worker pipes, first
    # checkpoints) vs at the end.
    rss = np.array([r["rss_mb"] for r in log])
    warm = len(rss) // 5
    main_growth = rss[-1] - rss[warm]
    # Workers: same, on the samples taken while it ran.
    assert len(samples) >= 10, f"only {len(samples)} worker samples"
    worker_rss = np.array([s[1] for s in samples])
    w_warm = len(worker_rss) // 5
    worker_growth = worker_rss[-3:].mean() - worker_rss[w_warm]
    # Step time (wall time of the logging window / steps in it): first vs last quarter, medians.
    times = np.array([r["step_time_s"] for r in log])
    quarter = len(times) // 4
    first, last = np.median(times[1:quarter + 1]), np.median(times[-quarter:])
    print(f"\nlong run: {total} steps in {wall:.1f} s; main RSS {rss[0]:.0f} MB at step {log[0]['step']}, "
          f"{rss[warm]:.0f} MB at step {log[warm]['step']}, {rss[-1]:.0f} MB at the end (growth {main_growth:+.1f} MB); "
          f"2 workers {worker_rss[0]:.0f} -> {worker_rss[w_warm]:.0f} -> {worker_rss[-1]:.0f} MB "
          f"(growth {worker_growth:+.1f} MB); median step {1000 * first:.1f} ms (first quarter) vs "
          f"{1000 * last:.1f} ms (last quarter)")
    assert main_growth < 50, (rss.round(1).tolist())
    assert worker_growth < 50, (worker_rss[::10].round(1).tolist())
    assert last < 3 * first, (times.round(4).tolist())  # loose: the machine is shared
