"""Crash safety: SIGTERM / SIGINT stop cleanly with a checkpoint; SIGKILL (also in the middle of a save)
never leaves an unloadable latest checkpoint; ``--resume auto`` takes the newest loadable checkpoint and
the resumed run is bit-identical to an uninterrupted one; retention (--keep_last) and checkpoint-best.pt.

The victims are ``pretrain.main`` runs in processes forked from this one (``test_pretrain.start_forked``).
"""
import errno
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
from beit_fast.utils.checkpoint import CheckpointError, atomic_save, load_checkpoint, validate_checkpoint
from beit_fast.train.checkpoint_folder import find_resume_checkpoint
from beit_fast.train.distributed import GracefulStop
from test_pretrain import join_all, make_toy_images, make_toy_tokenizer, read_log, run_forked, start_forked

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    return make_toy_images(root / "images"), make_toy_tokenizer(root / "tok.pt")


def crash_args(toy, out, *extra):
    """18 steps (3 epochs of 6), a checkpoint after every step (so that kills often land in a save); every
    numbered checkpoint is kept (--keep_last 0, not the default 2), so the tests see that none is lost."""
    images, tok = toy
    return ["--data_path", images, "--tokenizer", "dvae", "--discrete_vae_weight_path", tok, "--model", "tiny",
            "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6", "--min_mask_patches_per_block", "2",
            "--batch_size", "4", "--amp", "none", "--epochs", "3", "--warmup_epochs", "1", "--drop_path", "0.2",
            "--save_ckpt_steps", "1", "--save_ckpt_freq", "1", "--keep_last", "0", "--log_freq", "1", "--no_progress",
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
    with pytest.raises(SystemExit, match=r"^error: --resume .*broken.pt is empty"):
        pretrain.main(args(5, "--resume", str(out / "broken.pt")))
    for p in out.glob("checkpoint-*.pt"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="none of the 3 checkpoints"):
        pretrain.main(args(5, "--resume", "auto"))


# ---------------------------------------------------------------------------------------------------------
# Nothing lost: numbered / best copies, one run per folder, full disks, flipped bytes, file modes
# ---------------------------------------------------------------------------------------------------------
def main_here(argv):
    """``pretrain.main`` in this process (flags as strings, as from a command line)."""
    return pretrain.main([str(a) for a in argv])


def _die_while_copying_to(name, argv):
    """Run ``pretrain.main(argv)`` in this (forked) process and SIGKILL it halfway through the first copy of
    a checkpoint to a file called ``name`` (the data is half written to its temporary file), or, for a file
    published as a hard link (checkpoint-best.pt), between the link under its temporary name and the rename."""
    import shutil

    real = shutil.copyfileobj
    real_link = os.link

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        if os.path.basename(dst).startswith(f".{name}."):
            os.kill(os.getpid(), signal.SIGKILL)

    os.link = link

    def copyfileobj(src, dst, length=0):
        target = os.readlink(f"/proc/self/fd/{dst.fileno()}")
        if os.path.basename(target).startswith(f".{name}."):
            dst.write(src.read(1 << 12))
            dst.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, length) if length else real(src, dst)

    shutil.copyfileobj = copyfileobj
    torch.set_num_threads(1)
    main_here([str(a) for a in argv])
    os._exit(0)


def _killed_in_copy(name, argv):
    p = mp.get_context("fork").Process(target=_die_while_copying_to, args=(name, argv))
    p.start()
    p.join(180)
    assert p.exitcode == -signal.SIGKILL, f"the run was not killed in the copy to {name} (exit {p.exitcode})"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_kill_during_numbered_and_best_copies_then_resume_loses_nothing(toy, reference, tmp_path):
    out = tmp_path / "copies"
    # Killed while publishing epoch 2's numbered checkpoint: checkpoint-last.pt already holds step 12.
    _killed_in_copy("checkpoint-2.pt", crash_args(toy, out, "--num_workers", 0))
    assert load_checkpoint(out / "checkpoint-last.pt")["step"] == 12 and not (out / "checkpoint-2.pt").exists()
    # Killed while publishing the first best checkpoint (epoch 1 is always the best so far) of a resumed run.
    out_best = tmp_path / "best"
    _killed_in_copy("checkpoint-best.pt", crash_args(toy, out_best, "--num_workers", 0))
    assert load_checkpoint(out_best / "checkpoint-last.pt")["best_epoch"] == 1
    assert not (out_best / "checkpoint-best.pt").exists()
    # Resumed (and stopped again mid-epoch 2): the missing copies are published first.
    run_forked(crash_args(toy, out_best, "--num_workers", 0, "--resume", "auto", "--stop_after_steps", 8))
    best = load_checkpoint(out_best / "checkpoint-best.pt")
    assert best["step"] == 6 and best["best_epoch"] == 1
    assert (out_best / "checkpoint-1.pt").read_bytes() == (out_best / "checkpoint-best.pt").read_bytes()
    for folder in (out, out_best):
        run_forked(crash_args(toy, folder, "--num_workers", 0, "--resume", "auto"))
        assert sorted(p.name for p in folder.glob("checkpoint-*.pt")) == [
            "checkpoint-1.pt", "checkpoint-2.pt", "checkpoint-3.pt", "checkpoint-best.pt", "checkpoint-last.pt"]
        for epoch in (1, 2, 3):
            assert load_checkpoint(folder / f"checkpoint-{epoch}.pt")["step"] == 6 * epoch
        last = load_checkpoint(folder / "checkpoint-last.pt")
        assert load_checkpoint(folder / "checkpoint-best.pt")["step"] == 6 * last["best_epoch"]
        assert_identical_runs(folder, reference)


