"""Small helpers shared by the Triton kernel modules (private).

Everything here is host-side Python: it never touches tensor values, so nothing in it forces a host/device
synchronisation.
"""
from __future__ import annotations

import functools

import torch
import triton

try:  # the interpreter's wrapper type; present in every Triton 3.x
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # pragma: no cover - very old/new Triton layouts
    _InterpretedFunction = ()

def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs under TRITON_INTERPRET=1.

    ``triton.jit`` decides at decoration time (module import) whether it returns a compiled
    ``JITFunction`` or an ``InterpretedFunction``; looking at the object itself is therefore the only
    reliable way to know which one a launcher is about to call.
    """
    return bool(_InterpretedFunction) and isinstance(kernel, _InterpretedFunction)


def jit_function_of(kernel):
    """The underlying ``JITFunction`` of a kernel (used by the ahead-of-time compile check)."""
    if is_interpreted(kernel):
        raise RuntimeError(
            "this kernel was imported under TRITON_INTERPRET=1; import the kernel module in a process "
            "with TRITON_INTERPRET=0 to compile it for a GPU target"
        )
    return kernel


def dot_input_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands, following PyTorch's global matmul setting.

    ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default) gives exact IEEE fp32
    products; "high"/"medium" allow TF32 tensor cores, as they do for torch.matmul. 16-bit operands are
    unaffected (the value is ignored for them).
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (its index, or the current device), cached per index."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
