"""Distributed pretraining on CPU with gloo, 2 processes: DDP through torchrun, FSDP2, gradient accumulation.

One real ``torchrun --standalone --nproc_per_node=2 -m beit_fast.pretrain`` run is the DDP reference; the
other multi-process runs are ranks forked from this process (``test_pretrain.start_forked``: same
environment variables as torchrun, no interpreter start-up). Every run uses ``--fixed_mask_count``, so each
image has the same number of masked patches and the mean loss over a global batch equals the mean of the
per-rank (or per-micro-batch) means: runs with the same global batch then differ only by float rounding.

Why the same global batch means the same samples: rank r of W takes ``perm[r::W]`` of the epoch's
permutation (DistributedSampler), so its step-t batch of b is ``perm[(t*b + j)*W + r]``, j < b; over all
ranks that is exactly ``perm[t*b*W : (t+1)*b*W]``, the step-t batch of a one-process run with batch b*W
(``test_rank_batches_union_is_the_single_process_batch``).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

# Imported here, before forking, so that the forked ranks share them instead of importing them each.
import torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
from beit_fast.utils.checkpoint import load_checkpoint
from beit_fast.data.pretraining import ResumableSampler
from test_pretrain import join_all, make_toy_images, make_toy_tokenizer, read_log, run_forked, start_forked

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo")]

# Float32 rounding of a different summation order (per-rank means averaged vs one mean; all-reduced vs
# summed gradients) moves these losses by < 3e-7 relative over 12 steps (measured); a missing gradient
# all-reduce moves them by > 1e-2.
RTOL = 1e-5
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return make_toy_images(root / "images"), make_toy_tokenizer(root / "tok.pt")


def dist_args(toy, out, *extra):
    images, tok = toy
    return ["--data_path", images, "--tokenizer", "dvae", "--discrete_vae_weight_path", tok, "--model", "tiny",
            "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6", "--min_mask_patches_per_block", "2",
            "--fixed_mask_count", "--num_workers", "0", "--amp", "none", "--epochs", "2", "--warmup_epochs", "1",
            "--save_ckpt_freq", "1", "--log_freq", "1", "--no_progress", "--output_dir", out, *map(str, extra)]


@pytest.fixture(scope="module")
def ddp_run(toy, tmp_path_factory):
    """The reference: ``torchrun --standalone --nproc_per_node=2 -m beit_fast.pretrain``, batch 2 per rank."""
    out = tmp_path_factory.mktemp("ddp_torchrun")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "beit_fast.pretrain",
           *dist_args(toy, out, "--batch_size", 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def single_run(toy, tmp_path_factory):
    """One process with batch 4: the global batch of the 2-rank runs with batch 2."""
    out = tmp_path_factory.mktemp("single_b4")
    run_forked(dist_args(toy, out, "--batch_size", 4))
    return out


def losses(out):
    return np.array([r["loss"] for r in read_log(out)])


def assert_same_curve(out, ref, exact=False, steps=None):
    log, ref_log = read_log(out), read_log(ref)
    if steps is not None:
        ref_log = [r for r in ref_log if r["step"] in steps]
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    assert [r["lr"] for r in log] == [r["lr"] for r in ref_log]
    a, b = np.array([r["loss"] for r in log]), np.array([r["loss"] for r in ref_log])
    if exact:
        assert a.tolist() == b.tolist()
    else:
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)


def assert_same_weights(out, ref, exact=False):
    a = load_checkpoint(out / "checkpoint-last.pt")["model"]
    b = load_checkpoint(ref / "checkpoint-last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


@pytest.mark.parametrize("n,world,batch,update_freq", [(24, 2, 2, 1), (25, 2, 2, 1), (24, 2, 1, 2), (31, 4, 2, 2)])
def test_rank_batches_union_is_the_single_process_batch(n, world, batch, update_freq):
    single = ResumableSampler(n, seed=3).indices(epoch=1)
    ranks = [ResumableSampler(n, seed=3, rank=r, world_size=world).indices(epoch=1) for r in range(world)]
    micro = batch * update_freq
    steps = len(ranks[0]) // micro
    global_batch = micro * world
    assert steps >= 2
    for t in range(min(steps, n // global_batch)):
        union = sorted(i for r in ranks for i in r[t * micro:(t + 1) * micro])
        assert union == sorted(single[t * global_batch:(t + 1) * global_batch]), t


def test_torchrun_ddp_equals_one_process_with_the_global_batch(ddp_run, single_run):
    log = read_log(ddp_run)
    assert [r["step"] for r in log] == list(range(1, 13))  # one writer: rank 0 (two would double the lines)
    assert_same_curve(ddp_run, single_run)
    assert_same_weights(ddp_run, single_run)
    assert losses(ddp_run)[-3:].mean() < losses(ddp_run)[:3].mean()
    names = {p.name for p in ddp_run.iterdir()}
    assert names == {"args.json", "log.jsonl", "checkpoint-last.pt", "checkpoint-1.pt", "checkpoint-2.pt",
                     "checkpoint-best.pt"}, names
    ckpt = load_checkpoint(ddp_run / "checkpoint-last.pt")
    assert ckpt["world_size"] == 2 and ckpt["args"]["global_batch_size"] == 4
    assert not any(k.startswith("module.") or k.startswith("model.") for k in ckpt["model"])
    rngs = ckpt["rng_per_rank"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # seed + rank
    assert log[0]["images_per_s"] > 0 and ckpt["args"]["batch_size"] == 2


def test_sigterm_to_one_rank_stops_both_then_resume_is_exact(toy, ddp_run, tmp_path):
    """A signal seen by one rank stops every rank at the same step boundary with one checkpoint; resuming
    (every rank from that file) continues bit for bit like the uninterrupted run."""
    out = tmp_path / "ddp"
    procs = start_forked(dist_args(toy, out, "--batch_size", 2), world_size=2)
    log_file, deadline = out / "log.jsonl", time.time() + 120
    while not (log_file.is_file() and log_file.read_text()):  # rank 0 logged step 1: both ranks are training
        assert time.time() < deadline, "timed out"
        assert all(p.is_alive() for p in procs), [p.exitcode for p in procs]
        time.sleep(0.01)
    os.kill(procs[1].pid, signal.SIGTERM)
    assert join_all(procs) == [0, 0]
    stopped = load_checkpoint(out / "checkpoint-last.pt")["step"]
    assert 1 <= stopped < 12, stopped
    assert read_log(out)[-1]["step"] == stopped
    run_forked(dist_args(toy, out, "--batch_size", 2, "--resume", "auto"), world_size=2)
    assert_same_curve(out, ddp_run, exact=True)
    assert_same_weights(out, ddp_run, exact=True)


def test_fast_step_under_ddp_goes_through_the_wrapper(toy, single_run, tmp_path):
    """The fast static-shape step (model.forward_masked_hidden + fused loss) called through the DDP-wrapped
    MIMLoss: gradients are all-reduced, so rank 0's weights follow the one-process run with the global batch
    (without the all-reduce they would follow rank 0's half of the data)."""
    out = tmp_path / "fast"
    run_forked(dist_args(toy, out, "--batch_size", 2, "--fast", "on", "--no-compile", "--attn_backend", "sdpa",
                         "--kernel_backend", "reference"), world_size=2)
    assert_same_curve(out, single_run)
    assert_same_weights(out, single_run)


def test_gradient_accumulation_equals_the_double_batch(toy, single_run, tmp_path):
    """--update_freq 2 at batch 2 (one process; stopped mid-epoch and resumed, which must skip 2 x 2
    samples per step done) and at batch 1 (two DDP ranks, no_sync on the first micro-batch) both equal
    batch 4 in one process."""
    one = tmp_path / "uf_single"
    run_forked(dist_args(toy, one, "--batch_size", 2, "--update_freq", 2, "--stop_after_steps", 8))
    assert load_checkpoint(one / "checkpoint-last.pt")["step"] == 8
    run_forked(dist_args(toy, one, "--batch_size", 2, "--update_freq", 2, "--resume", "auto"))
    assert_same_curve(one, single_run)
    assert_same_weights(one, single_run)
    two = tmp_path / "uf_ddp"
    run_forked(dist_args(toy, two, "--batch_size", 1, "--update_freq", 2), world_size=2)
    assert_same_curve(two, single_run)
    assert_same_weights(two, single_run)
    assert load_checkpoint(two / "checkpoint-last.pt")["args"]["global_batch_size"] == 4


def test_fsdp_resumes_a_ddp_checkpoint_and_saves_the_same_full_state(toy, ddp_run, tmp_path):
    """FSDP2 (fully_shard per block + root, gloo on CPU) resumes from the DDP run's epoch-1 checkpoint and
    runs epoch 2: the same losses as DDP, and a checkpoint in the same unsharded format with the same
    values (model, optimizer moments) as the DDP run's, so either kind of run resumes the other's files."""
    out = tmp_path / "fsdp"
    out.mkdir()
    shutil.copy(ddp_run / "checkpoint-1.pt", out / "checkpoint-1.pt")
    run_forked(dist_args(toy, out, "--batch_size", 2, "--fsdp", "--resume", "auto"), world_size=2)
    assert_same_curve(out, ddp_run, steps=range(7, 13))
    assert_same_weights(out, ddp_run)
    mine, ref = load_checkpoint(out / "checkpoint-last.pt"), load_checkpoint(ddp_run / "checkpoint-last.pt")
    assert mine["step"] == ref["step"] == 12
    # The optimizer state is in optimizer.state_dict()'s own integer-keyed layout, as one process saves it.
    assert mine["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    assert [g["params"] for g in mine["optimizer"]["param_groups"]] == \
        [g["params"] for g in ref["optimizer"]["param_groups"]]
    for i, s in ref["optimizer"]["state"].items():
        assert float(mine["optimizer"]["state"][i]["step"]) == float(s["step"]) == 12
        torch.testing.assert_close(mine["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(mine["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], atol=1e-9,
                                   rtol=1e-4)
