"""The one training engine (beit_fast.train.engine.Engine) on a toy task module: schedules through
optim.apply_schedule, accumulation, clipping, and the non-finite policy in both detection modes (host:
read before the backward; device: fused AdamW's found_inf, no host read)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from beit_fast.train.optim import param_groups_weight_decay
from beit_fast.train.engine import Engine, StepResult


class ToyTask(nn.Module):
    """``forward(x, y) -> (mse, mean |error|)`` of a linear model; ``poison`` makes the loss non-finite."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
        self.amp_dtype = None
        self.poison = None

    def forward(self, x, y):
        out = self.model(x)
        loss = ((out - y) ** 2).mean()
        if self.poison is not None:
            loss = loss * self.poison
        return loss, (out - y).abs().mean().detach()


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def make(check="host", fused=False, clip=1.0):
    task = ToyTask()
    groups = [g for g in param_groups_weight_decay(task.model, 0.05) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=fused or None)
    lr, wd = np.linspace(1e-2, 1e-3, 10), np.linspace(0.05, 0.01, 10)
    return Engine(task, opt, torch.device("cpu"), lr, wd, clip_grad=clip, nonfinite_check=check), task


def snapshot(engine):
    params = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    state = copy.deepcopy(engine.optimizer.state_dict()["state"])
    return params, state


def assert_unchanged(engine, before):
    params, state = snapshot(engine)
    for n in params:
        assert torch.equal(params[n], before[0][n]), n
    for i in state:
        for k in state[i]:
            assert torch.equal(state[i][k], before[1][i][k]), (i, k)


def test_schedule_is_applied_through_optim_apply_schedule():
    engine, _ = make()
    engine.train_step(batch(0), 3)
    decay, no_decay = engine.optimizer.param_groups
    assert decay["lr"] == engine.lr_schedule[3] and decay["weight_decay"] == engine.wd_schedule[3]
    assert no_decay["weight_decay"] == 0.0
    engine.train_step(batch(0), 99)  # past the end: the last value holds
    assert decay["lr"] == engine.lr_schedule[-1]


@pytest.mark.parametrize("fused", [False, True])
def test_device_check_gives_the_host_check_step(fused):
    """Same update, same metrics: only where they are read differs."""
    host, _ = make("host", fused=fused)
    dev, _ = make("device", fused=fused)
    for step in range(3):
        micro = [batch(10 * step), batch(10 * step + 1)]
        a, b = host.train_accumulated(micro, step), dev.train_accumulated(micro, step)
        assert isinstance(a.loss, float) and isinstance(b.loss, torch.Tensor) and b.loss.shape == ()
        assert a.loss == pytest.approx(float(b.loss), rel=1e-6) and a.skipped is False and not bool(b.skipped)
        assert a.grad_norm == pytest.approx(float(b.grad_norm), rel=1e-6)
    for (n, p), q in zip(host.model.named_parameters(), dev.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_accumulation_is_the_mean_of_the_micro_batch_losses():
    one, _ = make(clip=None)
    two, _ = make(clip=None)
    x, y = batch(3, n=8)
    one.train_step((x, y), 0)
    two.train_accumulated([(x[:4], y[:4]), (x[4:], y[4:])], 0)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("check,fused", [("host", False), ("device", True), ("device", False)])
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_step_makes_no_update(check, fused, poison):
    """A non-finite loss: no change to the weights, the AdamW moments or its step count; reported as
    skipped and bad. Device mode with fused AdamW decides on the device (found_inf); an optimizer without
    that support falls back to one host read."""
    engine, task = make(check, fused=fused)
    engine.train_step(batch(0), 0)
    before = snapshot(engine)
    task.poison = poison
    result = engine.train_step(batch(1), 1)
    assert_unchanged(engine, before)
    assert bool(result.skipped) and bool(result.bad)
    task.poison = None
    result = engine.train_step(batch(2), 2)
    assert not bool(result.skipped) and math.isfinite(float(result.loss))
    assert any(not torch.equal(p, before[0][n]) for n, p in engine.model.named_parameters())


def test_device_check_reads_nothing_on_the_host(monkeypatch):
    """With fused AdamW, a device-mode step makes no host read: Tensor.item / tolist / __bool__ are never
    called on a result tensor (the loop reads them at its logging intervals)."""
    engine, task = make("device", fused=True)
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    task.poison = math.nan
    result = engine.train_accumulated([batch(0), batch(1)], 0)
    task.poison = None
    engine.train_step(batch(2), 1)
    monkeypatch.undo()
    assert calls == [], calls
    assert bool(result.skipped)


def test_grad_norm_non_finite_without_scaler_is_skipped_in_both_modes():
    """A finite loss whose gradient is not finite (no loss scaler to catch it): skipped, no update."""
    for check, fused in (("host", False), ("device", True)):
        engine, task = make(check, fused=fused)
        engine.train_step(batch(0), 0)
        before = snapshot(engine)
        handle = task.model[0].weight.register_hook(lambda g: g * math.inf)
        result = engine.train_step(batch(1), 1)
        handle.remove()
        assert math.isfinite(float(result.loss)) and not math.isfinite(float(result.grad_norm))
        assert bool(result.skipped) and bool(result.bad)
        assert_unchanged(engine, before)


def test_step_result_names():
    r = StepResult(1.0, 0.5, 2.0, 1.0, 1e-3, 1e-4, 0.05)
    assert r.mlm_acc == 0.5 and r.skipped is False and r.bad is False


def test_loading_a_state_keeps_this_engines_optimizer_implementation():
    """A checkpoint of a run with for-each AdamW resumed by an engine with fused AdamW (the device-side skip
    needs it): the state is loaded, the fused implementation stays; the next step matches the saving run's."""
    saver, _ = make("host", fused=False)
    saver.train_step(batch(0), 0)
    state = copy.deepcopy(saver.state_dict())  # as read from a file: no tensor shared with the saver
    loader, _ = make("device", fused=True)
    loader.model.load_state_dict(saver.model.state_dict())
    loader.load_state_dict(state)
    assert all(g["fused"] for g in loader.optimizer.param_groups)
    a, b = saver.train_step(batch(1), 1), loader.train_step(batch(1), 1)
    assert a.loss == pytest.approx(float(b.loss), rel=1e-6)
    for p, q in zip(saver.model.parameters(), loader.model.parameters()):
        torch.testing.assert_close(p, q)


def test_the_demos_take_one_cpu_thread_unless_told(monkeypatch):
    """Two threads made the demo's tokenizer 30x slower on a busy 2-core machine (807 s vs 27 s for 60 steps):
    the embedded demos take one intra-op thread on a CPU, unless OMP_NUM_THREADS chooses."""
    import torch

    from beit_fast.train.engine import demo_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        demo_cpu_threads("cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        demo_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
