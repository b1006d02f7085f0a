"""End-to-end pretraining runs at toy size: learning, exact resume, non-finite losses, bad input.

Also the helpers the other end-to-end test files import (``from test_pretrain import ...``): the toy data
set, and :func:`run_forked` / :func:`start_forked`, which run ``pretrain.main`` in processes forked from
this one (one thread each, as torchrun sets it; no interpreter start-up, so a multi-process run costs about
what its steps cost). A forked rank joins a gloo process group through the same environment variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).
"""
import json
import multiprocessing as mp
import os
import socket
import sys
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast import pretrain
from beit_fast.utils.checkpoint import load_checkpoint
from beit_fast.tokenizer.dvae import DiscreteVAE, DVAEConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def make_toy_images(folder, n=24, size=48, seed=0):
    """``n`` small structured RGB PNGs (stripes of varying frequency over a random colour)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        stripes = 127 * (np.sin(xx / (2 + i % 5) + i) > 0)[..., None]
        arr = np.clip(base + stripes + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:03d}.png"))
    return folder


def make_toy_tokenizer(path, input_size=32, vocab_size=64):
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=vocab_size, input_size=input_size)).save(path)
    return path


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    """A folder of 24 small structured images and a random-init 64-code dVAE on a 32-pixel view."""
    root = tmp_path_factory.mktemp("toy")
    images = make_toy_images(root / "images")
    tok_path = make_toy_tokenizer(root / "tok.pt")
    return images, tok_path


def _child(argv, env):
    if env.pop("NEW_PROCESS_GROUP", None):  # so that a test can signal it and its workers, like Ctrl-C
        os.setpgrp()
    os.environ.update(env)
    torch.set_num_threads(1)
    code = 0
    try:
        pretrain.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
            code = 3
        else:
            code = e.code or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_forked(argv, world_size=1, env=None):
    """Start ``pretrain.main(argv)`` in ``world_size`` forked processes (ranks of one gloo group when > 1)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = dict(env or {})
        if world_size > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        p = ctx.Process(target=_child, args=([str(a) for a in argv], rank_env))  # not daemonic: may start data workers
        p.start()
        procs.append(p)
    return procs


def join_all(procs, timeout=180):
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} process(es) did not finish within {timeout} s"
    return [p.exitcode for p in procs]


def run_forked(argv, world_size=1, env=None, timeout=180):
    """Run and wait; asserts every process exited with 0."""
    codes = join_all(start_forked(argv, world_size, env), timeout)
    assert codes == [0] * world_size, f"exit codes {codes} (see the captured stderr)"


def toy_args(toy_setup, out, *extra):
    images, tok_path = toy_setup
    return [
        "--data_path", str(images), "--tokenizer", "dvae", "--discrete_vae_weight_path", str(tok_path),
        "--model", "tiny", "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6",
        "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers", "0", "--amp", "none",
        "--log_freq", "1", "--no_progress", "--output_dir", str(out), *extra,
    ]


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_tiny_run_learns_and_checkpoints(toy_setup, tmp_path):
    out = tmp_path / "run"
    summary = pretrain.main(toy_args(toy_setup, out, "--epochs", "6", "--warmup_epochs", "1", "--lr", "2e-3"))
    log = read_log(out)
    assert len(log) == 36 and log[-1]["step"] == 36
    losses = np.array([r["loss"] for r in log])
    assert np.isfinite(losses).all()
    assert losses[-6:].mean() < losses[:3].mean() - 0.3, losses
    assert {"loss", "mlm_acc", "lr", "grad_norm", "weight_decay", "images_per_s"} <= set(log[0])
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert ckpt["step"] == 36 and ckpt["epoch"] == 6
    assert set(ckpt) >= {"model", "optimizer", "scaler", "rng", "model_config", "args"}
    assert (out / "checkpoint-6.pt").is_file()
    assert not list(out.glob(".*.tmp"))
    assert summary["steps"] == 36


def test_resume_reproduces_uninterrupted_run(toy_setup, tmp_path):
    common = ("--epochs", "3", "--warmup_epochs", "1", "--drop_path", "0.2")
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain.main(toy_args(toy_setup, full, *common))
    # Interrupted mid-epoch (epoch 2 has steps 7..12), then resumed from its last checkpoint.
    pretrain.main(toy_args(toy_setup, part, *common, "--stop_after_steps", "8"))
    assert load_checkpoint(part / "checkpoint-last.pt")["step"] == 8
    pretrain.main(toy_args(toy_setup, part, *common, "--resume", "auto"))
    full_log, part_log = read_log(full), read_log(part)
    assert [r["step"] for r in part_log] == list(range(1, 19))
    for a, b in zip(full_log, part_log):
        assert a["step"] == b["step"]
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
        assert a["lr"] == b["lr"]
        assert a["unigram_entropy"] == b["unigram_entropy"]  # the target counts are checkpointed too
    final_full = load_checkpoint(full / "checkpoint-last.pt")["model"]
    final_part = load_checkpoint(part / "checkpoint-last.pt")["model"]
    for k in final_full:
        assert torch.equal(final_full[k], final_part[k]), k


def test_non_finite_loss_skips_then_stops_with_checkpoint(toy_setup, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="consecutive non-finite losses"):
        pretrain.main(toy_args(toy_setup, out, "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e30",
                               "--clip_grad", "0", "--min_lr", "1e30"))
    assert (out / "checkpoint-last.pt").is_file()
    log = read_log(out)
    assert all(np.isfinite(r["loss"]) for r in log)  # skipped steps are never logged as losses


@pytest.mark.parametrize("extra,message", [
    (("--num_mask_patches", "17"), "num_mask_patches must be in"),
    (("--input_size", "30"), "not divisible"),
    (("--batch_size", "0"), "batch_size must be positive"),
    (("--vocab_size", "100"), "does not match the tokenizer"),
    (("--second_input_size", "64"), "token grid"),
])
def test_bad_flags_give_clear_errors(toy_setup, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        pretrain.main(toy_args(toy_setup, tmp_path / "bad", "--epochs", "1", *extra))


def test_missing_and_empty_data_folder(toy_setup, tmp_path):
    _, tok = toy_setup
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((tmp_path / "nope", "nope"), (empty, "empty")):
        args = toy_args(toy_setup, tmp_path / "o", "--epochs", "1")
        args[args.index("--data_path") + 1] = str(folder)
        with pytest.raises(SystemExit, match=message):
            pretrain.main(args)


def test_resume_refuses_other_config(toy_setup, tmp_path):
    out = tmp_path / "cfg"
    pretrain.main(toy_args(toy_setup, out, "--epochs", "1"))
    with pytest.raises(SystemExit, match="another model config"):
        pretrain.main(toy_args(toy_setup, out, "--epochs", "2", "--layer_scale_init_value", "0.5", "--resume", "auto"))


def test_help_lists_every_flag_with_text(capsys):
    parser = pretrain.get_args_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "--num_mask_patches" in capsys.readouterr().out
