"""Shared test fixtures, and the Triton interpreter switched on where the tests live.

The root conftest.py does the same; this one also holds when the tests are run without it (another rootdir,
a copied tests/ folder). Without a GPU the Triton kernels run under the interpreter, so no Triton test skips
for lack of it: with neither a GPU nor the interpreter they fail, with the op's own message. On a machine with
a GPU, BEIT_FAST_REAL_GPU=1 runs the compiled kernels instead. Set before any kernel module is imported.
"""
import os

if os.environ.get("BEIT_FAST_REAL_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a small shared machine two OpenMP threads
    contending with other processes make tiny ops 10-100x slower (measured: a 60-step tokenizer test ran
    12x slower under load), and every run of a test then uses the same count, so results compare."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
