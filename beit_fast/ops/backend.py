"""One dispatch layer for every fused op: pick the Triton kernel or the plain PyTorch reference.

Backends
--------
``"auto"``       (default) Triton when every tensor argument is a CUDA tensor and Triton imports,
                 otherwise the PyTorch reference.
``"reference"``  always the plain PyTorch reference implementation.
``"triton"``     always the Triton kernels. On CUDA tensors this needs a working Triton; on CPU
                 tensors it works only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
                 the kernel modules are imported; the test suite does this), otherwise it raises.

How the backend is chosen, highest priority first: the ``backend=`` argument of an op call; the
innermost active ``use_backend(...)`` context; the last ``set_backend(...)``; the environment variable
``BEIT_FAST_BACKEND`` (read once, at import); ``"auto"``.

The setting is process-wide (a plain module global, not thread-local): torch.compile guards on it, so a
compiled function recompiles if the setting changes between calls.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

VALID_BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "BEIT_FAST_BACKEND"


def _validate(name) -> str:
    if not isinstance(name, str) or name not in VALID_BACKENDS:
        raise ValueError(
            f"unknown beit_fast backend {name!r}; valid backends are: {', '.join(map(repr, VALID_BACKENDS))}"
        )
    return name


def _from_env() -> str:
    value = os.environ.get(ENV_VAR)
    if value is None or value == "":
        return "auto"
    value = value.strip().lower()
    try:
        return _validate(value)
    except ValueError as e:
        raise ValueError(f"environment variable {ENV_VAR}: {e}") from None


_current: str = _from_env()


def get_backend() -> str:
    """The global backend name ("auto", "reference" or "triton")."""
    return _current


def set_backend(name: str) -> None:
    """Set the global backend for all fused ops (see module docstring)."""
    global _current
    _current = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside the block, restore the previous one after."""
    global _current
    previous = _current
    _current = _validate(name)
    try:
        yield
    finally:
        _current = previous


_TRITON_STATUS: tuple[bool, bool] | None = None  # (available, interpreting), computed once


def _triton_status() -> tuple[bool, bool]:
    # Computed once (the ops modules call this at import time) so that code traced by torch.compile
    # only reads a constant global.
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        try:
            import triton  # noqa: F401

            import beit_fast.kernels.attention  # noqa: F401
            import beit_fast.kernels.cross_entropy as _ce
            import beit_fast.kernels.patch_embed  # noqa: F401
            from beit_fast.kernels._common import is_interpreted

            _TRITON_STATUS = (True, is_interpreted(_ce._ce_rows_kernel))
        except Exception:
            _TRITON_STATUS = (False, False)
    return _TRITON_STATUS


def triton_available() -> bool:
    """True when Triton and the beit_fast kernel modules import."""
    return _triton_status()[0]


def triton_interpreting() -> bool:
    """True when the kernels were imported under Triton's interpreter (TRITON_INTERPRET=1)."""
    return _triton_status()[1]


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Resolve ``backend`` (None = global setting) to "triton" or "reference" for these tensors.

    Raises ValueError for an unknown name and RuntimeError when "triton" is requested where it cannot
    run.
    """
    name = _current if backend is None else _validate(backend)
    if name == "reference":
        return "reference"
    devices = {t.device.type for t in tensors if t is not None}
    if name == "auto":
        if devices == {"cuda"} and triton_available():
            return "triton"
        return "reference"
    # explicit "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' was requested but Triton (or the beit_fast kernels) cannot be imported")
    if devices - {"cuda"}:
        if devices == {"cpu"} and triton_interpreting():
            return "triton"
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got tensors on {sorted(devices)}); on CPU it runs only "
            "under Triton's interpreter (set TRITON_INTERPRET=1 before importing beit_fast). "
            "Use backend='auto' or 'reference' to fall back to PyTorch."
        )
    return "triton"

