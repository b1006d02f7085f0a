"""Flash-style attention with BEiT's relative position bias (Triton), forward and backward.

    out = softmax(q @ k^T * scale + bias) @ v        q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]

The [Nq, Nk] scores never reach HBM. The bias is one of
  * none;
  * dense: a tensor broadcastable to [B, H, Nq, Nk] (BEiT: [H, N, N], shared by the batch), read with its
    own strides (stride 0 over broadcast dims, no copy);
  * table: BEiT's relative position bias table [T, H] and its int index [Nq, Nk], gathered *inside* the
    kernels (bias[h, i, j] = table[index[i, j], h]): no [H, N, N] bias is ever formed.

Kernels (see KERNELS.md, section 3, for the reasoning behind the tiles):
  ``_attn_fwd_kernel``   one program per (b, h, block of BLOCK_M queries): online softmax over key
                         blocks in fp32 (exp2 domain), writes out and the row log-sum-exp (log2 units).
  ``_attn_bwd_dq_kernel`` one program per (h, block of queries, group of batch elements): for each
                         batch element of its group, in order, it computes delta = rowsum(dO * O) (stored
                         for the next kernel), recomputes P from q, k and the log-sum-exp, dP = dO @ v^T,
                         dS = P * (dP - delta), dq = scale * dS @ k, and adds dS (fp32) into its own slab
                         partial[g, h, its rows, :] (the group's first element writes, the others
                         read-modify-write; the slab stays in L2). Result: partial[g] = sum over the batch
                         elements b of group g of dS[b] (no [B, H, N, N] tensor).
  ``_attn_bwd_dkdv_kernel`` one program per (b, h, block of keys): recomputes P^T, dv = P^T @ dO,
                         dk = scale * dS^T @ q over all query blocks (the table path reads index^T).
  ``_table_grad_kernel`` one program per block of table rows t: dtable[t, :] = sum over groups and over
                         the positions (i, j) with index[i, j] == t of partial[g, :, i, j] (a precomputed
                         position list, fixed order). A dense bias instead gets partial.sum(0) reduced to
                         its broadcast shape by the caller.
No kernel uses atomics and every reduction has a fixed order (a program owns every element it writes):
results are bitwise repeatable for a given launch configuration. The autotuner's choice may differ between
processes; ``deterministic=True`` (or ``AUTOTUNE = False``) uses fixed configurations, and the batch
grouping depends on shapes and the SM count only, never on the configuration. Under the interpreter each
kernel runs one fixed configuration (no autotuner object).

Dtypes: q, k, v in fp16 / bf16 / fp32; products accumulate in fp32, softmax statistics are fp32, P and dS
are rounded to the input dtype before their tensor-core products (as FlashAttention does), the bias
gradient is accumulated in fp32 from the unrounded dS.

Files: ``attention_forward.py`` (the forward kernel and the in-kernel helpers), ``attention_backward.py``
(the three backward kernels), ``attention_plan.py`` (``index_plan``); this module holds the configurations,
the launch-argument builders and the launchers (``attention_forward`` / ``attention_backward``), and every
name it held before the split stays importable from it.
"""
from __future__ import annotations

import functools

import torch
import triton

from ._common import dot_input_precision, is_interpreted, multiprocessor_count, next_pow2
from .attention_backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _table_grad_kernel
from .attention_forward import BIAS_DENSE, BIAS_NONE, BIAS_TABLE, _attn_fwd_kernel

MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
# GPU: autotuned per (Nq, Nk, head dims, bias mode, dtype) among the entries valid for the card's
# architecture family ("archs": 80 = sm_8x, 90 = sm_9x; other cards use the sm_80 entries). Every entry
# is compiled by tests/test_kernel_compile.py for its families (shared memory within the card, tensor-core
# instructions, no register spills; an entry that spilled on sm_80 is marked 90 only). Reasoning (KERNELS.md
# section 3): at N = 197 a 64- or 128-row query tile and 16-128-key blocks keep the padding waste at
# 1.05-1.3x per dimension; Triton puts all warps of a chained dot along M, so 4 warps per 64 rows (one
# Hopper warpgroup, wgmma m64) and 8 per 128.
GPU_FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, archs=(90,)),
    # less padding at N = 197: keys in blocks of 32 (224 computed columns instead of 256), a deeper pipeline
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, archs=(80, 90)),
    # 32-row query tiles (224 computed rows instead of 256): too short for wgmma (m64 per warpgroup), so
    # mma.sync; the autotuner weighs the padding saved against the slower instruction
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, archs=(80, 90)),
]
GPU_DQ_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, archs=(90,)),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=1, archs=(90,)),
    dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=1, archs=(80,)),
    # pipelined: the next key/value block is loaded while this one is multiplied (64x32 tiles need 8 warps
    # then: with 4 they spill registers)
    dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=3, archs=(80, 90)),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, archs=(80, 90)),
    dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=2, archs=(80, 90)),
    # 32-row query tiles (less padding at N = 197; mma.sync, see the forward's)
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, archs=(80, 90)),
]
# dk/dv: BLOCK_N keys per program (rows of the transposed scores), BLOCK_M queries per step.
GPU_DKDV_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2, archs=(80, 90)),
    dict(BLOCK_N=128, BLOCK_M=32, num_warps=8, num_stages=2, archs=(80, 90)),
    dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, archs=(90,)),
    # queries in steps of 16 (208 computed query columns at N = 197 instead of 224 / 256), deeper pipeline
    dict(BLOCK_N=64, BLOCK_M=16, num_warps=4, num_stages=3, archs=(80, 90)),
    # 32-key programs (224 computed key rows instead of 256; mma.sync)
    dict(BLOCK_N=32, BLOCK_M=32, num_warps=2, num_stages=2, archs=(80, 90)),
]
# Table gradient: BLOCK_T table rows per program, BLOCK_C positions per step. BEiT-B's table has T = 732 rows
# (2,212 at 384 px): 16 rows a program is 46 programs, a third of an H100's 132 SMs; 8, 4 and 2 rows a program
# spread the same reads over 92, 183 and 366 programs (the sums per row keep their order within a program).
GPU_TABLE_GRAD_CONFIGS = [
    dict(BLOCK_T=16, BLOCK_C=16, num_warps=4, num_stages=1, archs=(80, 90)),
    dict(BLOCK_T=8, BLOCK_C=32, num_warps=4, num_stages=1, archs=(80, 90)),
    dict(BLOCK_T=4, BLOCK_C=32, num_warps=4, num_stages=1, archs=(80, 90)),
    dict(BLOCK_T=2, BLOCK_C=64, num_warps=4, num_stages=1, archs=(90,)),  # spills 8 bytes on sm_80
    dict(BLOCK_T=4, BLOCK_C=64, num_warps=8, num_stages=1, archs=(80, 90)),
]
# deterministic=True (or AUTOTUNE = False): one fixed configuration per kernel (no timing-dependent
# choice): the first entry of each list above (valid on both families), with one pipeline stage for the
# forward so that fp32 inputs with head dim 128 fit an A100's shared memory too.
AUTOTUNE = True
DETERMINISTIC_FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
DETERMINISTIC_DQ = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)
DETERMINISTIC_DKDV = dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2)
DETERMINISTIC_TABLE_GRAD = dict(BLOCK_T=16, BLOCK_C=16, num_warps=4, num_stages=1)
# Interpreter (CPU tests): one configuration per kernel. Python overhead is per program and per block
# step, so blocks are large (BEiT's N = 197 still spans 4 of them; tests that want several blocks at
# small N patch these).
INTERP_FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
INTERP_DQ = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
INTERP_DKDV = dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=1)
INTERP_TABLE_GRAD = dict(BLOCK_T=256, BLOCK_C=64, num_warps=4, num_stages=1)
# Programs the dq kernel aims for (it picks its number of batch groups from this): several per SM, so
# that its long programs (a whole batch group each) balance across the SMs.
GPU_DQ_PROGRAMS_PER_SM = 8
INTERP_DQ_PROGRAMS = 8
# Batch elements per group of the dq kernel; None: derived from the programs target above.
BATCH_PER_GROUP: int | None = None

