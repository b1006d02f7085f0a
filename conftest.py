"""Root pytest configuration.

Triton's interpreter must be switched on before any kernel module is imported, so that every
@triton.jit kernel runs on CPU tensors in tests (KERNELS.md says what the interpreter can and cannot do). On a machine with a GPU,
run the tests with BEIT_FAST_REAL_GPU=1 to execute the kernels for real instead.
"""
import os

if os.environ.get("BEIT_FAST_REAL_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
