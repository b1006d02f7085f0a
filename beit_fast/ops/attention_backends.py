"""The non-Triton backends of :mod:`beit_fast.ops.attention`: "math" (the eager reference), "sdpa", "flex",
"xformers"; each ``(q, k, v, bias, scale) -> out``, called by the dispatch with autocast off."""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

# The efficient-attention kernel (SDPA EFFICIENT_ATTENTION == xformers cutlass) reads the bias with
# 128-bit loads: every stride but the last must be a multiple of 128 bits. 8 elements covers fp16/bf16
# (8 x 16 bits) and over-covers fp32 (4 x 32 bits). PyTorch's own check uses 8 for every dtype.
BIAS_ALIGNMENT = 8


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


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