_TUNE_KEY = ["N_Q", "N_K", "HEAD_D", "HEAD_DV", "BIAS_MODE"]


def arch_family(capability_major: int) -> int:
    """90 for sm_9x (Hopper: wgmma), else 80 (the configurations checked for sm_80)."""
    return 90 if capability_major == 9 else 80


@functools.lru_cache(maxsize=None)
def _device_family(device_index: int) -> int:
    return arch_family(torch.cuda.get_device_capability(device_index)[0])


def configs_for(dicts, family: int) -> list[dict]:
    """The entries of a configuration list valid for an architecture family, without their "archs" tag."""
    return [{k: v for k, v in d.items() if k != "archs"} for d in dicts if family in d["archs"]]


def _autotuned(kernel, dicts, key, device_arg: str = "Q"):
    configs, archs = [], {}
    for d in dicts:
        d = dict(d)
        nw, ns, fam = d.pop("num_warps"), d.pop("num_stages"), d.pop("archs")
        c = triton.Config(d, num_warps=nw, num_stages=ns)
        archs[id(c)] = fam
        configs.append(c)

    def prune(configs, named_args, **kwargs):
        dev = named_args[device_arg].device
        fam = _device_family(dev.index if dev.index is not None else torch.cuda.current_device())
        return [c for c in configs if fam in archs[id(c)]]

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_INTERPRETED = is_interpreted(_attn_fwd_kernel)
if _INTERPRETED:  # one configuration under the interpreter: no autotuner object at all
    _FWD_TUNED = _DQ_TUNED = _DKDV_TUNED = _TG_TUNED = None
else:
    _FWD_TUNED = _autotuned(_attn_fwd_kernel, GPU_FWD_CONFIGS, _TUNE_KEY)
    _DQ_TUNED = _autotuned(_attn_bwd_dq_kernel, GPU_DQ_CONFIGS, _TUNE_KEY + ["BIAS_GRAD"])
    _DKDV_TUNED = _autotuned(_attn_bwd_dkdv_kernel, GPU_DKDV_CONFIGS, _TUNE_KEY)
    _TG_TUNED = _autotuned(_table_grad_kernel, GPU_TABLE_GRAD_CONFIGS, ["G", "H", "T", "MAXC"], device_arg="PART")


# --------------------------------------------------------------------------------------------------
# Launch-argument builders (shared by the launchers and the ahead-of-time compile check, which calls
# them on meta tensors with one configuration)
# --------------------------------------------------------------------------------------------------
def _dims(q, v):
    hd, hdv = q.shape[-1], v.shape[-1]
    return dict(HEAD_D=hd, HEAD_DV=hdv, BLOCK_D=max(16, next_pow2(hd)), BLOCK_DV=max(16, next_pow2(hdv)))


def _numerics(dtype, interpret):
    return dict(DOT_UPCAST=bool(interpret), DOT_PREC="ieee" if interpret else dot_input_precision(dtype),
                FIX_BF16=bool(interpret) and dtype == torch.bfloat16)


def _bias_args(bias4, table_t, index, dummy, shape, transposed=False):
    """(mode, bias, table, index, strides (b, h, query, key), T). A dense bias is read through its view
    expanded to ``shape`` [B, H, Nq, Nk] (stride 0 over broadcast dims). For a table, the "bias strides"
    are the index's: (0, 0, row stride, 1), or for the transposed index (keys as rows) (0, 0, 1, row stride)."""
    if bias4 is not None:
        return BIAS_DENSE, bias4, dummy, dummy, tuple(bias4.expand(shape).stride()), 0
    if table_t is not None:
        strides = (0, 0, 1, index.stride(0)) if transposed else (0, 0, index.stride(0), 1)
        return BIAS_TABLE, dummy, table_t, index, strides, table_t.shape[1]
    return BIAS_NONE, dummy, dummy, dummy, (0, 0, 0, 0), 0


