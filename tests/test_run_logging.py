"""What a pretraining run tells its user: log lines through the package logger and around the progress bar
(never glued to it, no stray source lines, nothing on the root logger), no avoidable warnings, the unigram
baseline beside the MIM loss, TensorBoard scalars with ``--log_dir``, and the last K numbered
checkpoints kept by default."""
import json
import logging
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from beit_fast import pretrain
from test_pretrain import read_log, toy_args, toy_setup  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) beit_fast[.\w]*: ")

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_on_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with its stderr on a pseudo-terminal (progress bars are drawn only on a terminal); returns
    the exit code and what it wrote there, with the terminal's CR LF line ends back to LF."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return returncode, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def test_messages_go_around_the_progress_bar_not_into_it(toy_setup, tmp_path):  # noqa: F811
    """A real terminal run (progress bar on) over a folder with an unreadable image: every message is a
    whole line of the package logger, written by tqdm.write (the bar is cleared first); the skipped image
    is one log line, without the source line ``warnings`` prints."""
    images, _ = toy_setup
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted(Path(images).iterdir())[:8]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "img_003.png").write_bytes(b"not a png")  # hit in the middle of the first epoch
    argv = [a for a in toy_args(toy_setup, tmp_path / "out", "--epochs", "2", "--log_freq", "1") if a != "--no_progress"]
    argv[argv.index("--data_path") + 1] = str(folder)
    returncode, err = _run_on_a_terminal([sys.executable, "-m", "beit_fast.pretrain", *argv])
    assert returncode == 0, err
    assert "epoch 1/2" in err  # the bar was drawn
    assert "SkippedImageWarning" not in err and "self.skipped" not in err and "warnings.warn" not in err
    messages = []
    for line in err.split("\n"):
        visible = line.rsplit("\r", 1)[-1]  # what stays on screen after the bar's carriage returns
        if "beit_fast" in visible and ("INFO" in visible or "WARNING" in visible):
            assert STAMP.match(visible), f"message not on a line of its own: {line!r}"
            messages.append(visible)
    skipped = [m for m in messages if "skipping unreadable image" in m]
    assert len(skipped) == 1 and "WARNING beit_fast.data.image_folder: skipping unreadable image" in skipped[0], messages
    assert any("img_003.png" in m for m in skipped)
    assert any("unigram baseline" in m for m in messages)
    assert not any(" root: " in line for line in err.splitlines())


