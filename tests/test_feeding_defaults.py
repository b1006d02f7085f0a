"""Defaults that feed a GPU: loader workers from the cores a process may use, fine-tuning's persistent workers
reseeded per epoch, and the share of time the loop waits for data (logged, warned about when it dominates)."""
import json
import logging
import os
import time

import numpy as np
import pytest
import torch

from beit_fast.config import FinetuneConfig
from beit_fast.data.pretraining import ResumableSampler
from beit_fast.utils.options import add_classification_data_args
from beit_fast.train import feed
from beit_fast.train.epoch_seeds import EpochSeeded
from beit_fast.train.loop import LoopConfig, TrainLoop

pytestmark = pytest.mark.usefixtures("one_thread")


def test_workers_come_from_the_cores_of_this_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert feed.cores_per_process() == 16
    assert feed.default_num_workers("cuda") == 15  # one core left to the process that queues the GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 GPUs on this node
    assert feed.cores_per_process() == 4 and feed.default_num_workers("cuda") == 3
    assert feed.default_num_workers("cpu") == 4 and feed.default_num_workers("cpu", on_cpu=0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a container limited to 2 cores
    assert feed.default_num_workers("cuda") == 1 and feed.default_num_workers("cpu") == 1


def test_fine_tuning_workers_default_to_automatic():
    import argparse

    parser = argparse.ArgumentParser()
    add_classification_data_args(parser)
    assert parser.parse_args([]).num_workers is None and FinetuneConfig().num_workers is None
    FinetuneConfig().validate()  # None (automatic) is valid
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        FinetuneConfig(num_workers=-1).validate()


class Noise(torch.utils.data.Dataset):
    """Item i: one draw of torch's, numpy's and Python's global generators (an augmentation's randomness)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import random

        return torch.tensor([float(torch.rand(())), float(np.random.rand()), random.random()])


def _epoch(loader, dataset, epoch):
    dataset.set_epoch(epoch)
    return torch.cat(list(loader))


def test_persistent_workers_draw_each_epochs_augmentations_as_fresh_workers_do():
    """A run resumed at epoch 2 starts new workers: they must draw epoch 2's augmentations like the workers
    that ran since epoch 0 (persistent workers keep their generators' state across epochs otherwise)."""
    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True,
                                           multiprocessing_context="fork")

    long_set = EpochSeeded(Noise(), seed=5)
    long_run = loader(long_set)
    epochs = [_epoch(long_run, long_set, e) for e in range(3)]
    fresh_set = EpochSeeded(Noise(), seed=5)
    resumed = _epoch(loader(fresh_set), fresh_set, 2)
    assert torch.equal(resumed, epochs[2])
    assert not torch.equal(epochs[1], epochs[2])  # each epoch draws anew
    other = EpochSeeded(Noise(), seed=6)
    assert not torch.equal(_epoch(loader(other), other, 2), epochs[2])


class _ToyEngine:
    """The engine interface TrainLoop uses: one step = one batch, host results."""

    device = torch.device("cpu")

    def train_accumulated(self, batches, step):
        from beit_fast.train.engine import StepResult

        return StepResult(1.0, 0.5, 1.0, 1.0, 1e-3, 1e-3, 0.0)

    def model_state_dict(self):
        return {}

    def state_dict(self):
        return {}


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.zeros(1)


def test_the_share_of_time_waiting_for_data_is_logged_and_warned_about(tmp_path, caplog):
    sampler = ResumableSampler(24, seed=0)
    loader = torch.utils.data.DataLoader(Slow(), batch_size=2, sampler=sampler)
    cfg = LoopConfig(epochs=1, steps_per_epoch=12, log_freq=4, save=False, progress=False, handle_signals=False)
    loop = TrainLoop(_ToyEngine(), loader, sampler, cfg, output_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="beit_fast.train"):
        loop.run()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"data_wait"' in line]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all(0.8 < r["data_wait"] <= 1.0 for r in records), records  # the step takes no time: all is waiting
    warnings = [r.message for r in caplog.records if "the loader is the bottleneck" in r.message]
    assert len(warnings) == 1 and "0 data workers" in warnings[0]


def test_ranks_agree_on_a_stop_at_logging_intervals_not_every_step(monkeypatch, tmp_path):
    """Under DDP the any-rank stop check is a collective that waits for the GPU: every --log_freq steps and at
    epoch ends, not after every step."""
    import beit_fast.train.loop as loop_mod

    class TwoRanks:
        is_main, world_size, rank, active = True, 2, 0, True

    calls = []
    monkeypatch.setattr(loop_mod, "any_rank", lambda flag, info, device: calls.append(flag) or flag)
    sampler = ResumableSampler(24, seed=0)
    loader = torch.utils.data.DataLoader(torch.zeros(24, 1), batch_size=2, sampler=sampler)
    cfg = LoopConfig(epochs=2, steps_per_epoch=6, log_freq=4, save=False, progress=False, handle_signals=False)
    TrainLoop(_ToyEngine(), loader, sampler, cfg, dist_info=TwoRanks()).run()
    assert len(calls) == 4  # after steps 4, 6 (epoch end), 8 and 12: not after each of the 12


def test_one_process_stops_at_the_step_after_a_signal(tmp_path):
    """Only a multi-process run defers the stop to its next logging interval (where its ranks agree)."""
    import signal

    class OneProcess:
        is_main, world_size, rank, active = True, 1, 0, False

    class Signalling(_ToyEngine):
        def train_accumulated(self, batches, step):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # during step 2
            return super().train_accumulated(batches, step)

    sampler = ResumableSampler(24, seed=0)
    loader = torch.utils.data.DataLoader(torch.zeros(24, 1), batch_size=2, sampler=sampler)
    cfg = LoopConfig(epochs=1, steps_per_epoch=12, log_freq=4, save=False, progress=False)
    loop = TrainLoop(Signalling(), loader, sampler, cfg, dist_info=OneProcess())
    assert loop.run()["steps"] == 2 and loop.stop_reason == "SIGTERM"
