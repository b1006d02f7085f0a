"""Sync-free pretraining (``--nonfinite_check device``, the CUDA default): no host read of a device value
between logging intervals, counted per step through the engine's one host-read helper
(beit_fast.train.host_reads) and, for reads that would bypass it, through the tensor methods that read;
the same skip-then-save-then-stop policy for non-finite steps; no gradient rescaling without a clip."""
import os
import sys

import numpy as np
import pytest
import torch
from test_pretrain import read_log, toy_args, toy_setup  # noqa: F401 (fixture)

from beit_fast import pretrain
from beit_fast.utils.checkpoint import load_checkpoint
from beit_fast.train import host_reads
from beit_fast.train.mim import PretrainEngine

pytestmark = pytest.mark.usefixtures("one_thread")

_READING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")


class ReadCounter:
    """Per optimizer step: host reads through the helper, and reads of tensors from the step's and the loop's
    code that bypass it (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``; the data side
    reads its own host tensors, e.g. the sampler's permutation)."""

    def __init__(self, monkeypatch):
        self.marks: list[tuple[int, int]] = []
        self.stray = 0
        helper = os.path.abspath(host_reads.__file__)
        package = os.path.dirname(os.path.dirname(helper))
        step_code = tuple(os.path.join(package, p) for p in ("train", "ops", "loss.py", "model.py", "modules.py",
                                                             "optim.py", "distributed.py", "checkpoint.py"))
        counter = self

        def wrap(name):
            original = getattr(torch.Tensor, name)

            def reading(self, *args, **kwargs):
                caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
                if caller.startswith(step_code) and caller != helper:
                    counter.stray += 1
                return original(self, *args, **kwargs)
            return reading

        for name in _READING_METHODS:
            monkeypatch.setattr(torch.Tensor, name, wrap(name))
        step = PretrainEngine.train_accumulated

        def counted_step(engine, batches, t):
            self.marks.append((host_reads.count(), self.stray))
            return step(engine, batches, t)

        monkeypatch.setattr(PretrainEngine, "train_accumulated", counted_step)

    def per_step(self) -> list[tuple[int, int]]:
        """``(helper reads, stray reads)`` of each step: those of its step call and of the loop after it."""
        marks = self.marks + [(host_reads.count(), self.stray)]
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def test_device_check_reads_nothing_between_logging_intervals(toy_setup, tmp_path, monkeypatch):
    counter = ReadCounter(monkeypatch)
    out = tmp_path / "device"
    pretrain.main(toy_args(toy_setup, out, "--epochs", "2", "--warmup_epochs", "1", "--nonfinite_check",
                           "device", "--log_freq", "4"))  # 6 steps an epoch: reads after steps 4, 6, 8, 12
    reads = counter.per_step()
    assert len(reads) == 12
    for step, (helper, stray) in enumerate(reads, start=1):
        assert stray == 0, f"step {step}: {stray} host reads bypass beit_fast.train.host_reads"
        if step % 4 and step % 6:
            assert helper == 0, f"step {step}: {helper} host reads outside a logging interval"
        else:
            assert 1 <= helper <= 8, (step, helper)  # the window's means, the bad-step run, the last values
    log = read_log(out)
    assert [r["step"] for r in log] == [4, 8, 12] and all(np.isfinite(r["loss"]) for r in log)


def test_host_check_reads_every_step(toy_setup, tmp_path, monkeypatch):
    """What the device check saves: the host check reads the loss and the gradient norm each step."""
    counter = ReadCounter(monkeypatch)
    pretrain.main(toy_args(toy_setup, tmp_path / "host", "--epochs", "1", "--warmup_epochs", "0",
                           "--nonfinite_check", "host", "--log_freq", "4"))
    reads = counter.per_step()
    assert len(reads) == 6 and all(helper >= 2 and stray == 0 for helper, stray in reads), reads


def test_device_check_gives_the_host_check_losses(toy_setup, tmp_path):
    logs = {}
    for check in ("host", "device"):
        out = tmp_path / check
        pretrain.main(toy_args(toy_setup, out, "--epochs", "1", "--warmup_epochs", "0", "--nonfinite_check", check))
        logs[check] = read_log(out)
    assert [r["step"] for r in logs["device"]] == [r["step"] for r in logs["host"]] == list(range(1, 7))
    for a, b in zip(logs["host"], logs["device"]):  # fused AdamW (device) vs for-each AdamW (host): rounding
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a["step"], a["loss"], b["loss"])


def test_device_check_skips_then_saves_and_stops(toy_setup, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="consecutive non-finite losses"):
        pretrain.main(toy_args(toy_setup, out, "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e30",
                               "--clip_grad", "0", "--min_lr", "1e30", "--nonfinite_check", "device"))
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(np.isfinite(r["loss"]) for r in read_log(out))


def test_no_clip_leaves_gradients_unscaled(monkeypatch):
    """Without --clip_grad the norm is computed (logged, checked) but no pass multiplies the gradients."""
    from test_engine import batch, make

    def refuse(*a, **k):
        raise AssertionError("clip_grad_norm_ called without a clip")

    for check in ("host", "device"):
        engine, _ = make(check, fused=True, clip=None)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", refuse)
        result = engine.train_step(batch(0), 0)
        norm = float(result.grad_norm)
        grads = [p.grad for p in engine._params]
        assert norm == pytest.approx(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))), rel=1e-6)
        monkeypatch.undo()


@pytest.mark.parametrize("flags,message", [
    (("--nonfinite_check", "sometimes"), "invalid choice"),
    (("--fsdp", "--compile_mode", "reduce-overhead"), "--fsdp cannot run with --compile_mode reduce-overhead"),
])
def test_bad_sync_flags(toy_setup, tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(toy_args(toy_setup, tmp_path / "bad", "--epochs", "1", *flags))
    assert message in str(e.value.code) + capsys.readouterr().err
