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
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rel_pos import gather_relative_position_bias
from ._util import autocast_off, is_compiling
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

# The efficient-attention kernel (SDPA EFFICIENT_ATTENTION == xformers cutlass) reads the bias with
# 128-bit loads: every stride but the last must be a multiple of 128 bits. 8 elements covers fp16/bf16
# (8 x 16 bits) and over-covers fp32 (4 x 32 bits). PyTorch's own check uses 8 for every dtype.
BIAS_ALIGNMENT = 8

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


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------
_XFORMERS: tuple[object, str] | None = None  # (xformers.ops module or None, error text), probed once


def _xformers_ops():
    """``(xformers.ops, "")`` when xformers imports, else ``(None, reason)``; probed once per process."""
    global _XFORMERS
    if _XFORMERS is None:
        try:
            _XFORMERS = (importlib.import_module("xformers.ops"), "")
        except Exception as e:  # ImportError, or a broken install failing at import
            _XFORMERS = (None, f"xformers cannot be imported ({type(e).__name__}: {e})")
    return _XFORMERS


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


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
def _math_attention(q, k, v, bias, scale):
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        # Type promotion, not a cast to q's dtype: under autocast the eager model adds its fp32 table bias to
        # the bf16 scores and gets fp32 scores and an fp32 softmax; this op runs with autocast off and keeps
        # those numerics bit for bit (fp32 / fp64 inputs: nothing changes).
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    return attn.to(v.dtype) @ v  # what autocast's matmul does with fp32 probabilities and bf16 values


