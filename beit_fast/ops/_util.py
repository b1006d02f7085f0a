"""Private helpers shared by the fused ops (input checks, autocast handling); metadata only, no host sync."""
from __future__ import annotations

import contextlib

import torch

SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16"
        )


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}: pass all floating-point "
                f"inputs in one dtype (under autocast, cast them first, e.g. weight.to({ref_name}.dtype))"
            )


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def autocast_off(device: torch.device):
    """Disable autocast for the device type of ``device`` (these ops compute in the dtype of the tensors
    they are given; see KERNELS.md)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False