def fwd_launch(q, k, v, o, lse, bias4, table_t, index, scale, interpret, cfg=None):
    """``(kernel, grid, args, constexprs, opts)``; cfg None: the autotuned kernel (GPU) or the interpreter
    configuration."""
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index, q, (B, H, NQ, NK))
    args = [q, k, v, o, lse, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            *sb, T, H, NQ, NK]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, **_numerics(q.dtype, interpret))
    return _spec(_attn_fwd_kernel, _FWD_TUNED, lambda m: (B * H, triton.cdiv(NQ, m["BLOCK_M"])),
                 args, constexprs, INTERP_FWD if interpret else cfg)


def batch_groups(B: int, H: int, NQ: int, interpret: bool, num_sms: int | None = None, device=None) -> tuple[int, int]:
    """(number of groups G, batch elements per group) of the dq kernel: enough programs to fill the GPU
    (counted with a nominal 64-row query block, so the grouping, and with it the summation order of the
    bias gradient, does not depend on the autotuner's choice)."""
    if BATCH_PER_GROUP is not None:
        per = max(1, min(B, int(BATCH_PER_GROUP)))
    else:
        if interpret:
            target = INTERP_DQ_PROGRAMS
        else:
            if num_sms is None:
                num_sms = multiprocessor_count(device)
            target = GPU_DQ_PROGRAMS_PER_SM * num_sms
        groups = max(1, min(B, triton.cdiv(target, H * triton.cdiv(NQ, 64))))
        per = triton.cdiv(B, groups)
    return triton.cdiv(B, per), per


def dq_launch(q, k, v, o, do, lse, delta, dq, part, bias4, table_t, index, scale, groups, per_group,
              bias_grad, interpret, cfg=None):
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index, q, (B, H, NQ, NK))
    args = [q, k, v, o, do, lse, delta, dq, part if part is not None else lse, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            *sb, T, B, H, NQ, NK, per_group]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, BIAS_GRAD=bool(bias_grad), **_numerics(q.dtype, interpret))
    return _spec(_attn_bwd_dq_kernel, _DQ_TUNED, lambda m: (H, triton.cdiv(NQ, m["BLOCK_M"]), groups),
                 args, constexprs, INTERP_DQ if interpret else cfg)


def dkdv_launch(q, k, v, do, lse, delta, dk, dv, bias4, table_t, index_t, scale, interpret, cfg=None):
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    mode, bias, table, idx, sb, T = _bias_args(bias4, table_t, index_t, q, (B, H, NQ, NK), transposed=True)
    args = [q, k, v, do, lse, delta, dk, dv, bias, table, idx, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            *sb, T, H, NQ, NK]
    constexprs = dict(**_dims(q, v), BIAS_MODE=mode, **_numerics(q.dtype, interpret))
    return _spec(_attn_bwd_dkdv_kernel, _DKDV_TUNED, lambda m: (B * H, triton.cdiv(NK, m["BLOCK_N"])),
                 args, constexprs, INTERP_DKDV if interpret else cfg)


def table_grad_launch(part, positions, out, interpret, cfg=None):
    G, H, NQ, NK = part.shape
    T, C = positions.shape
    args = [part, positions, out, G, H, NQ * NK, T, C, out.stride(0), out.stride(1)]
    constexprs = dict(BLOCK_H=max(2, next_pow2(H)))
    return _spec(_table_grad_kernel, _TG_TUNED, lambda m: (triton.cdiv(T, m["BLOCK_T"]),), args, constexprs,
                 INTERP_TABLE_GRAD if interpret else cfg)


def _spec(kernel, tuned, grid_fn, args, constexprs, cfg):
    """A launch spec with a fixed configuration (cfg: a config dict) or the autotuned kernel (cfg None)."""
    if cfg is None:
        return tuned, grid_fn, args, constexprs, {}
    cfg = dict(cfg)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    constexprs = dict(constexprs, **cfg)
    return kernel, grid_fn(constexprs), args, constexprs, opts


def _launch(spec):
    kernel, grid, args, constexprs, opts = spec
    kernel[grid](*args, **constexprs, **opts)


