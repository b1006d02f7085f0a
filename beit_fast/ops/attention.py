"""Attention with an additive bias (BEiT's relative position bias), behind several backends.

``attention_with_bias(q, k, v, bias, scale=None, backend="auto")`` computes exactly

    softmax(q @ k^T * scale + bias) @ v            (scale defaults to Dh ** -0.5)

for ``q [B, H, Nq, Dh]``, ``k [B, H, Nk, Dh]``, ``v [B, H, Nk, Dv]`` and a ``bias`` broadcastable to
``[B, H, Nq, Nk]`` (BEiT: the output of ``RelativePositionBias.forward()``, ``[H, N, N]``, shared by the
batch) or ``None``. Gradients flow to q, k, v and to the bias (hence to the relative position bias
table) on every backend.

Dtypes: q, k and v share one floating dtype and the op computes in it (autocast is switched off
inside the op, as for the other fused ops). The bias may have any floating dtype: it is cast to the
query's dtype (its gradient is cast back by autograd), except on ``"math"`` (type promotion, see below)
and on ``"flex"`` where it is used in fp32 because FlexAttention computes scores in fp32 and accumulates
the bias gradient with atomics.

Backends
--------
``"math"``      The eager reference, op for op what the model computed in eager PyTorch: ``(q * scale) @ k^T``
                in the input dtype, ``+ bias`` with PyTorch's type promotion (the model's fp32 table keeps
                the scores in fp32 under bf16/fp16 autocast, as eager autocast code does), softmax, the
                probabilities cast to v's dtype, ``@ v``. The model's ``Attention`` calls this op: there
                is no other copy of the math. ("reference" is a deprecated alias where a model or a CLI
                takes a backend name: ``canonical_attention_backend``.)
``"sdpa"``      ``torch.nn.functional.scaled_dot_product_attention`` with the bias as ``attn_mask``.
                On CUDA it is restricted (``sdpa_kernel``) to ``EFFICIENT_ATTENTION``, the one SDPA
                kernel that takes an additive bias *and* returns its gradient (flash takes no bias,
                cuDNN returns no bias gradient). That kernel wants the bias in the query's dtype with
                every stride but the last a multiple of 8 elements: see ``_aligned_bias``. On other
                devices (CPU) plain SDPA (math or flash-cpu kernel) with the bias cast to q's dtype.
``"flex"``      ``torch.nn.attention.flex_attention`` with ``score + bias[h, q_idx, kv_idx]`` as the
                score_mod, compiled once per process (``torch.compile(flex_attention)``); CUDA only
                (FlexAttention's backward does not run on CPU) and head dims >= 16. The bias gradient
                is accumulated with atomics (scatter-add): not bitwise deterministic. On cards listed
                in ``FLEX_KERNEL_OPTIONS`` (Hopper) it passes those tiles as ``kernel_options``: the
                defaults of torch 2.11 overflow Hopper's shared memory (see ``flex_kernel_options``).
``"xformers"``  ``xformers.ops.memory_efficient_attention`` (inputs as ``[B, N, H, Dh]``, the bias as an
                aligned ``[B, H, Nq, Nk]`` tensor); CUDA only, when xformers imports.
``"triton"``    our fused kernel (``beit_fast/kernels/attention.py``, KERNELS.md section 3): flash-style
                forward and backward, fp16/bf16/fp32 with fp32 accumulation, head dims <= 128, any bias
                broadcastable to [B, H, Nq, Nk] read with its own strides, and with
                ``attention_with_rel_pos_bias`` BEiT's table + index gathered inside the kernel. The bias
                gradient is summed over the batch without a [B, H, N, N] tensor and without atomics
                (bitwise repeatable; under ``torch.use_deterministic_algorithms(True)`` with fixed launch
                configurations instead of the autotuner's choice).
                CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1, the test suite).
                Registered as ``torch.library`` custom ops (``beit_fast::attention_forward`` /
                ``_backward``), so ``torch.compile(fullgraph=True)`` traces through it.
``"auto"``      The first backend of ``AUTO_PRIORITY[device type]`` that supports the inputs.

An unknown name raises ValueError; a known backend that cannot run on the given tensors raises
RuntimeError saying why.

``attention_with_rel_pos_bias(q, k, v, table, index, scale=None, backend="auto")`` is the same op with the
bias given as BEiT's relative position bias table ``[T, H]`` and index ``int[Nq, Nk]``
(bias[h, i, j] = table[index[i, j], h]): the "triton" backend gathers it inside the kernel and returns the
table's gradient directly; every other backend gathers it with ``gather_relative_position_bias`` and calls
``attention_with_bias``.

This module is the dispatch (names, availability, input checks, the public ops); the backends live in
:mod:`beit_fast.ops.attention_backends` ("math", "sdpa", "flex", "xformers") and
:mod:`beit_fast.ops.attention_triton` ("triton": the custom ops around the kernels).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from .rel_pos import gather_relative_position_bias
from ._util import autocast_off, is_compiling
from .attention_backends import (
    FLEX_KERNEL_OPTIONS,
    _flex_attention,
    _math_attention,
    _sdpa_attention,
    _xformers_attention,
    _xformers_ops,
    flex_kernel_options,
)
from .attention_triton import _triton_attention
from .backend import triton_available, triton_interpreting

__all__ = [
    "ATTENTION_BACKENDS",
    "AUTO_PRIORITY",
    "FLEX_KERNEL_OPTIONS",
    "AUTO_PRIORITY_MEASUREMENTS",
    "attention_with_bias",
    "attention_with_rel_pos_bias",
    "attention_reference",
    "available_attention_backends",
    "canonical_attention_backend",
    "flex_kernel_options",
    "resolve_attention_backend",
]

ATTENTION_BACKENDS: tuple[str, ...] = ("math", "sdpa", "flex", "xformers", "triton")
_VALID_NAMES: tuple[str, ...] = ("auto",) + ATTENTION_BACKENDS
# Old names still accepted where a model or a CLI takes a backend name (the model once called the eager math
# "reference"; the ops layer always called it "math"). The functional ops take the canonical names only.
DEPRECATED_ALIASES: dict[str, str] = {"reference": "math"}

# The order in which backend="auto" tries the backends, per device type (other device types: "math").
# CUDA, from benchmarks/bench_attention.py on an NVIDIA H200 (2026-11-27, torch 2.11, bf16, forward +
# backward incl. the bias gradient; benchmarks/results/LATEST.md): SDPA's efficient kernel beats the
# math path; xformers was not installed there (kept second: it is the same cutlass kernel); FlexAttention
# failed to compile with torch 2.11's default tiles ("out of resource: shared memory, Required 245760,
# limit 232448"), so it comes after math and is only used when asked for by name. "triton" (our kernel)
# has not been measured on a GPU yet: it sits after sdpa and xformers until benchmarks/bench_attention.py
# says otherwise (move it first only with those numbers recorded below).
AUTO_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("sdpa", "xformers", "triton", "math", "flex"),
    "cpu": ("sdpa", "math"),
}
AUTO_PRIORITY_MEASUREMENTS: dict[str, object] = {
    "card": "NVIDIA H200", "date": "2026-11-27", "torch": "2.11.0+cu130", "dtype": "bfloat16",
    "ms_fwd_bwd": {
        "B256 H12 N197 Dh64": {"sdpa": 2.82, "math": 3.64, "flex": "compile failed (shared memory)"},
        "B64 H12 N197 Dh64": {"sdpa": 1.11, "math": 1.18, "flex": "compile failed (shared memory)"},
    },
}

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # efficient / xformers / flex / triton
_MAX_TRITON_HEAD_DIM = 128  # = beit_fast.kernels.attention.MAX_HEAD_DIM (not imported: Triton is optional)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, bias) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, Dh], got shape {tuple(t.shape)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32, float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor (additive bias), got dtype {bias.dtype}")
    devices = {t.device for t in (q, k, v, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and bias must be on one device, got {sorted(map(str, devices))}")
    b, h, nq, dh = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != dh:
        raise ValueError(
            f"k must be [B, H, Nk, Dh] = [{b}, {h}, Nk, {dh}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[0] != b or v.shape[1] != h or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must be [B, H, Nk, Dv] = [{b}, {h}, {k.shape[2]}, Dv] to match q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if bias is not None:
        target = (b, h, nq, k.shape[2])
        ok = 2 <= bias.dim() <= 4 and all(
            s in (1, t) for s, t in zip(reversed(tuple(bias.shape)), reversed(target))
        )
        if not ok:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} is not broadcastable to [B, H, Nq, Nk] = {list(target)} "
                "(expected e.g. [H, Nq, Nk] from RelativePositionBias, or [B, H, Nq, Nk])"
            )


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------
def _unavailable_reason(name: str, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on these inputs, or None when it can."""
    dev = q.device.type
    if name == "math":
        return None
    if name == "sdpa":
        if dev != "cuda":
            return None
        if q.dtype not in _KERNEL_DTYPES:
            return f"SDPA's efficient-attention kernel supports float16/bfloat16/float32 on CUDA, got {q.dtype}"
        align = 8 if q.dtype in _LOW_PRECISION else 4
        if q.shape[-1] % align or v.shape[-1] % align:
            return (
                f"SDPA's efficient-attention kernel needs head dims divisible by {align} for {q.dtype}, "
                f"got Dqk={q.shape[-1]}, Dv={v.shape[-1]}"
            )
        return None
    if name == "flex":
        if dev != "cuda":
            return (
                f"the 'flex' backend needs CUDA tensors (got {dev}): FlexAttention's backward does not run "
                "on CPU"
            )
        if q.dtype not in _KERNEL_DTYPES:
            return f"the 'flex' backend supports float16/bfloat16/float32, got {q.dtype}"
        if q.shape[-1] < 16 or v.shape[-1] < 16:  # inductor's flex lowering: tl.dot needs K >= 16
            return f"FlexAttention on CUDA needs head dims >= 16, got Dqk={q.shape[-1]}, Dv={v.shape[-1]}"
        return None
    if name == "xformers":
        if dev != "cuda":
            return f"the 'xformers' backend needs CUDA tensors (got {dev})"
        ops, why = _xformers_ops()
        if ops is None:
            return why
        if q.dtype not in _KERNEL_DTYPES:
            return f"xformers' memory-efficient attention supports float16/bfloat16/float32, got {q.dtype}"
        return None
    if name == "triton":
        if dev == "cuda":
            if not triton_available():
                return "Triton (or the beit_fast kernels) cannot be imported"
        elif not (dev == "cpu" and triton_interpreting()):
            return (
                f"the 'triton' backend needs CUDA tensors (got {dev}); on CPU it runs only under Triton's "
                "interpreter (TRITON_INTERPRET=1 set before importing beit_fast)"
            )
        if q.dtype not in _KERNEL_DTYPES:
            return f"the 'triton' backend supports float16/bfloat16/float32, got {q.dtype}"
        if max(q.shape[-1], v.shape[-1]) > _MAX_TRITON_HEAD_DIM:
            return (f"the 'triton' backend supports head dims up to {_MAX_TRITON_HEAD_DIM}, "
                    f"got Dqk={q.shape[-1]}, Dv={v.shape[-1]}")
        return None
    raise AssertionError(name)  # pragma: no cover - names are validated before


