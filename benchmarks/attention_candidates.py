"""Every candidate for BEiT's attention with the relative position bias, forward and backward incl. the
bias gradient, behind one call: ``fn(q, k, v, bias, scale) -> out`` with autograd to q, k, v and bias.

q, k, v ``[B, H, N, Dh]`` (bf16/fp16 on CUDA), bias ``[H, N, N]`` fp32 (the relative position bias, shared
by the batch). Each candidate says why it cannot run (``unavailable(q)``: a sentence, or None):

  math, sdpa, flex, xformers, triton, ...  beit_fast.ops.attention_with_bias(backend=name): whatever
                     backends this checkout has ("triton" is skipped with a reason until it is merged)
  flex_tiles:NAME    FlexAttention with explicit kernel_options from FLEX_LADDER (tiles sized for
                     Hopper's 227 KiB of shared memory), for when the backend's own tiles fail
  cudnn              cuDNN's fused attention through nvidia-cudnn-frontend's Python graph API: the sdpa
                     node with a bias input forward (softmax stats kept), and sdpa_backward with a dBias
                     output (reduced over the batch by cuDNN: the bias is [1, H, N, N]). Not a backend of
                     beit_fast yet: measured here to decide whether to add one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from beit_fast.ops import attention as A
from beit_fast.ops import attention_backends as AB


@dataclass
class Candidate:
    name: str
    runs: str
    unavailable: Callable[[torch.Tensor], str | None]
    fn: Callable


# --------------------------------------------------------------------------------------------------
# beit_fast backends
# --------------------------------------------------------------------------------------------------
def backend_candidate(name: str) -> Candidate:
    def unavailable(q):
        if name not in A.ATTENTION_BACKENDS:
            return (f"beit_fast.ops.attention has no {name!r} backend in this checkout "
                    f"(backends: {', '.join(A.ATTENTION_BACKENDS)})")
        try:
            A.resolve_attention_backend(name, q)
        except (RuntimeError, ValueError) as e:
            return str(e)
        return None

    def fn(q, k, v, bias, scale):
        return A.attention_with_bias(q, k, v, bias, scale, backend=name)

    runs = {"math": "eager reference ops in the input dtype (scores materialised)",
            "sdpa": "F.scaled_dot_product_attention, EFFICIENT_ATTENTION kernel, bias padded to 200 and expanded",
            "flex": "FlexAttention score_mod (compiled), beit_fast's kernel_options for this card",
            "xformers": "xformers.ops.memory_efficient_attention (cutlass), aligned bias",
            "triton": "beit_fast's fused Triton kernel"}.get(name, f"attention_with_bias(backend={name!r})")
    return Candidate(name, runs, unavailable, fn)


# --------------------------------------------------------------------------------------------------
# FlexAttention with explicit tiles
# --------------------------------------------------------------------------------------------------
# Tried in order when the flex backend's own tiles fail (each entry: fwd BLOCK_M, BLOCK_N, stages, warps;
# bwd BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, stages, warps). All well under 227 KiB of shared memory.
FLEX_LADDER: dict[str, dict[str, int]] = {
    "f64x64s2_b32x64s2": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4,
                          "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                          "bwd_num_stages": 2, "bwd_num_warps": 4},
    "f64x32s1_b16x32s1": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_stages": 1, "fwd_num_warps": 4,
                          "bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 16,
                          "bwd_num_stages": 1, "bwd_num_warps": 4},
}
_FLEX_FN: Callable | None = None


def flex_tiles_candidate(tiles: str) -> Candidate:
    opts = FLEX_LADDER[tiles]

    def unavailable(q):
        return None if q.is_cuda else "FlexAttention's backward runs on CUDA only"

    def fn(q, k, v, bias, scale):
        global _FLEX_FN
        if _FLEX_FN is None:
            from torch.nn.attention.flex_attention import flex_attention

            _FLEX_FN = torch.compile(flex_attention)
        with A.autocast_off(q.device):
            return _FLEX_FN(q, k, v, score_mod=AB._bias_score_mod(bias), scale=scale, kernel_options=opts)

    return Candidate(f"flex_tiles:{tiles}", f"FlexAttention score_mod, kernel_options {opts}", unavailable, fn)


# --------------------------------------------------------------------------------------------------
# cuDNN through nvidia-cudnn-frontend
# --------------------------------------------------------------------------------------------------
_CUDNN: dict = {}  # module, handle, graph cache, which bias layout each shape used


def _cudnn():
    if "module" not in _CUDNN:
        _CUDNN["module"] = importlib.import_module("cudnn")
    return _CUDNN["module"]


def cudnn_unavailable(q: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return "cuDNN attention needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN's fused attention takes fp16/bf16, got {q.dtype}"
    try:
        cudnn = _cudnn()
    except Exception as e:
        return (f"nvidia-cudnn-frontend cannot be imported ({type(e).__name__}: {e}); carry its wheel "
                "(benchmarks/fetch_gpu_wheels.sh)")
    ver = torch.backends.cudnn.version()  # also loads libcudnn, which the frontend looks up
    if ver is None:
        return "PyTorch has no cuDNN here"
    if ver < 8906:
        return f"cuDNN {ver} has no dBias for fused attention (needs >= 8.9.6)"
    if not hasattr(cudnn, "pygraph"):
        return "this nvidia-cudnn-frontend has no Python graph API (cudnn.pygraph)"
    return None


def _cudnn_dtype(cudnn, dt: torch.dtype):
    return {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[dt]


def _finish(graph, cudnn) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


def _bias_buffer(h: int, n: int, dtype, device, padded: bool) -> torch.Tensor:
    """A [1, H, N, N] tensor whose rows start on 16-byte boundaries when ``padded`` (N rounded up to 8)."""
    cols = -(-n // 8) * 8 if padded else n
    return torch.empty(1, h, n, cols, dtype=dtype, device=device)[..., :n]


class _CudnnGraphs:
    """The forward and backward cuDNN graphs of one (shape, dtype, scale, bias layout), built once."""

    def __init__(self, q, k, v, scale: float, padded: bool) -> None:
        cudnn = _cudnn()
        if "handle" not in _CUDNN:
            _CUDNN["handle"] = cudnn.create_handle()
        self.handle = _CUDNN["handle"]
        b, h, n, d = q.shape
        dt = _cudnn_dtype(cudnn, q.dtype)
        self.padded = padded
        bias = _bias_buffer(h, n, q.dtype, q.device, padded)
        o = torch.empty_like(q)
        stats = torch.empty(b, h, n, 1, dtype=torch.float32, device=q.device)

        def new_graph():
            return cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                                 compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)

        g = new_graph()
        tq, tk, tv, tb = (g.tensor_like(t) for t in (q, k, v, bias))
        try:
            to, ts = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale, bias=tb)
        except TypeError:  # older frontends: is_inference instead of generate_stats
            to, ts = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, is_inference=False, attn_scale=scale, bias=tb)
        to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
        ts.set_output(True).set_data_type(cudnn.data_type.FLOAT).set_dim(list(stats.shape)).set_stride(
            list(stats.stride()))
        _finish(g, cudnn)
        self.fwd, self.fwd_t = g, (tq, tk, tv, tb, to, ts)

        g = new_graph()
        dbias = _bias_buffer(h, n, q.dtype, q.device, padded)
        tq, tk, tv, to2, tdo, ts2, tb = (g.tensor_like(t) for t in (q, k, v, o, o, stats, bias))
        tdb = g.tensor_like(dbias)
        dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to2, dO=tdo, stats=ts2,
                                     attn_scale=scale, bias=tb, dBias=tdb)
        for t, like in ((dq, q), (dk, k), (dv, v)):
            t.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride()))
        _finish(g, cudnn)
        self.bwd, self.bwd_t = g, (tq, tk, tv, to2, tdo, ts2, tb, tdb, dq, dk, dv)
        ws = max(self.fwd.get_workspace_size(), self.bwd.get_workspace_size(), 1)
        self.workspace = torch.empty(ws, dtype=torch.uint8, device=q.device)

    def _stream(self) -> None:
        _cudnn().set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)

    def forward(self, q, k, v, bias16):
        b, h, n, _ = q.shape
        o = torch.empty_like(q)
        stats = torch.empty(b, h, n, 1, dtype=torch.float32, device=q.device)
        tq, tk, tv, tb, to, ts = self.fwd_t
        self._stream()
        self.fwd.execute({tq: q, tk: k, tv: v, tb: bias16, to: o, ts: stats}, self.workspace, handle=self.handle)
        return o, stats

    def backward(self, q, k, v, o, do, stats, bias16):
        tq, tk, tv, to, tdo, ts, tb, tdb, tdq, tdk, tdv = self.bwd_t
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = _bias_buffer(q.shape[1], q.shape[2], q.dtype, q.device, self.padded)
        self._stream()
        self.bwd.execute({tq: q, tk: k, tv: v, to: o, tdo: do, ts: stats, tb: bias16, tdb: dbias,
                          tdq: dq, tdk: dk, tdv: dv}, self.workspace, handle=self.handle)
        return dq, dk, dv, dbias


def _graphs_for(q, k, v, scale: float) -> _CudnnGraphs:
    key = (tuple(q.shape), q.dtype, q.device, float(scale))
    graphs = _CUDNN.setdefault("graphs", {})
    if key not in graphs:
        errors = []
        for padded in (True, False):  # 16-byte aligned bias rows first, as the other fused kernels want
            try:
                graphs[key] = _CudnnGraphs(q, k, v, scale, padded)
                break
            except Exception as e:  # cudnnGraphNotSupportedError and friends
                errors.append(f"{'padded' if padded else 'contiguous'} bias: {type(e).__name__}: {e}")
        else:
            raise RuntimeError("cuDNN cannot build fused attention with dBias here: " + " | ".join(errors))
    return graphs[key]


class _CudnnAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        q, k, v = (t.contiguous() for t in (q, k, v))
        graphs = _graphs_for(q, k, v, scale)
        b16 = _bias_buffer(q.shape[1], q.shape[2], q.dtype, q.device, graphs.padded)
        b16.copy_(bias.reshape(b16.shape))
        o, stats = graphs.forward(q, k, v, b16)
        ctx.save_for_backward(q, k, v, b16, o, stats)
        ctx.graphs, ctx.bias_shape, ctx.bias_dtype = graphs, bias.shape, bias.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, b16, o, stats = ctx.saved_tensors
        dq, dk, dv, dbias = ctx.graphs.backward(q, k, v, o, do.contiguous(), stats, b16)
        return dq, dk, dv, dbias.reshape(ctx.bias_shape).to(ctx.bias_dtype), None


def cudnn_attention(q, k, v, bias, scale):
    if bias is None or bias.dim() != 3:
        raise ValueError("the cuDNN candidate takes a shared [H, N, N] bias")
    with A.autocast_off(q.device):
        return _CudnnAttention.apply(q, k, v, bias, float(scale))


def cudnn_layout(q) -> str:
    """Which bias layout cuDNN accepted for this shape ("padded"/"contiguous"), once it ran."""
    for (shape, *_), g in _CUDNN.get("graphs", {}).items():
        if shape == tuple(q.shape):
            return "bias rows padded to 16 bytes" if g.padded else "contiguous bias"
    return ""


CUDNN = Candidate("cudnn", "cuDNN fused attention (nvidia-cudnn-frontend graphs: sdpa with bias, sdpa_backward "
                           "with dBias reduced over the batch)", cudnn_unavailable, cudnn_attention)


def candidates(names: list[str]) -> list[Candidate]:
    """Candidates by name: backend names, "cudnn", "flex_tiles:<FLEX_LADDER key>"."""
    out = []
    for name in names:
        if name == "cudnn":
            out.append(CUDNN)
        elif name.startswith("flex_tiles:"):
            out.append(flex_tiles_candidate(name.split(":", 1)[1]))
        else:
            out.append(backend_candidate(name))
    return out
