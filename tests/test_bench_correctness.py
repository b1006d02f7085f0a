"""The benchmarks' correctness gate (benchmarks/correctness.py): a wrong candidate is refused before it is
timed, and timed steps must be finite and not skipped."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_attention  # noqa: E402
import correctness  # noqa: E402
from beit_fast.train.engine import StepResult  # noqa: E402


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: records extra_info and whether anything was timed."""

    def __init__(self):
        self.extra_info, self.timed, self.group, self.stats = {}, False, None, None

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        self.timed = True
        fn()


def test_check_uses_the_tests_rules():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, generator=g, dtype=torch.float64)
    ok = FakeBenchmark()
    correctness.check(ok, [ref.float()], [ref])
    assert ok.extra_info["correct"] is True
    wrong = FakeBenchmark()
    with pytest.raises(correctness.WrongAnswer, match="WRONG ANSWER"):
        correctness.check(wrong, [(ref * 1.0001).float()], [ref])  # 1e-4 relative: over fp32's 1e-5 rule
    assert wrong.extra_info["correct"] is False
    lowp = (ref + 1e-3 * torch.randn(50, generator=g, dtype=torch.float64))  # "PyTorch's own" bf16 error
    correctness.check(FakeBenchmark(), [ref + 1.5e-3], [ref], [lowp])  # within 2x + 1e-3 x scale
    with pytest.raises(correctness.WrongAnswer):
        correctness.check(FakeBenchmark(), [ref + 0.05], [ref], [lowp])
    with pytest.raises(correctness.WrongAnswer, match="all zero"):
        correctness.check(FakeBenchmark(), [torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)])


def test_check_steps_refuses_non_finite_and_skipped_steps():
    def result(loss, skipped=False):
        return StepResult(loss=loss, metric=0.0, grad_norm=1.0, loss_scale=1.0, lr=0.0, min_lr=0.0,
                          weight_decay=0.0, skipped=skipped)

    b = FakeBenchmark()
    correctness.check_steps(b, [result(1.0), result(torch.tensor(2.0))])
    assert b.extra_info["steps_ok"] is True
    for bad in ([result(float("nan"))], [result(1.0, skipped=True)], [result(torch.tensor(float("inf")))], []):
        with pytest.raises(correctness.WrongAnswer):
            correctness.check_steps(FakeBenchmark(), bad)


def test_attention_benchmark_refuses_to_time_a_wrong_backend(monkeypatch):
    """A backend 1 % off (planted in the benchmark's view of attention_with_bias) fails the row untimed;
    the correct one is timed."""
    real = bench_attention.attention_with_bias

    def off_by_one_percent(q, k, v, bias, backend=None, **kw):
        out = real(q, k, v, bias, backend=backend, **kw)
        return out * 1.01 if backend == "sdpa" else out

    monkeypatch.setattr(bench_attention, "attention_with_bias", off_by_one_percent)
    args = ("cpu", (2, 2, (4, 4), 16), torch.float32)
    fine = FakeBenchmark()
    bench_attention.test_attention_fwd_bwd(fine, *args, "math", "dense", monkeypatch)
    assert fine.timed and fine.extra_info["correct"] is True
    wrong = FakeBenchmark()
    with pytest.raises(correctness.WrongAnswer, match="WRONG ANSWER"):
        bench_attention.test_attention_fwd_bwd(wrong, *args, "sdpa", "dense", monkeypatch)
    assert not wrong.timed and wrong.extra_info["correct"] is False