def _aligned_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The bias as the efficient-attention kernels want it: a ``[B, H, Nq, Nk]`` view in q's dtype whose
    strides (except the last, 1) are multiples of ``BIAS_ALIGNMENT`` elements.

    The bias (after broadcasting its key dim) is copied once into a buffer whose last dim is Nk rounded up
    to a multiple of 8 (197 -> 200), sliced back to Nk and *expanded* (stride 0, no copy) over the dims
    it broadcasts over (B for BEiT). Stride 0 is aligned, and it is the layout PyTorch itself gives the
    kernel (SDPA's ``preprocess_mask`` expands the mask); the kernel's backward writes the bias gradient
    into a freshly allocated ``[B, H, Nq, Nk]`` buffer regardless of the bias strides, and autograd's
    expand backward sums it over B. Materialising ``[B, H, Nq, Nk]`` instead would cost B copies of the
    bias in memory and bandwidth for nothing. Autograd runs through pad/slice/expand, so the gradient
    reaches ``bias`` in its own dtype. (SDPA would pad an unaligned mask itself, in its composite; doing it
    here makes the layout explicit, shared with xformers, which does not pad, and skips SDPA's check.)
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    b4 = _as_4d(bias).to(q.dtype)
    if b4.shape[-1] != nk:  # bias broadcast over keys: the last dim must be real memory
        b4 = b4.expand(*b4.shape[:-1], nk)
    pad = (-nk) % BIAS_ALIGNMENT
    if pad or b4.stride(-1) != 1 or any(b4.stride(d) % BIAS_ALIGNMENT for d in range(3) if b4.shape[d] > 1):
        b4 = F.pad(b4, (0, pad))[..., :nk]
    return b4.expand(b, h, nq, nk)


def _sdpa_attention(q, k, v, bias, scale):
    if q.device.type != "cuda":
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The kernel needs a unit last-dim stride on q, k, v (BEiT's views from the qkv projection have it).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None if bias is None else _aligned_bias(bias, q, k)
    if (
        mask is not None
        and torch.is_grad_enabled()
        and mask.requires_grad
        and not (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        # pytorch/pytorch#148476: SDPA skips the log-sum-exp when only the mask needs a gradient and the
        # efficient backward then reads a null pointer. Call the kernel op directly, asking for it.
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, False, scale=scale
        )[0]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# FlexAttention tiles per CUDA compute capability (``kernel_options``; prefixes fwd_/bwd_ select the pass).
# Hopper (sm_90): torch 2.11's default tiles for head dim 64 (bwd 64x128x128x64, 3 stages, 8 warps) need
# 245,760 bytes of shared memory, over the 232,448 (227 KiB) a block may have, and failed to compile on the
# H200 (2026-11-27). These are smaller: the forward tile torch uses on A100 for head dim 64, and the
# backward tile it uses on sm_100 for head dims <= 64, 2-3x under the limit (K/V tiles of 64 rows and
# Q/dO tiles of 32 rows, 3 pipeline stages). benchmarks/gpu_report.py (stage attention_flex) measures
# them against a ladder of smaller tiles; commit what it reports here. Other capabilities: torch's
# defaults (None).
_FLEX_HOPPER_TILES: dict[str, int] = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}
FLEX_KERNEL_OPTIONS: dict[tuple[int, int], dict[str, int]] = {(9, 0): _FLEX_HOPPER_TILES}


def flex_kernel_options(q: torch.Tensor) -> dict[str, int] | None:
    """The ``kernel_options`` the "flex" backend passes for queries ``q`` (None: torch's defaults).

    Only CUDA tensors with head dim <= 64 on a card listed in ``FLEX_KERNEL_OPTIONS`` get explicit tiles
    (BEiT's head dim is 64; larger head dims keep torch's heuristics)."""
    if q.device.type != "cuda" or q.shape[-1] > 64:
        return None
    opts = FLEX_KERNEL_OPTIONS.get(tuple(torch.cuda.get_device_capability(q.device)))
    return dict(opts) if opts else None


_FLEX_COMPILED: Callable | None = None


def _compiled_flex() -> Callable:
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


def _bias_score_mod(bias: torch.Tensor) -> Callable:
    """score_mod adding ``bias`` (broadcastable to [B, H, Nq, Nk]) in fp32; broadcast dims are indexed
    out up front so the captured tensor is the bias itself (no expand), whose gradient flex computes."""
    b4 = _as_4d(bias).to(torch.float32)
    use_b, use_h, use_q, use_k = (b4.shape[d] != 1 for d in range(4))
    t = b4
    for d in (3, 2, 1, 0):
        if t.shape[d] == 1:
            t = t.select(d, 0)

    def score_mod(score, b, h, q_idx, kv_idx):
        idx = []
        if use_b:
            idx.append(b)
        if use_h:
            idx.append(h)
        if use_q:
            idx.append(q_idx)
        if use_k:
            idx.append(kv_idx)
        return score + (t[tuple(idx)] if idx else t)

    return score_mod


def _flex_attention(q, k, v, bias, scale, *, compiled: bool = True):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and not torch.compiler.is_compiling():
        fn = _compiled_flex()  # one compiled function per process; new score_mod closures do not recompile
    else:
        fn = flex_attention  # inside an outer torch.compile region flex_attention is captured directly
    score_mod = None if bias is None else _bias_score_mod(bias)
    options = flex_kernel_options(q)
    if options is None:
        return fn(q, k, v, score_mod=score_mod, scale=scale)
    return fn(q, k, v, score_mod=score_mod, scale=scale, kernel_options=options)


def _xformers_attention(q, k, v, bias, scale):
    ops, why = _xformers_ops()
    if ops is None:
        raise RuntimeError(f"attention backend 'xformers' is unavailable: {why}")
    attn_bias = None if bias is None else _aligned_bias(bias, q, k)
    out = ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias, scale=scale
    )
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# The Triton backend: two custom ops (forward, backward) around beit_fast/kernels/attention.py
# --------------------------------------------------------------------------------------------------
def _table_plan(table: Tensor, index: Tensor):
    """(table^T [H, T] fp32 contiguous, compact index, compact index^T, position list) for the kernels."""
    from beit_fast.kernels.attention import index_plan

    compact, compact_t, positions = index_plan(index, table.shape[0])
    return table.t().to(torch.float32).contiguous(), compact, compact_t, positions


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("beit_fast::attention_forward", mutates_args=())
def _triton_forward_op(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], table: Optional[Tensor], index: Optional[Tensor],
    scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] stored [B, Nq, H, Dv]-major, lse [B, H, Nq] fp32): the bias is ``bias``
    (broadcastable to [B, H, Nq, Nk]), or ``table[index]`` (table [T, H], index [Nq, Nk]), or none."""
    from beit_fast.kernels import attention as kernels

    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    table_t = compact = None
    if table is not None:
        table_t, compact, _, _ = _table_plan(table, index)
    with autocast_off(q.device):
        return kernels.attention_forward(q, k, v, None if bias is None else _as_4d(bias), table_t, compact,
                                         scale, deterministic)


@_triton_forward_op.register_fake
def _(q, k, v, bias, table, index, scale, deterministic):
    from beit_fast.kernels.attention import out_strides

    b, h, nq, _ = q.shape
    dv = v.shape[-1]
    out = q.new_empty_strided((b, h, nq, dv), out_strides(b, h, nq, dv))
    return out, q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("beit_fast::attention_backward", mutates_args=())
def _triton_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    table: Optional[Tensor], index: Optional[Tensor], scale: float, bias_grad: bool, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias): dbias is the table's gradient [T, H] (table given), the dense bias's gradient in
    its shape and dtype (bias given), or an empty tensor (no bias, or ``bias_grad`` False)."""
    from beit_fast.kernels import attention as kernels

    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    table_t = compact = compact_t = positions = bias4 = None
    if table is not None:
        table_t, compact, compact_t, positions = _table_plan(table, index)
    if bias is not None:
        bias4 = _as_4d(bias)
    with autocast_off(q.device):
        dq, dk, dv, db = kernels.attention_backward(
            dout, q, k, v, out, lse, bias4, table_t, compact, compact_t, positions, scale, bias_grad,
            bias_batched=bias4 is not None and bias4.shape[0] > 1, deterministic=deterministic,
        )
        if db is None:
            db = q.new_empty((0,))
        elif table is not None:
            db = db.to(table.dtype)
        else:  # per-group partial sums [G, H, Nq, Nk] -> the bias's own (broadcast) shape
            if bias4.shape[0] == 1:
                db = db.sum(0, keepdim=True)
            db = db.sum_to_size(bias4.shape).reshape(bias.shape).to(bias.dtype).contiguous()
    return dq, dk, dv, db


@_triton_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, table, index, scale, bias_grad, deterministic):
    if bias_grad and table is not None:
        db = table.new_empty(table.shape)
    elif bias_grad and bias is not None:
        db = bias.new_empty(bias.shape)
    else:
        db = q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _triton_setup_context(ctx, inputs, output):
    q, k, v, bias, table, index, scale, deterministic = inputs
    out, lse = output
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, bias, table, index)


def _triton_backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, table, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias_grad = (bias is not None and need[3]) or (table is not None and need[4])
    dq, dk, dv, db = torch.ops.beit_fast.attention_backward(
        dout, q, k, v, out, lse, bias, table, index, ctx.scale, bias_grad, ctx.deterministic
    )
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        db if bias is not None and need[3] else None,
        db if table is not None and need[4] else None,
        None, None, None,
    )


_triton_forward_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _triton_attention(q, k, v, bias, scale, table=None, index=None):
    out, _ = torch.ops.beit_fast.attention_forward(
        q, k, v, bias, table, index, float(scale), torch.are_deterministic_algorithms_enabled()
    )
    return out


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
