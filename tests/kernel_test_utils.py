"""Helpers shared by the kernel tests (tests/test_ops_*.py) and the model-level parity tests."""
import os
import zlib

import pytest
import torch

# CPU + Triton interpreter by default; the real kernels on CUDA with BEIT_FAST_REAL_GPU=1.
DEVICE = torch.device("cuda" if os.environ.get("BEIT_FAST_REAL_GPU") == "1" and torch.cuda.is_available() else "cpu")


def seed_for_current_test() -> int:
    """A fixed seed for the running test: crc32 of its node id (reproducible run to run, different from test
    to test). Printed, so a failing test's captured output reports it."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    seed = zlib.crc32(node.encode()) % 2**31
    print(f"seed {seed} for {node}")
    return seed


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


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max |actual - expected|, max |expected|)`` in fp64."""
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    return err, expected.detach().double().abs().max().item()


def close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = "") -> str | None:
    """The fp32 rule: max error <= ``rel`` x max |expected|, a bound relative to the tensor's own scale (an
    absolute atol passes any error on a tensor much smaller than it). An all-zero reference is refused: it
    would make the comparison vacuous. None when it holds, else what is wrong."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = max_rel_error(actual, expected)
    if not scale > 0:
        return f"{name}: the reference is all zero (or not finite), the comparison would prove nothing"
    if not err <= rel * scale:
        return f"{name}: max error {err:.3g} > {rel:g} x max|ref| {scale:.3g} (rel {err / scale:.3g})"
    return None


def close_flash_rule(actual: torch.Tensor, lowp_ref: torch.Tensor, fp32_ref: torch.Tensor, name: str = "",
                     factor: float = 2.0, floor: float = 1e-3) -> str | None:
    """Flash-attention's rule for bf16/fp16: the error of ``actual`` against the fp32 (or fp64) reference is
    at most ``factor`` x PyTorch's own error at the same precision (``lowp_ref``) plus ``floor`` x
    max |fp32_ref|. None when it holds, else what is wrong."""
    if actual.shape != fp32_ref.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(fp32_ref.shape)}"
    err, scale = max_rel_error(actual, fp32_ref)
    err_ref, _ = max_rel_error(lowp_ref, fp32_ref)
    if not scale > 0:
        return f"{name}: the reference is all zero (or not finite), the comparison would prove nothing"
    if not err <= factor * err_ref + floor * scale:
        return f"{name}: error {err:.3g} > {factor:g} x PyTorch's {err_ref:.3g} + {floor:g} x max|ref| {scale:.3g}"
    return None


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = "") -> None:
    """:func:`close_rel` as an assertion (the model-level parity tests)."""
    problem = close_rel(actual, expected, rel, name)
    assert problem is None, problem


def assert_flash_rule(actual: torch.Tensor, lowp_ref: torch.Tensor, fp32_ref: torch.Tensor, name: str = "",
                      factor: float = 2.0, floor: float = 1e-3) -> None:
    """:func:`close_flash_rule` as an assertion."""
    problem = close_flash_rule(actual, lowp_ref, fp32_ref, name, factor, floor)
    assert problem is None, problem