def test_two_runs_on_one_folder_second_refuses_naming_the_first(toy, tmp_path):
    out = tmp_path / "shared"
    args = crash_args(toy, out, "--num_workers", 0, "--epochs", 4)
    procs = start_forked(args)
    wait_for(lambda: logged_steps(out) >= 2, procs)
    for extra in ((), ("--resume", "auto"), ("--overwrite_output_dir",)):
        with pytest.raises(SystemExit) as exc:
            main_here(args + list(extra))
        message = str(exc.value.code)
        assert message.startswith("error: ") and f"pid {procs[0].pid}" in message and "in use" in message, message
    assert join_all(procs) == [0]  # the first run was not disturbed
    assert load_checkpoint(out / "checkpoint-last.pt")["step"] == 24
    assert sorted(p.name for p in out.glob("checkpoint-*.pt"))[:4] == [
        "checkpoint-1.pt", "checkpoint-2.pt", "checkpoint-3.pt", "checkpoint-4.pt"]


def test_stale_lock_of_a_dead_run_is_detected_and_taken_over(toy, tmp_path, caplog):
    out = tmp_path / "stale"
    # A run killed with SIGKILL leaves its lock file behind.
    procs = start_forked(crash_args(toy, out, "--num_workers", 0))
    wait_for(lambda: logged_steps(out) >= 1, procs)
    os.kill(procs[0].pid, signal.SIGKILL)
    join_all(procs)
    assert any(out.glob("*.lock"))
    caplog.set_level(logging.INFO, logger="beit_fast")
    main_here(crash_args(toy, out, "--num_workers", 0, "--resume", "auto", "--stop_after_steps", 4))
    assert "stale lock" in caplog.text and f"pid {procs[0].pid}" in caplog.text


def test_fresh_run_into_a_finished_runs_folder_refuses_and_resume_says_complete(toy, tmp_path, caplog):
    out = tmp_path / "finished"
    args = crash_args(toy, out, "--num_workers", 0, "--epochs", 2, "--save_ckpt_steps", 0)
    main_here(args)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert len(read_log(out)) == 12
    with pytest.raises(SystemExit) as exc:
        main_here(args)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "--resume auto" in message and "--overwrite_output_dir" in message
    assert "complete" in message  # says what the folder holds
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing deleted
    caplog.set_level(logging.INFO, logger="beit_fast")
    summary = main_here(args + ["--resume", "auto"])
    assert "is complete" in caplog.text and summary["steps"] == 12
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "args.json"} == {
        k: v for k, v in before.items() if k != "args.json"}
    # The explicit overwrite starts over: no checkpoint or log line of the old run is left mixed in.
    main_here(crash_args(toy, out, "--num_workers", 0, "--epochs", 1, "--save_ckpt_steps", 0,
                             "--overwrite_output_dir"))
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == [
        "checkpoint-1.pt", "checkpoint-best.pt", "checkpoint-last.pt"]
    assert [r["step"] for r in read_log(out)] == list(range(1, 7))


