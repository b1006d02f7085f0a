"""A run folder's fixed names are never followed, every failed write is one clear error, and a checkpoint
knows its tokenizer (issue 22: the hostile-environment review's run-folder and write-error attacks).

Planted symbolic links (``run.lock``, ``.log.jsonl.tmp``), FIFOs and directories under the fixed names, a
checkpoint that asks to be "re-published" as other files, an old log in a fresh run's folder, a full disk
at a log write, an unwritable ``--log_dir``, a tokenizer ``--output`` that is a folder or another kind of
file, a retrained tokenizer under the same path, a fine-tuning run stopped before its first evaluation, and
HF shard indexes that name ``.``, a folder or a FIFO.
"""
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit_fast import pretrain
from beit_fast.utils.checkpoint import atomic_save, load_checkpoint, validate_checkpoint
from test_pretrain import make_toy_images, make_toy_tokenizer, read_log
from test_security import clean_exit, pretrain_args

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfiles")
    make_toy_images(root / "images", n=8, size=40)
    make_toy_tokenizer(root / "tok.pt")
    return root


def run(toy, out, *extra, tok=None):
    return pretrain.main([str(a) for a in pretrain_args(toy, out, "--log_freq", 1, *extra, tok=tok)])


# ---------------------------------------------------------------------------------------------------------
# Fixed names: never followed, never a FIFO or a folder
# ---------------------------------------------------------------------------------------------------------
def test_planted_lock_symlink_is_refused_and_its_target_untouched(toy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    message = clean_exit(pretrain.main, pretrain_args(toy, out))
    assert "run.lock" in message and "symbolic link" in message
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["run.lock", "log.jsonl"])
def test_fixed_name_that_is_a_fifo_is_a_clear_error_not_a_hang(toy, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run([sys.executable, "-m", "beit_fast.pretrain", *map(str, pretrain_args(toy, out))],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung on a FIFO named {name}")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"error: the {'lock file' if name == 'run.lock' else 'log'} {out / name} is a FIFO" in res.stderr


@pytest.mark.parametrize("name", ["run.lock", "log.jsonl"])
def test_fixed_name_that_is_a_directory_is_a_clear_error(toy, tmp_path, name):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    message = clean_exit(pretrain.main, pretrain_args(toy, out))
    assert f"{out / name} is a directory" in message


def test_checkpoint_cannot_republish_itself_as_other_files_and_log_tmp_link_is_not_followed(toy, tmp_path, caplog):
    out = tmp_path / "out"
    run(toy, out, "--epochs", 2, "--stop_after_steps", 1)
    state = load_checkpoint(out / "checkpoint-last.pt")
    state["published_as"] = ["notes.txt", "args.json", "../escape.pt", "checkpoint-1.pt"]
    atomic_save(state, out / "checkpoint-last.pt")
    (out / "notes.txt").write_text("my notes")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".log.jsonl.tmp").symlink_to(victim)
    caplog.set_level(logging.WARNING, logger="beit_fast")
    run(toy, out, "--epochs", 2, "--resume", "auto")
    assert (out / "notes.txt").read_text() == "my notes" and victim.read_text() == "precious"
    assert not (tmp_path / "escape.pt").exists() and (out / "checkpoint-1.pt").is_file()
    assert not (out / "log.jsonl").is_symlink() and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert any("notes.txt" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_fresh_run_never_appends_to_an_old_log(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 9)))
    run(toy, out)
    assert [r["step"] for r in read_log(out)] == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# One error path for failed writes: clear message naming the path and the cause, last checkpoint kept
# ---------------------------------------------------------------------------------------------------------
class _FullDiskForLogs:
    """``os`` of beit_fast.train.loop whose writes fail as on a full disk."""

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_a_log_write_stops_cleanly_keeping_the_checkpoint(toy, tmp_path, monkeypatch):
    import beit_fast.train.loop as loop_module

    out = tmp_path / "out"
    run(toy, out, "--epochs", 2, "--stop_after_steps", 1)
    before = (out / "checkpoint-last.pt").read_bytes()
    monkeypatch.setattr(loop_module, "os", _FullDiskForLogs())
    message = clean_exit(pretrain.main, pretrain_args(toy, out, "--epochs", 2, "--resume", "auto", "--log_freq", 1))
    monkeypatch.undo()
    assert f"could not write the log {out / 'log.jsonl'}: No space left on device" in message, message
    assert "checkpoint-last.pt is kept" in message
    assert (out / "checkpoint-last.pt").read_bytes() == before and validate_checkpoint(out / "checkpoint-last.pt")


def test_log_dir_that_cannot_be_written_is_a_clear_error(toy, tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "a_file").write_text("x")
    message = clean_exit(pretrain.main, pretrain_args(toy, tmp_path / "out", "--log_dir", tmp_path / "a_file" / "tb"))
    assert "--log_dir" in message and "a_file" in message


def test_tokenizer_output_is_checked_before_training(toy, tmp_path):
    from beit_fast import train_tokenizer

    common = ["--steps", "2", "--batch_size", "2", "--eval_images", "2", "--no_progress"]
    (tmp_path / "folder").mkdir()
    message = clean_exit(train_tokenizer.main, ["--output", str(tmp_path / "folder"), *common])
    assert "is a directory" in message
    other = tmp_path / "pretrain.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 3, "model_config": {}}, other)
    before = other.read_bytes()
    message = clean_exit(train_tokenizer.main, ["--output", str(other), *common])
    assert "is not a dVAE tokenizer checkpoint" in message and "refusing to overwrite" in message
    assert other.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's identity is in the checkpoint
