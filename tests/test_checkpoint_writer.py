"""Checkpoints off the critical path: a host snapshot written on a thread while the training goes on (a
failure reported at the next save), checkpoint-best.pt as a hard link instead of a second copy."""
import os
import threading

import pytest
import torch

from beit_fast.utils.checkpoint import CheckpointSaveError, load_checkpoint
from beit_fast.train.checkpoint_folder import Checkpointer
from beit_fast.train.checkpoint_writer import BackgroundSaver, link_atomic, snapshot_to_host


def test_snapshot_owns_its_tensors():
    weights = torch.ones(4)
    state = {"model": {"w": weights}, "moments": [torch.zeros(2)], "step": 3, "pair": (torch.ones(1), "x")}
    snap = snapshot_to_host(state)
    weights.add_(1)  # the next optimizer step updates parameters in place
    state["moments"][0].add_(5)
    state["pair"][0].add_(5)
    assert torch.equal(snap["model"]["w"], torch.ones(4)) and torch.equal(snap["moments"][0], torch.zeros(2))
    assert torch.equal(snap["pair"][0], torch.ones(1)) and snap["pair"][1] == "x" and snap["step"] == 3


def test_the_save_runs_while_the_caller_goes_on_and_failures_come_back():
    saver = BackgroundSaver()
    release, done = threading.Event(), []
    saver.submit(lambda: (release.wait(10), done.append(1)))
    assert saver.busy and not done  # the training thread is free while the file is written
    release.set()
    assert saver.wait() is None and done == [1] and not saver.busy

    def fail():
        raise CheckpointSaveError("could not write checkpoint-last.pt: No space left on device")

    saver.submit(fail)
    with pytest.raises(CheckpointSaveError, match="No space left"):
        saver.submit(lambda: None)  # the next save reports the failure of the one before
    assert saver.wait() is None


def test_best_is_a_hard_link_that_later_saves_do_not_touch(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save({"step": 1, "model": {"w": torch.ones(3)}}, numbered=1, best=True)
    last, best, numbered = (os.stat(tmp_path / n) for n in ("checkpoint-last.pt", "checkpoint-best.pt",
                                                              "checkpoint-1.pt"))
    assert best.st_ino == last.st_ino  # no second copy of the same bytes
    assert numbered.st_ino != last.st_ino  # numbered checkpoints stay independent copies
    ckpt.save({"step": 2, "model": {"w": torch.zeros(3)}})
    assert load_checkpoint(tmp_path / "checkpoint-best.pt")["step"] == 1
    assert load_checkpoint(tmp_path / "checkpoint-last.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_link_falls_back_to_a_copy_where_links_are_refused(tmp_path, monkeypatch):
    import errno

    src = tmp_path / "a.pt"
    src.write_bytes(b"state")

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    link_atomic(src, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == b"state"
    assert os.stat(tmp_path / "b.pt").st_ino != os.stat(src).st_ino