# --------------------------------------------------------------------------------------------------
# Launchers (inputs validated by beit_fast/ops/attention.py; q, k, v with unit last-dim stride)
# --------------------------------------------------------------------------------------------------


def out_strides(B: int, H: int, NQ: int, DV: int) -> tuple[int, int, int, int]:
    """Strides of the forward's output [B, H, Nq, Dv]: [B, Nq, H, Dv]-major, so that the caller's
    ``out.transpose(1, 2).reshape(B, Nq, H * Dv)`` (every multi-head attention does it) is a free view."""
    return (NQ * H * DV, DV, H * DV, 1)


def attention_forward(q, k, v, bias4, table_t, index, scale, deterministic=False):
    """q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] (one dtype, last stride 1); bias4: a 4-D view
    broadcastable to [B,H,Nq,Nk] or None; table_t: [H, T] fp32 contiguous or None; index: compact
    [Nq, Nk] int16/int32 (from ``index_plan``) or None.

    Returns (out [B,H,Nq,Dv] in q.dtype, stored [B,Nq,H,Dv]-major so that ``out.transpose(1, 2)`` is
    contiguous; lse [B,H,Nq] fp32 in log2 units)."""
    B, H, NQ, _ = q.shape
    DV = v.shape[-1]
    out = torch.empty_strided((B, H, NQ, DV), out_strides(B, H, NQ, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    interpret = is_interpreted(_attn_fwd_kernel)
    _launch(fwd_launch(q, k, v, out, lse, bias4, table_t, index, scale, interpret,
                       DETERMINISTIC_FWD if deterministic or not AUTOTUNE else None))
    return out, lse


def attention_backward(do, q, k, v, out, lse, bias4, table_t, index, index_t, positions, scale,
                       bias_grad, bias_batched=False, deterministic=False):
    """Gradients of ``attention_forward``. ``do`` has out's shape (any strides with a unit last stride).

    Returns (dq, dk, dv, dbias): dbias is None unless ``bias_grad``; then, for a table, the table gradient
    [T, H] fp32; for a dense bias, the per-group partial sums [G, H, Nq, Nk] fp32 (G = B when
    ``bias_batched``: the bias has a batch dimension and partial[b] is its gradient), to be reduced by the
    caller over the dims the bias broadcasts over."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[-1]
    dev = q.device
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, NK, D), dtype=q.dtype, device=dev)
    dv = torch.empty((B, H, NK, DV), dtype=q.dtype, device=dev)
    has_bias = bias4 is not None or table_t is not None
    bias_grad = bool(bias_grad) and has_bias
    interpret = is_interpreted(_attn_bwd_dq_kernel)
    if B * H == 0 or NQ == 0 or NK == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        dbias = None
        if bias_grad:
            dbias = (torch.zeros((table_t.shape[1], H), dtype=torch.float32, device=dev) if table_t is not None
                     else torch.zeros((B if bias_batched else 1, H, NQ, NK), dtype=torch.float32, device=dev))
        return dq, dk, dv, dbias
    if bias_batched:
        groups, per = B, 1
    else:
        groups, per = batch_groups(B, H, NQ, interpret, device=dev)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=dev)
    part = torch.empty((groups, H, NQ, NK), dtype=torch.float32, device=dev) if bias_grad else None
    _launch(dq_launch(q, k, v, out, do, lse, delta, dq, part, bias4, table_t, index, scale, groups, per,
                      bias_grad, interpret, DETERMINISTIC_DQ if deterministic or not AUTOTUNE else None))
    _launch(dkdv_launch(q, k, v, do, lse, delta, dk, dv, bias4, table_t, index_t, scale, interpret,
                        DETERMINISTIC_DKDV if deterministic or not AUTOTUNE else None))
    dbias = None
    if bias_grad:
        if table_t is not None:
            T = table_t.shape[1]
            dbias = torch.empty((T, H), dtype=torch.float32, device=dev)
            _launch(table_grad_launch(part, positions, dbias, interpret,
                                      DETERMINISTIC_TABLE_GRAD if deterministic or not AUTOTUNE else None))
        else:
            dbias = part
    return dq, dk, dv, dbias
