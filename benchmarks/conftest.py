"""Benchmark collection: ``pytest benchmarks/ --benchmark-only`` collects ``bench_*.py`` files.

On a machine with CUDA the Triton kernels must run compiled, not under the interpreter that the root
conftest switches on for CPU tests: if CUDA is available and the kernels have not been imported yet,
TRITON_INTERPRET is turned off here (BEIT_FAST_REAL_GPU=1 does the same from the root conftest).
"""
import os
import sys

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
    if not any(m.startswith("beit_fast.kernels.") for m in sys.modules):
        os.environ["TRITON_INTERPRET"] = "0"


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; only add the directory walk
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