def test_nothing_goes_to_the_root_logger(tmp_path, caplog, monkeypatch):
    """The embedded demo path (it trains its tokenizer first), at a toy size; on a CPU it takes one thread."""
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pretrain.main(["--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6",
                   "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_samples", "8", "--epochs", "1",
                   "--tokenizer_steps", "2", "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path)])
    names = {r.name for r in caplog.records}
    assert names and all(n.startswith("beit_fast") for n in names), names
    assert any("demo tokenizer" in r.getMessage() for r in caplog.records)
    assert any("demo on CPU: 1 intra-op thread" in r.getMessage() for r in caplog.records)
    assert not logging.getLogger("beit_fast").handlers  # the CLI's handler is removed when it returns


def test_no_autocast_warning_for_fp32_on_cpu():
    from beit_fast.train.loss import MIMLoss
    from beit_fast.train.mim import token_agreement
    from beit_fast.model.beit import build_model
    from beit_fast.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=64, input_size=32)
    images = 0.1 + 0.8 * torch.rand(2, 3, 32, 32)
    model = build_model("tiny", img_size=32, patch_size=8, vocab_size=64, embed_dim=32, depth=1, num_heads=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert token_agreement(tok, images, torch.float32) == 1.0
        loss, _ = MIMLoss(model, amp_dtype=torch.float32)(torch.randn(2, 3, 32, 32), mask,
                                                          torch.randint(0, 64, (2, 16)))
    assert torch.isfinite(loss)


def test_unigram_entropy_of_the_masked_targets():
    from beit_fast.train.mim import PretrainEngine
    from beit_fast.model.beit import build_model
    from beit_fast.train.optim import build_optimizer
    from beit_fast.tokenizer import build_tokenizer

    tok = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=8, input_size=32)
    model = build_model("tiny", img_size=32, patch_size=8, vocab_size=8, embed_dim=32, depth=1, num_heads=2)
    sched = np.full(2, 1e-3)
    engine = PretrainEngine(model, tok, build_optimizer(model, 1e-3, 0.05), torch.device("cpu"), sched, sched)
    assert engine.unigram_entropy() is None
    tokens = torch.tensor([[0, 1, 1, 2], [3, 1, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [False, False, True, True]])
    engine.count_targets(tokens, mask)  # masked targets: 0, 1, 1, 0, 0 -> p = (3/5, 2/5)
    p = np.array([3 / 5, 2 / 5])
    assert engine.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert engine.unigram_baseline()[1] == pytest.approx(3 / 5)
    state = engine.state_dict()
    engine.count_targets(tokens, mask)
    engine.load_state_dict(state)
    assert engine.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_unigram_baseline_is_logged_beside_the_loss(toy_setup, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="beit_fast")
    summary = pretrain.main(toy_args(toy_setup, tmp_path / "run", "--epochs", "2"))
    log = read_log(tmp_path / "run")
    values = [r["unigram_entropy"] for r in log]
    assert all(0 < v <= math.log(64) for v in values)
    assert all(1 / 64 <= r["unigram_acc"] <= 1 for r in log)
    assert summary["unigram_entropy"] == values[-1] and summary["unigram_acc"] == log[-1]["unigram_acc"]
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and "unigram baseline" in done[0]
    assert f"loss {values[-1]:.4f} nats, accuracy {log[-1]['unigram_acc']:.4f}" in done[0]


def test_tensorboard_scalars_beside_the_json_lines(toy_setup, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", tmp_path / "tb"
    pretrain.main(toy_args(toy_setup, out, "--epochs", "2", "--log_dir", str(tb)))
    log = read_log(out)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "loss/mlm_acc", "loss/unigram_entropy", "opt/lr", "opt/grad_norm",
            "perf/images_per_s"} <= tags, tags
    for tag, key in (("loss/loss", "loss"), ("loss/mlm_acc", "mlm_acc"), ("opt/lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in log]
        assert np.allclose([e.value for e in events], [r[key] for r in log], rtol=1e-6)


def test_log_dir_without_tensorboard_is_a_clear_error(toy_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(SystemExit, match="--log_dir .*needs the tensorboard package: pip install tensorboard"):
        pretrain.main(toy_args(toy_setup, tmp_path / "run", "--epochs", "1", "--log_dir", str(tmp_path / "tb")))


def test_the_last_two_numbered_checkpoints_are_kept_by_default(toy_setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    pretrain.main(toy_args(toy_setup, out, "--epochs", "4", "--save_ckpt_freq", "1"))
    names = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert names == ["checkpoint-3.pt", "checkpoint-4.pt", "checkpoint-best.pt", "checkpoint-last.pt"], names
    assert json.loads((out / "args.json").read_text())["keep_last"] == 2
    pretrain.main(toy_args(toy_setup, tmp_path / "all", "--epochs", "3", "--save_ckpt_freq", "1", "--keep_last", "0"))
    assert len(list((tmp_path / "all").glob("checkpoint-[0-9]*.pt"))) == 3


def test_a_log_file_gets_lines_not_bar_updates_or_routine_removals(toy_setup, tmp_path):  # noqa: F811
    """stderr to a file or a pipe (nohup, a scheduler's log): no progress bar redraws (``\\r``), and the
    routine removal of old numbered checkpoints (--keep_last) is not a line per epoch."""
    argv = [a for a in toy_args(toy_setup, tmp_path / "out", "--epochs", "3", "--keep_last", "1", "--save_ckpt_freq",
                                "1", "--log_freq", "1") if a != "--no_progress"]
    r = subprocess.run([sys.executable, "-m", "beit_fast.pretrain", *argv], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr, r.stderr  # tqdm draws "NN%|####|"
    assert "unigram baseline" in r.stderr  # the log lines are there
    assert "removed checkpoint" not in r.stderr
    numbered = [p.name for p in (tmp_path / "out").glob("checkpoint-*.pt") if p.stem.split("-")[1].isdigit()]
    assert numbered == ["checkpoint-3.pt"]  # the others were removed, silently
