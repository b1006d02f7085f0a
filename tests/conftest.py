"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a small shared machine two OpenMP threads
    contending with other processes make tiny ops 10-100x slower (measured: a 60-step tokenizer test ran
    12x slower under load), and every run of a test then uses the same count, so results compare."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
