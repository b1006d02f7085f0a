"""Crash safety: SIGTERM / SIGINT stop cleanly with a checkpoint; SIGKILL (also in the middle of a save)
never leaves an unloadable latest checkpoint; ``--resume auto`` takes the newest loadable checkpoint and
the resumed run is bit-identical to an uninterrupted one; retention (--keep_last) and checkpoint-best.pt.

The victims are ``pretrain.main`` runs in processes forked from this one (``test_pretrain.start_forked``).
"""
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from beit_fast import pretrain
from beit_fast.checkpoint import (
    atomic_save, find_resume_checkpoint, load_checkpoint, validate_checkpoint,
)
from beit_fast.distributed import GracefulStop
from test_pretrain import join_all, make_toy_images, make_toy_tokenizer, read_log, run_forked, start_forked

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    return make_toy_images(root / "images"), make_toy_tokenizer(root / "tok.pt")


def crash_args(toy, out, *extra):
    """18 steps (3 epochs of 6), a checkpoint after every step (so that kills often land in a save)."""
    images, tok = toy
    return ["--data_path", images, "--tokenizer", "dvae", "--discrete_vae_weight_path", tok, "--model", "tiny",
            "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6", "--min_mask_patches_per_block", "2",
            "--batch_size", "4", "--amp", "none", "--epochs", "3", "--warmup_epochs", "1", "--drop_path", "0.2",
            "--save_ckpt_steps", "1", "--save_ckpt_freq", "1", "--log_freq", "1", "--no_progress",
            "--output_dir", out, *map(str, extra)]


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_forked(crash_args(toy, out, "--num_workers", 0))
    return out


def assert_identical_runs(out, ref):
    log, ref_log = read_log(out), read_log(ref)
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(1, 19))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    a, b = load_checkpoint(out / "checkpoint-last.pt"), load_checkpoint(ref / "checkpoint-last.pt")
    assert a["step"] == b["step"] == 18
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list(Path(out).glob(".*.tmp"))


def logged_steps(out):
    path = Path(out) / "log.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def wait_for(predicate, procs, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        assert all(p.is_alive() for p in procs), [p.exitcode for p in procs]
        time.sleep(0.002)


def temp_files(out):
    return list(Path(out).glob(".checkpoint-*.tmp"))