def canonical_attention_backend(name, stacklevel: int = 2) -> str:
    """``name`` as an ``attention_with_bias`` backend name: one of "auto", "math", "sdpa", "flex", "xformers",
    "triton"; the deprecated alias "reference" gives "math" (with a DeprecationWarning). ValueError for
    anything else, listing the valid names. For models and CLIs; the functional ops take canonical names.
    ``stacklevel``: where the warning points, 1 = the caller of this function, 2 = its caller (default)."""
    if isinstance(name, str) and name in DEPRECATED_ALIASES:
        new = DEPRECATED_ALIASES[name]
        warnings.warn(f"attention backend {name!r} is a deprecated alias of {new!r}", DeprecationWarning,
                      stacklevel=stacklevel + 1)
        return new
    if not isinstance(name, str) or name not in _VALID_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(map(repr, _VALID_NAMES))} "
                         f"(deprecated alias: {', '.join(map(repr, DEPRECATED_ALIASES))})")
    return name


def available_attention_backends(device) -> list[str]:
    """Backends that can run on ``device`` (a torch.device or string), in ``ATTENTION_BACKENDS`` order.

    Device-level only: a backend listed here may still reject a particular dtype or head dim (e.g.
    float64 on the CUDA kernels); ``resolve_attention_backend`` checks that. For a CUDA device on a
    machine without CUDA the list is empty. "triton" is listed for CUDA only (on CPU it runs under
    Triton's interpreter, a testing tool, when asked for by name).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return []
        names = ["math", "sdpa", "flex"]
        if _xformers_ops()[0] is not None:
            names.append("xformers")
        if triton_available():
            names.append("triton")
        return names
    return ["math", "sdpa"]


def resolve_attention_backend(backend: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """The concrete backend that ``attention_with_bias(..., backend=backend)`` uses for these inputs.

    Raises ValueError for an unknown name and RuntimeError when the named backend cannot run here.
    """
    if not isinstance(backend, str) or backend not in _VALID_NAMES:
        raise ValueError(
            f"unknown attention backend {backend!r}; valid: {', '.join(map(repr, _VALID_NAMES))}"
        )
    v = q if v is None else v
    if backend == "auto":
        for name in AUTO_PRIORITY.get(q.device.type, ("math",)):
            if _unavailable_reason(name, q, v) is None:
                return name
        return "math"
    why = _unavailable_reason(backend, q, v)
    if why is not None:
        raise RuntimeError(f"attention backend {backend!r} is unavailable: {why}")
    return backend


# The backends' implementations: attention_backends.py ("math", "sdpa", "flex", "xformers") and
# attention_triton.py ("triton", custom ops around the kernels).
_IMPLS: dict[str, Callable] = {
    "math": _math_attention,
    "sdpa": _sdpa_attention,
    "flex": _flex_attention,
    "xformers": _xformers_attention,
    "triton": _triton_attention,
}


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def attention_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q @ k^T * scale + bias) @ v`` -> ``[B, H, Nq, Dv]`` (see the module docstring).

    q ``[B, H, Nq, Dh]``, k ``[B, H, Nk, Dh]``, v ``[B, H, Nk, Dv]`` (one floating dtype); bias
    broadcastable to ``[B, H, Nq, Nk]`` (BEiT: ``[H, N, N]``) or None; scale defaults to ``Dh ** -0.5``;
    backend one of "auto", "math", "sdpa", "flex", "xformers", "triton".
    """
    _check_inputs(q, k, v, bias)
    name = resolve_attention_backend(backend, q, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    with autocast_off(q.device):
        return _IMPLS[name](q, k, v, bias, scale)


def _check_table_index(q: Tensor, k: Tensor, table, index) -> None:
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    h, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    if table.dim() != 2 or table.shape[1] != h:
        raise ValueError(
            f"table must be [T, H] with H = {h} heads (q {tuple(q.shape)}), got shape {tuple(table.shape)}"
        )
    if not table.is_floating_point():
        raise TypeError(f"table must be a floating-point tensor, got dtype {table.dtype}")
    if index.dtype not in (torch.int16, torch.int32, torch.int64):
        raise TypeError(f"index must be an int16/int32/int64 tensor, got dtype {index.dtype}")
    if tuple(index.shape) != (nq, nk):
        raise ValueError(f"index must be [Nq, Nk] = [{nq}, {nk}] to match q and k, got shape {tuple(index.shape)}")
    devices = {t.device for t in (q, table, index)}
    if len(devices) > 1:
        raise ValueError(f"q, table and index must be on one device, got {sorted(map(str, devices))}")
    if index.device.type == "cpu" and index.numel() and not is_compiling():  # no device sync on CPU
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(
                f"index values must be in [0, {table.shape[0]}) (the table has {table.shape[0]} rows); "
                f"found values in [{lo}, {hi}]"
            )


def attention_with_rel_pos_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q @ k^T * scale + bias) @ v`` with BEiT's relative position bias
    ``bias[h, i, j] = table[index[i, j], h]`` -> ``[B, H, Nq, Dv]``.

    q, k, v as for ``attention_with_bias``; table ``[T, H]`` floating (e.g. the fp32
    ``relative_position_bias_table``; for the official "own + shared" sum pass ``own + shared``, the
    gradient reaches both through autograd); index ``int16/int32/int64 [Nq, Nk]`` with values in [0, T)
    (``relative_position_index``). Gradients flow to q, k, v and the table.

    "triton" gathers the bias inside its kernels (no [H, Nq, Nk] tensor, the table gradient formed
    without atomics); every other backend gathers it with ``gather_relative_position_bias`` and calls
    ``attention_with_bias``. Index values are checked on CPU (ValueError); on CUDA the "triton" path checks
    each new index tensor once (one synchronisation), the others index the table as PyTorch does.
    """
    _check_inputs(q, k, v, None)
    _check_table_index(q, k, table, index)
    name = resolve_attention_backend(backend, q, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if name == "triton":
        with autocast_off(q.device):
            return _triton_attention(q, k, v, None, scale, table, index)
    bias = gather_relative_position_bias(table, index if index.dtype == torch.int64 else index.long())
    return attention_with_bias(q, k, v, bias, scale, backend=name)


def attention_reference(q, k, v, bias=None, scale=None) -> torch.Tensor:
    """The "math" backend: the eager reference (scores in the input dtype, the bias added with type
    promotion, see the module docstring)."""
    return attention_with_bias(q, k, v, bias, scale, backend="math")