class _FullDisk:
    """``os`` of beit_fast.utils.checkpoint with a disk that fills up: the files it opens for writing accept
    ``budget`` bytes in all, then every write fails with ENOSPC (as a real full disk does)."""

    def __init__(self, budget):
        self.budget = budget

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r", *args, **kwargs):
        f = os.fdopen(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk = self

        class Writer:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                n = len(memoryview(data).cast("B"))
                if n > disk.budget:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.budget -= n
                return f.write(data)

        return Writer()


@pytest.mark.parametrize("where", ["last", "copy"])
def test_full_disk_at_save_stops_cleanly_and_keeps_the_previous_checkpoint(toy, reference, tmp_path, monkeypatch,
                                                                           where):
    import beit_fast.utils.checkpoint as ck

    out = tmp_path / f"full_{where}"
    args = crash_args(toy, out, "--num_workers", 0)
    main_here(args + ["--stop_after_steps", 5])
    size = (out / "checkpoint-last.pt").stat().st_size
    before = (out / "checkpoint-last.pt").read_bytes()
    # "last": the disk fills up in the middle of writing checkpoint-last.pt at step 6; "copy": after it, in
    # the middle of the numbered copy of epoch 1 (checkpoint-last.pt at step 6 is complete).
    monkeypatch.setattr(ck, "os", _FullDisk(size // 2 if where == "last" else size + size // 2))
    with pytest.raises(SystemExit) as exc:
        main_here(args + ["--resume", "auto"])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "No space left on device" in message, message
    assert "checkpoint-" in message and "--resume auto" in message
    monkeypatch.undo()
    assert not temp_files(out)
    state = validate_checkpoint(out / "checkpoint-last.pt")
    if where == "last":
        assert state["step"] == 5 and (out / "checkpoint-last.pt").read_bytes() == before
    else:
        assert state["step"] == 6 and not (out / "checkpoint-1.pt").exists()
    # Space freed: the resumed run finishes exactly like an uninterrupted one, nothing missing.
    run_forked(args + ["--resume", "auto"])
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == [
        "checkpoint-1.pt", "checkpoint-2.pt", "checkpoint-3.pt", "checkpoint-best.pt", "checkpoint-last.pt"]
    assert_identical_runs(out, reference)


def test_permission_error_at_save_stops_cleanly(toy, tmp_path, monkeypatch):
    import tempfile

    out = tmp_path / "perm"
    args = crash_args(toy, out, "--num_workers", 0, "--epochs", 1)
    real = tempfile.mkstemp
    calls = []

    def mkstemp(*a, **k):
        if not str(k.get("prefix", "")).startswith(".checkpoint-"):  # args.json, the log's trim: not counted
            return real(*a, **k)
        calls.append(1)
        if len(calls) > 2:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(SystemExit) as exc:
        main_here(args)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "Permission denied" in message and "checkpoint-last.pt" in message
    monkeypatch.undo()
    assert validate_checkpoint(out / "checkpoint-last.pt")["step"] == 2


def _flip_bytes(path, n=64, seed=0):
    data = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(seed)
    for pos in rng.integers(len(data) // 4, 3 * len(data) // 4, size=n):
        data[pos] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_flipped_bytes_are_detected_and_resume_auto_falls_back(toy, tmp_path, caplog):
    out = tmp_path / "flip"
    args = crash_args(toy, out, "--num_workers", 0, "--save_ckpt_steps", 0)
    main_here(args + ["--stop_after_steps", 12])
    _flip_bytes(out / "checkpoint-last.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-last\.pt.*(corrupt|checksum|CRC)"):
        validate_checkpoint(out / "checkpoint-last.pt")
    with pytest.raises(SystemExit, match=r"^error: .*checkpoint-last\.pt"):
        main_here(args + ["--resume", str(out / "checkpoint-last.pt")])
    caplog.set_level(logging.INFO, logger="beit_fast")
    summary = main_here(args + ["--resume", "auto"])
    assert "checkpoint-last.pt" in caplog.text and "falling back" in caplog.text
    assert f"resumed from {out / 'checkpoint-2.pt'} at step 12" in caplog.text
    assert summary["steps"] == 18 and [r["step"] for r in read_log(out)] == list(range(1, 19))


def test_files_are_written_with_the_users_umask(toy, tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_save({"x": torch.zeros(2)}, tmp_path / "a.pt")
        assert path.stat().st_mode & 0o777 == 0o644
        out = tmp_path / "modes"
        main_here(crash_args(toy, out, "--num_workers", 0, "--epochs", 1, "--save_ckpt_steps", 0))
        for p in out.glob("checkpoint-*.pt"):
            assert p.stat().st_mode & 0o777 == 0o644, p
        os.umask(0o077)
        assert atomic_save({"x": torch.zeros(2)}, tmp_path / "b.pt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_previous_format_checkpoint_resumes_exactly_without_opt_in(toy, reference, tmp_path):
    """A checkpoint written by the previous code (numpy's RNG state pickled as a numpy array) resumes
    without --trust-pickle, bit for bit."""
    out = tmp_path / "legacy"
    args = crash_args(toy, out, "--num_workers", 0)
    run_forked(args + ["--stop_after_steps", 8])
    state = load_checkpoint(out / "checkpoint-last.pt")

    def legacy(rng):
        rs = np.random.RandomState()
        numpy_state = rng["numpy"]
        if isinstance(numpy_state, dict):  # the new plain layout -> numpy's own tuple
            rs.set_state({**numpy_state, "state": {**numpy_state["state"],
                                                   "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}})
        else:
            rs.set_state(numpy_state)
        return {**rng, "numpy": rs.get_state()}

    state["rng"] = legacy(state["rng"])
    state["rng_per_rank"] = [legacy(r) for r in state["rng_per_rank"]]
    for key in [k for k in state if k.startswith("_")]:
        state.pop(key)
    for p in out.glob("checkpoint-*.pt"):
        p.unlink()
    torch.save(state, out / "checkpoint-last.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(out / "checkpoint-last.pt")
    run_forked(args + ["--resume", "auto"])
    assert_identical_runs(out, reference)
