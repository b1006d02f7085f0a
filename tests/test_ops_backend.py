"""The dispatch layer: names, precedence (argument > context > set_backend > env var > "auto"), and
that each op really runs the implementation the resolution names."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import beit_fast.kernels.cross_entropy as ce_kernels
import beit_fast.kernels.patch_embed as pe_kernels
from beit_fast.ops import (
    VALID_BACKENDS,
    get_backend,
    masked_linear_cross_entropy,
    patch_embed_mask,
    resolve_backend,
    set_backend,
    use_backend,
)
from beit_fast.ops import backend as backend_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU tensors through the Triton path: under the interpreter (tests/conftest.py), which a real-GPU run
# (BEIT_FAST_REAL_GPU=1) turns off; without a GPU these tests run, and fail if the interpreter is missing.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("BEIT_FAST_REAL_GPU") == "1",
    reason="CPU tensors through the Triton path need the interpreter, which BEIT_FAST_REAL_GPU=1 turns off",
)


@pytest.fixture(autouse=True)
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)


def test_valid_names():
    assert VALID_BACKENDS == ("auto", "reference", "triton")


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None, 3])
def test_unknown_name_raises_listing_valid(bad):
    with pytest.raises(ValueError, match="'auto', 'reference', 'triton'"):
        set_backend(bad)
    with pytest.raises(ValueError, match="valid backends"):
        with use_backend(bad):
            pass
    if bad is not None:  # None as an op argument means "use the global setting"
        with pytest.raises(ValueError, match="valid backends"):
            resolve_backend(bad, torch.zeros(1))


def test_set_and_context_precedence():
    set_backend("reference")
    assert get_backend() == "reference"
    with use_backend("triton"):
        assert get_backend() == "triton"
        with use_backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "triton"
    assert get_backend() == "reference"
    with pytest.raises(RuntimeError):
        with use_backend("triton"):
            raise RuntimeError("boom")
    assert get_backend() == "reference"  # restored after an exception


@needs_interpreter
def test_resolution_on_cpu_under_interpreter():
    x = torch.zeros(2)
    assert resolve_backend("auto", x) == "reference"  # auto never picks the interpreter
    assert resolve_backend("reference", x) == "reference"
    assert resolve_backend("triton", x) == "triton"
    set_backend("triton")
    assert resolve_backend(None, x) == "triton"
    assert resolve_backend("reference", x) == "reference"  # argument beats global


def _env_subprocess(code, **env):
    full = dict(os.environ)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=120)


def test_env_var_sets_default():
    r = _env_subprocess("from beit_fast.ops import get_backend; print(get_backend())", BEIT_FAST_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"


def test_env_var_invalid_is_a_clear_error():
    r = _env_subprocess("import beit_fast.ops", BEIT_FAST_BACKEND="fast")
    assert r.returncode != 0
    assert "BEIT_FAST_BACKEND" in r.stderr and "'auto', 'reference', 'triton'" in r.stderr


def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from beit_fast.ops import resolve_backend, masked_linear_cross_entropy\n"
        "x = torch.zeros(2)\n"
        "assert resolve_backend('auto', x) == 'reference'\n"
        "try:\n"
        "    masked_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 1, 2]),"
        " backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    r = _env_subprocess(code, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert "RAISED" in r.stdout and "needs CUDA tensors" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@needs_interpreter
def test_ops_dispatch_to_the_resolved_implementation(monkeypatch):
    pe_calls = _count_calls(monkeypatch, pe_kernels, "patch_embed_mask_forward")
    ce_calls = _count_calls(monkeypatch, ce_kernels, "linear_ce_chunked")
    px, w, b, t = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.randn(8), torch.randn(8)
    m = torch.zeros(1, 4, dtype=torch.bool)
    h, W, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 3])

    patch_embed_mask(px, w, b, t, m)  # global "auto" on CPU -> reference
    masked_linear_cross_entropy(h, W, None, y)
    assert pe_calls == [] and ce_calls == []

    with use_backend("triton"):
        patch_embed_mask(px, w, b, t, m)
        masked_linear_cross_entropy(h, W, None, y)
        patch_embed_mask(px, w, b, t, m, backend="reference")
        masked_linear_cross_entropy(h, W, None, y, backend="reference")
    assert pe_calls == [1] and ce_calls == [1]

    patch_embed_mask(px, w, b, t, m, backend="triton")
    masked_linear_cross_entropy(h, W, None, y, backend="triton")
    assert pe_calls == [1, 1] and ce_calls == [1, 1]