# ---------------------------------------------------------------------------------------------------------
def test_resuming_with_a_retrained_tokenizer_at_the_same_path_is_refused(toy, tmp_path, caplog):
    from beit_fast.tokenizer import DiscreteVAE, DVAEConfig

    tok = tmp_path / "tok.pt"
    make_toy_tokenizer(tok)
    out = tmp_path / "out"
    run(toy, out, "--epochs", 2, "--stop_after_steps", 1, tok=tok)
    assert len(load_checkpoint(out / "checkpoint-last.pt")["tokenizer"]["sha256"]) == 64
    torch.manual_seed(1)  # retrained: same path, same architecture, other weights
    DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=64, input_size=32)).save(tok)
    message = clean_exit(pretrain.main, pretrain_args(toy, out, "--epochs", 2, "--resume", "auto", tok=tok))
    assert str(tok) in message and "--allow_tokenizer_change" in message and "other weights" in message
    caplog.set_level(logging.WARNING, logger="beit_fast")
    summary = run(toy, out, "--epochs", 2, "--resume", "auto", "--allow_tokenizer_change", tok=tok)
    assert summary["steps"] == 4
    assert any("--allow_tokenizer_change" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning stopped before its first evaluation; convert's shard indexes
# ---------------------------------------------------------------------------------------------------------
def test_finetune_stopped_before_its_first_evaluation_exits_cleanly(tmp_path, capsys):
    from beit_fast import finetune

    res = finetune.main(["--input_size", "16", "--labels_per_class", "2", "--no_progress", "--epochs", "2",
                         "--batch_size", "10", "--stop_after_steps", "1", "--output_dir", str(tmp_path / "ft")])
    assert res["best_top1"] is None and (tmp_path / "ft" / "checkpoint-last.pt").is_file()
    assert "best top-1 n/a" in capsys.readouterr().out


def _hf_folder(root, weight_map):
    root.mkdir()
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.mark.parametrize("shard", [".", "./", "sub", "fifo.safetensors", "model.safetensors.index.json"])
def test_convert_refuses_shards_that_are_not_weight_files(tmp_path, capsys, shard):
    from beit_fast.convert import main as convert_main

    folder = _hf_folder(tmp_path / "hf", {"w": shard})
    (folder / "sub").mkdir()
    (folder / "sub" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "."}}))
    os.mkfifo(folder / "fifo.safetensors")
    assert convert_main([str(folder), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and "refus" in err, err


def test_convert_writes_safetensors_atomically_with_the_umask(tmp_path):
    from beit_fast.convert import main as convert_main
    from test_security import tiny_model

    torch.save({"model": tiny_model().state_dict()}, tmp_path / "src.pt")
    old = os.umask(0o022)
    try:
        assert convert_main([str(tmp_path / "src.pt"), str(tmp_path / "hf"), "--to", "hf", "--num-heads", "4",
                             "--quiet"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "hf").glob(".*.tmp"))


def test_convert_reads_a_symlinked_shard_as_the_hf_cache_lays_them_out(tmp_path):
    """Decided: a shard may be a link (HF cache snapshots link to ../../blobs); only the index's names are
    confined to the folder."""
    from safetensors.torch import save_file

    from beit_fast.interop.files import load_state_dict

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"x": torch.ones(2)}, str(blobs / "abc"))
    folder = _hf_folder(tmp_path / "snap", {"x": "model-00001.safetensors"})
    (folder / "model-00001.safetensors").symlink_to(blobs / "abc")
    assert torch.equal(load_state_dict(folder)["x"], torch.ones(2))


def test_full_disk_at_the_lock_write_is_a_clear_error(toy, tmp_path, monkeypatch):
    import beit_fast.train.checkpoint_folder as folder_module

    monkeypatch.setattr(folder_module, "os", _FullDiskForLogs())
    message = clean_exit(pretrain.main, pretrain_args(toy, tmp_path / "out"))
    monkeypatch.undo()
    assert f"could not write the lock file {tmp_path / 'out' / 'run.lock'}: No space left on device" in message
    assert not (tmp_path / "out" / "run.lock").exists()


def test_convert_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import beit_fast.utils.checkpoint as ck
    from beit_fast.convert import main as convert_main
    from test_crash_safety import _FullDisk
    from test_security import tiny_model

    torch.save({"model": tiny_model().state_dict()}, tmp_path / "src.pt")
    monkeypatch.setattr(ck, "os", _FullDisk(1000))
    assert convert_main([str(tmp_path / "src.pt"), str(tmp_path / "out.safetensors")]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "error: could not write" in err and "No space left on device" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_tokenizer_identity_is_the_weights_not_the_file():
    from torch import nn

    from beit_fast.tokenizer.identity import weights_sha256

    a = nn.BatchNorm1d(3).to(torch.bfloat16)  # bf16 weights and a 0-d int64 buffer
    b = nn.BatchNorm1d(3).to(torch.bfloat16)
    assert weights_sha256(a) == weights_sha256(b) and len(weights_sha256(a)) == 64
    with torch.no_grad():
        b.weight[0] = 2
    assert weights_sha256(a) != weights_sha256(b)