def test_sigkill_at_random_moments_and_mid_save_then_resume_auto_is_exact(toy, reference, tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(os.getpid())
    kills = mid_save_kills = 0
    while kills < 6 and mid_save_kills < 2:
        last = out / "checkpoint-last.pt"
        start = load_checkpoint(last)["step"] if last.is_file() else 0
        if start + 3 > 18:  # no room left for another kill
            break
        procs = start_forked(crash_args(toy, out, "--num_workers", 0, "--resume", "auto"))
        if kills == 0:  # at a random moment of the run
            wait_for(lambda: logged_steps(out) >= 1, procs)
            time.sleep(rng.uniform(0.0, 0.1))
        else:  # as soon as a save is under way (its temporary file exists), after a new step
            wait_for(lambda: logged_steps(out) >= start + 2 and bool(temp_files(out)), procs)
        os.kill(procs[0].pid, signal.SIGKILL)
        assert join_all(procs) == [-signal.SIGKILL]
        kills += 1
        if temp_files(out):
            mid_save_kills += 1
        # Whatever the moment, the latest checkpoint (if the first one was written already) is complete.
        path, found = find_resume_checkpoint(out)
        if last.is_file():
            state = validate_checkpoint(last)
            assert path == last and found["step"] == state["step"] >= start
        else:
            assert path is None and kills == 1
    assert mid_save_kills >= 1, "no kill landed during a save"
    run_forked(crash_args(toy, out, "--num_workers", 0, "--resume", "auto"))
    assert_identical_runs(out, reference)


def test_sigterm_and_ctrl_c_stop_at_a_step_boundary_and_resume_exactly(toy, reference, tmp_path):
    """SIGTERM to the main process; SIGINT to its process group (Ctrl-C); SIGTERM to its process group
    (torchrun's shutdown of a rank). The data workers, in process groups of their own, are not killed
    under the main process; each time the run finishes its step, saves, exits with status 0, and the
    resumed run continues bit for bit (with 2 workers vs the reference's 0: samples do not depend on
    the workers)."""
    out = tmp_path / "stopped"
    args = crash_args(toy, out, "--num_workers", 2, "--resume", "auto")
    stops = []
    for sig, group in ((signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)):
        procs = start_forked(args, env={"NEW_PROCESS_GROUP": "1"})
        begin = logged_steps(out)
        wait_for(lambda: logged_steps(out) >= begin + 2, procs)
        if group:
            os.killpg(procs[0].pid, sig)
        else:
            os.kill(procs[0].pid, sig)
        assert join_all(procs) == [0], sig
        stopped = load_checkpoint(out / "checkpoint-last.pt")["step"]
        assert read_log(out)[-1]["step"] == stopped  # the step in progress was finished, then saved
        assert begin + 2 <= stopped < 18
        stops.append(stopped)
    assert stops == sorted(set(stops))
    run_forked(args)
    assert_identical_runs(out, reference)


def _signal_twice(sig, marker):
    stop = GracefulStop().install()
    os.kill(os.getpid(), sig)
    Path(marker).write_text(str(int(stop.requested)))  # the first one only sets the flag
    os.kill(os.getpid(), sig)
    time.sleep(30)
    os._exit(0)  # not reached: the second signal ends the process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_exits_at_once(sig, tmp_path):
    marker = tmp_path / "first"
    p = mp.get_context("fork").Process(target=_signal_twice, args=(sig, marker))
    p.start()
    p.join(20)
    assert p.exitcode == -sig
    assert marker.read_text() == str(int(sig))


def _save_forever(path):
    i = 0
    while True:
        i += 1
        atomic_save({"i": i, "data": torch.full((1 << 20,), float(i))}, path)


def test_sigkill_during_atomic_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "checkpoint-last.pt"
    rng = random.Random(0)
    versions = set()
    for _ in range(5):
        p = mp.get_context("fork").Process(target=_save_forever, args=(path,))
        p.start()
        while not path.is_file():
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        state = torch.load(path, weights_only=False)
        assert torch.equal(state["data"], torch.full((1 << 20,), float(state["i"])))
        versions.add(state["i"])
    assert len(versions) > 1 or max(versions) > 1


def test_keep_last_best_and_fallback_past_corrupt_checkpoints(toy, tmp_path, caplog):
    images, tok = toy
    out = tmp_path / "keep"

    def args(epochs, *extra):
        return ["--data_path", str(images), "--tokenizer", "dvae", "--discrete_vae_weight_path", str(tok),
                "--model", "tiny", "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6",
                "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers", "0", "--amp", "none",
                "--log_freq", "1", "--no_progress", "--output_dir", str(out), "--epochs", str(epochs),
                "--warmup_epochs", "0", "--lr", "0.02", "--min_lr", "0.02", "--clip_grad", "0",
                "--save_ckpt_freq", "1", "--keep_last", "2", *extra]

    caplog.set_level(logging.INFO, logger="beit_fast")
    summary = pretrain.main(args(4))
    names = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert names == ["checkpoint-3.pt", "checkpoint-4.pt", "checkpoint-best.pt", "checkpoint-last.pt"]
    losses = summary["epoch_losses"]
    best_epoch = int(np.argmin(losses)) + 1
    assert summary["best_epoch"] == best_epoch and math.isclose(summary["best_loss"], min(losses))
    best = load_checkpoint(out / "checkpoint-best.pt")
    assert best["step"] == 6 * best_epoch and best["best_loss"] == summary["best_loss"]
    if best_epoch < 4:  # the best weights are kept though their numbered file may be pruned
        last = load_checkpoint(out / "checkpoint-last.pt")
        assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"])

    # A corrupt latest checkpoint: --resume auto warns and falls back to checkpoint-4.pt.
    data = (out / "checkpoint-last.pt").read_bytes()
    (out / "checkpoint-last.pt").write_bytes(data[: len(data) // 2])
    caplog.clear()
    summary = pretrain.main(args(5, "--resume", "auto"))
    assert "checkpoint-last.pt cannot be loaded" in caplog.text and "falling back" in caplog.text
    assert f"resumed from {out / 'checkpoint-4.pt'} at step 24" in caplog.text
    assert summary["steps"] == 30 and [r["step"] for r in read_log(out)] == list(range(1, 31))
    assert load_checkpoint(out / "checkpoint-best.pt")["best_loss"] == min(losses + summary["epoch_losses"])

    # An explicit --resume of a broken file is refused; so is auto when no candidate loads.
    (out / "broken.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*broken.pt is empty"):
        pretrain.main(args(5, "--resume", str(out / "broken.pt")))
    for p in out.glob("checkpoint-*.pt"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="none of the 3 checkpoints"):
        pretrain.main(args(5, "--resume", "auto"))
