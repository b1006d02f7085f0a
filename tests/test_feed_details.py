"""The smaller feeding details: the device pipeline's timing events do not pile up over an epoch, its loader
thread never flips the process-wide TF32 flag, FSDP2 gathers bf16 parameters in a bf16 run."""
import torch

from beit_fast.data.pipeline.device import LoaderStats
from beit_fast.data.pipeline.ops import _resample_dtype, resample_weights, resize_crops


class FakeEvent:
    def __init__(self, t, done):
        self.t, self.done = t, done

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_timing_events_already_passed_are_folded_into_the_waits():
    stats = LoaderStats()
    for k in range(1000):  # an epoch: the GPU has passed every event but the last two
        stats.add_device_wait(FakeEvent(k, True), FakeEvent(k + 0.5, k < 998))
    assert len(stats._events) <= 2  # only the events the GPU has not reached yet are held
    waits = stats.device_waits()
    assert len(waits) == 1000 and all(w == 0.5 for w in waits) and not stats._events
    assert stats.device_wait_s == 500.0


def test_resampling_reads_the_tf32_flag_and_never_sets_it():
    cuda = torch.device("cuda")
    # set and restored by hand: the flag lives behind cuBLASModule's __setattr__, not in an instance __dict__,
    # and pytest >= 9.1's monkeypatch would delete it on undo
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _resample_dtype(cuda, exact=False) == torch.float64  # TF32 would move pixels: float64 instead
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _resample_dtype(cuda, exact=False) == torch.float32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert _resample_dtype(torch.device("cpu"), exact=False) == torch.float32
    assert _resample_dtype(cuda, exact=True) == torch.float64
    images = torch.randint(0, 256, (2, 3, 12, 10), dtype=torch.uint8)
    zero, no = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
    wy = resample_weights(torch.tensor([12, 12]), zero, no, 6, 12, "bicubic")
    wx = resample_weights(torch.tensor([10, 10]), zero, no, 5, 10, "bicubic")
    assert torch.equal(resize_crops(images, wy, wx, exact=False), resize_crops(images, wy, wx, exact=True))


def test_fsdp_gathers_bf16_parameters_and_reduces_fp32_in_a_bf16_run(monkeypatch):
    import torch.distributed.fsdp as fsdp

    from beit_fast.train.distributed import apply_fsdp

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw)))
    blocks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    root = torch.nn.Sequential(*blocks)
    apply_fsdp(root, blocks, param_dtype=torch.bfloat16)
    assert [m for m, _ in calls] == [*blocks, root]
    assert all(kw["mp_policy"].param_dtype == torch.bfloat16 and kw["mp_policy"].reduce_dtype == torch.float32
               for _, kw in calls)
    calls.clear()
    apply_fsdp(root, blocks)  # fp32 runs: parameters gathered as they are
    assert all(kw["mp_policy"].param_dtype is None for _, kw in calls)
