"""Helpers shared by the kernel tests (tests/test_ops_*.py)."""
import os

import pytest
import torch

# CPU + Triton interpreter by default; the real kernels on CUDA with BEIT_FAST_REAL_GPU=1.
DEVICE = torch.device("cuda" if os.environ.get("BEIT_FAST_REAL_GPU") == "1" and torch.cuda.is_available() else "cpu")


class PoisonedTorch:
    """Stands in for ``torch`` inside a kernel module: empty()/empty_like()/empty_strided() come back filled with NaN
    (floating) or a sentinel (integer), so unwritten output elements are detected."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7777)
        return t

    def empty(self, *args, **kwargs):
        return self._fill(self._real.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._fill(self._real.empty_like(*args, **kwargs))

    def empty_strided(self, *args, **kwargs):
        return self._fill(self._real.empty_strided(*args, **kwargs))


@pytest.fixture(autouse=True)
def exact_fp32_reference():
    """On CUDA, cuBLAS and cuDNN default to TF32 for fp32: the fp32 reference must be IEEE fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
