"""Tests of beit_fast.ops.attention.attention_with_bias (every backend against the eager "math" one).

CPU: "math" and "sdpa" run for real (fp64 exact-ish, fp32/bf16/fp16 by the flash-attention rule); the
bias layout of the efficient kernels, the FlexAttention score_mod (forward, eager) and the xformers
plumbing (against a stand-in that enforces xformers' documented input checks) are tested on CPU too.
CUDA: the "sdpa" (efficient kernel), "flex" and "xformers" parametrisations are real tests that run on a
CUDA machine (flex needs BEIT_FAST_REAL_GPU=1 so that Triton is not interpreted; xformers needs xformers):

    BEIT_FAST_REAL_GPU=1 pytest tests/test_ops_attention.py

The CUDA cases are trimmed (``_trimmed_on_cuda``) so that the file runs well under a minute on a GPU: every
new shape, dtype or bias layout recompiles FlexAttention (seconds each), so flex runs BEiT's shape only.
The "triton" backend has its own file, tests/test_ops_attention_triton.py.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from beit_fast.model.beit import Attention, RelativePositionBias
from beit_fast.ops import attention as A
from beit_fast.ops import attention_backends as AB  # the backends' own module: monkeypatch their globals there
from beit_fast.ops.attention import (
    attention_with_bias,
    available_attention_backends,
    resolve_attention_backend,
)

HAS_CUDA = torch.cuda.is_available()
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(autouse=True)
def _no_silent_eager_flex():
    """The compiled flex function is shared by every call and these tests feed it many shapes, dtypes and
    bias layouts: allow the recompiles, and fail rather than let dynamo fall back to eager flex."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


def _skip_reason(device: str, backend: str) -> str | None:
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device"
    if backend == "xformers" and not HAS_XFORMERS:
        return "xformers is not installed"
    if backend == "flex" and TRITON_INTERPRETED:
        return "TRITON_INTERPRET=1 (root conftest): run with BEIT_FAST_REAL_GPU=1 to compile flex for real"
    return None


# CUDA cases kept: flex only at BEiT's shape (each case compiles it anew); sdpa / xformers everywhere
# except the fp16 repeats of the small odd shapes.
_FLEX_CUDA_SHAPE = (2, 3, 197, 64)


def _trimmed_on_cuda(device: str, backend: str, shape=None, dtype=None, bias_kind=None) -> None:
    """Skip the CUDA cases that add run time (compiles) without adding coverage (see module docstring)."""
    if device != "cuda":
        return
    if backend == "flex" and (shape not in (None, _FLEX_CUDA_SHAPE) or bias_kind is not None):
        pytest.skip("trimmed on CUDA: flex recompiles for every shape / bias layout; BEiT's shape is tested")
    if backend in ("sdpa", "xformers") and dtype == torch.float16 and shape != _FLEX_CUDA_SHAPE:
        pytest.skip("trimmed on CUDA: the small shapes run in fp32 and bf16")


def _case(device: str, backend: str):
    reason = _skip_reason(device, backend)
    marks = [pytest.mark.gpu] if device == "cuda" else []
    if reason:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(device, backend, marks=marks, id=f"{device}-{backend}")


# Every backend other than the reference itself, on every device it can run on.
BACKEND_CASES = [
    _case("cpu", "sdpa"),
    _case("cuda", "sdpa"),
    _case("cuda", "flex"),
    _case("cuda", "xformers"),
]
# (B, H, N, Dh): BEiT's N = 197 and Dh = 64; N = 13 (not a multiple of 8, window 3x4 + CLS); N = 17 (window
# 4x4 + CLS); H in {1, 3}; Dh >= 16 and a multiple of 8 so that every CUDA kernel takes every case.
SHAPES = [(2, 3, 197, 64), (3, 1, 13, 16), (2, 3, 17, 16)]
WINDOWS = {197: (14, 14), 13: (3, 4), 17: (4, 4)}


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    q, k, v, dout = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    rpb = RelativePositionBias(WINDOWS[n], h)
    with torch.no_grad():  # zero-initialised in the model: give it values so the bias matters
        rpb.relative_position_bias_table.copy_(torch.randn(rpb.relative_position_bias_table.shape, generator=g))
    return [t.to(device) for t in (q, k, v, dout)], rpb.to(device)


def _fwd_bwd(backend, q, k, v, dout, dtype, bias_src, bias_dtype, scale=None):
    """Run the op at ``dtype`` from (rounded) copies of q, k, v; the bias in ``bias_dtype`` comes from a
    RelativePositionBias module (gradient read on its table) or is a leaf tensor (or None).

    q, k, v are passed as the model passes them: strided views of one packed [B, N, 3, H, Dh] tensor
    (``Attention.qkv_projection``'s reshape + permute)."""
    packed = torch.stack([t.detach().to(dtype) for t in (q, k, v)]).permute(1, 3, 0, 2, 4).contiguous()
    packed.requires_grad_()
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    if isinstance(bias_src, RelativePositionBias):
        mod = copy.deepcopy(bias_src).to(bias_dtype)
        bias = mod()
        leaf = mod.relative_position_bias_table
    elif bias_src is None:
        bias = leaf = None
    else:
        bias = leaf = bias_src.detach().to(bias_dtype).requires_grad_()
    out = attention_with_bias(q, k, v, bias, scale, backend=backend)
    assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == dtype
    out.backward(dout.to(dtype))
    results = [out, *packed.grad.permute(2, 0, 3, 1, 4).unbind(0)]
    if leaf is not None:
        assert leaf.grad is not None, "no gradient reached the bias"
        results.append(leaf.grad)
    return [r.detach().double() for r in results]


NAMES = ["out", "dq", "dk", "dv", "dbias"]


# ------------------------------------------------------------------------------------------------------
# Faithfulness of the reference
# ------------------------------------------------------------------------------------------------------
def test_math_backend_is_the_model_attention_bit_for_bit():
    torch.manual_seed(0)
    attn = Attention(48, 3)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    rpb = RelativePositionBias((3, 4), 3)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    x = torch.randn(2, 13, 48)
    expected = attn(x, rpb())
    q, k, v = attn.qkv_projection(x)  # non-contiguous views, as the model will pass them
    out = attention_with_bias(q, k, v, rpb(), backend="math")
    got = attn.proj(out.transpose(1, 2).reshape(2, 13, 48))
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------------
# Every backend against math
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[0] == "cpu"])
def test_fp64_matches_math_with_table_gradient(device, backend, shape):
    # CPU only: the CUDA kernels have no float64 path (they are covered by the flash-attention rule).
    (q, k, v, dout), rpb = _inputs(shape, device)
    ref = _fwd_bwd("math", q, k, v, dout, torch.float64, rpb, torch.float64)
    got = _fwd_bwd(backend, q, k, v, dout, torch.float64, rpb, torch.float64)
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias_kind", ["BHNN", "NN", "H1N", "none"])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_bias_broadcast_shapes(device, backend, bias_kind):
    _trimmed_on_cuda(device, backend, bias_kind=bias_kind)
    b, h, n, d = 2, 3, 13, 16
    (q, k, v, dout), _ = _inputs((b, h, n, d), device, seed=1)
    g = torch.Generator().manual_seed(2)
    shapes = {"BHNN": (b, h, n, n), "NN": (n, n), "H1N": (h, 1, n), "none": None}
    bias = None if shapes[bias_kind] is None else torch.randn(shapes[bias_kind], generator=g, dtype=torch.float64).to(device)
    if device == "cpu":  # a non-default scale too
        ref = _fwd_bwd("math", q, k, v, dout, torch.float64, bias, torch.float64, scale=0.7)
        got = _fwd_bwd(backend, q, k, v, dout, torch.float64, bias, torch.float64, scale=0.7)
        for name, gg, r in zip(NAMES, got, ref):
            torch.testing.assert_close(gg, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    else:
        _check_flash_rule(backend, q, k, v, dout, torch.float32, bias, scale=0.7)


def _max_err(a, b):
    return (a - b).abs().max().item()


def _check_flash_rule(backend, q, k, v, dout, dtype, bias_src, scale=None):
    """FlashAttention's test rule: the backend's error against an fp64 reference (from the same rounded
    inputs) is at most twice PyTorch math's error at the same precision, plus a small atol."""
    bias_dtype = torch.float32  # as in the model: the table is an fp32 parameter
    rq, rk, rv, rdout = (t.to(dtype).double() for t in (q, k, v, dout))
    if isinstance(bias_src, RelativePositionBias) or bias_src is None:
        rbias = bias_src
    else:
        rbias = bias_src.to(bias_dtype).double()
    ref = _fwd_bwd("math", rq, rk, rv, rdout, torch.float64, rbias, torch.float64, scale)
    pt = _fwd_bwd("math", q, k, v, dout, dtype, bias_src, bias_dtype, scale)
    got = _fwd_bwd(backend, q, k, v, dout, dtype, bias_src, bias_dtype, scale)
    atol = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-4}[dtype]
    for name, g, p, r in zip(NAMES, got, pt, ref):
        scale = max(1.0, r.abs().max().item())
        err, err_pt = _max_err(g, r), _max_err(p, r)
        assert err <= 2 * err_pt + atol * scale, (
            f"{backend} {dtype} {name}: error {err:.3g} vs math-at-{dtype} error {err_pt:.3g} (ref max {scale:.3g})"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_low_precision_flash_attention_rule(device, backend, shape, dtype):
    _trimmed_on_cuda(device, backend, shape, dtype)
    if device == "cuda" and backend == "flex" and dtype == torch.float16:
        pytest.skip("trimmed on CUDA: flex runs fp32 and bf16")
    (q, k, v, dout), rpb = _inputs(shape, device, seed=3)
    _check_flash_rule(backend, q, k, v, dout, dtype, rpb)


# ------------------------------------------------------------------------------------------------------
# Pieces of the CUDA backends that can be checked on CPU
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [197, 13, 16])
def test_aligned_bias_layout_values_and_gradient(n, dtype):
    b, h = 4, 3
    q = torch.empty(b, h, n, 8, dtype=dtype)
    bias = torch.randn(h, n, n, dtype=torch.float64, requires_grad=True)
    aligned = AB._aligned_bias(bias, q, q)
    assert aligned.shape == (b, h, n, n) and aligned.dtype == dtype
    assert aligned.stride(-1) == 1 and aligned.stride(0) == 0  # expanded over B, not materialised
    assert all(s % AB.BIAS_ALIGNMENT == 0 for s in aligned.stride()[:-1]), aligned.stride()
    assert aligned.data_ptr() % 16 == 0
    if n % 8:
        assert aligned.stride(-2) == n + (-n) % 8
    torch.testing.assert_close(aligned.double(), bias.detach().to(dtype).double().expand(b, h, n, n), rtol=0, atol=0)
    # The gradient through pad/slice/expand is the B-sum of the upstream gradient, cast back.
    g = torch.randn(b, h, n, n, dtype=dtype)
    aligned.backward(g)
    torch.testing.assert_close(bias.grad, g.sum(0).double(), rtol=0, atol=0)


def test_aligned_bias_is_a_view_when_already_aligned():
    h, n = 2, 16
    q = torch.empty(3, h, n, 8)
    bias = torch.randn(h, n, n)
    aligned = AB._aligned_bias(bias, q, q)
    assert aligned.data_ptr() == bias.data_ptr() and aligned.stride() == (0, n * n, n, 1)


def test_aligned_bias_through_sdpa_matches_math_cpu():
    """The exact mask the CUDA efficient path hands to SDPA, run through CPU SDPA: values and grads."""
    (q, k, v, dout), rpb = _inputs((2, 3, 197, 16), "cpu", seed=4)
    ref = _fwd_bwd("math", q, k, v, dout, torch.float64, rpb, torch.float64)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mod = copy.deepcopy(rpb).double()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=AB._aligned_bias(mod(), q, k))
    out.backward(dout)
    got = [out, q.grad, k.grad, v.grad, mod.relative_position_bias_table.grad]
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g.detach(), r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bias_shape", [(3, 13, 13), (2, 3, 13, 13), (13, 13), (3, 1, 13), (1, 1, 1)])
def test_flex_score_mod_forward_on_cpu(bias_shape):
    """FlexAttention forward (eager, no grad: its backward does not run on CPU) with our score_mod."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 13, 16, generator=g) for _ in range(3))
    bias = torch.randn(bias_shape, generator=g)
    with torch.no_grad():
        got = A._flex_attention(q, k, v, bias, 0.3, compiled=False)
        ref = attention_with_bias(q.double(), k.double(), v.double(), bias.double(), 0.3, backend="math")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


class _FakeXformersOps:
    """Stand-in for xformers.ops enforcing the documented input contract of memory_efficient_attention
    (layout [B, M, H, K]; attn_bias exactly [B, H, Mq, Mk] in the query's dtype, strides but the last
    multiple of 128 bits, last stride 1), computing with plain PyTorch."""

    calls = 0

    @classmethod
    def memory_efficient_attention(cls, query, key, value, attn_bias=None, p=0.0, scale=None):
        cls.calls += 1
        b, m, h, kdim = query.shape
        assert key.shape[:1] == (b,) and key.shape[2:] == (h, kdim) and value.shape[:3] == key.shape[:3]
        assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
        if attn_bias is not None:
            assert tuple(attn_bias.shape) == (b, h, m, key.shape[1]), attn_bias.shape
            assert attn_bias.dtype == query.dtype
            align = 128 // torch.finfo(attn_bias.dtype).bits
            assert all(attn_bias.stride(d) % align == 0 for d in range(3)), attn_bias.stride()
            assert attn_bias.stride(-1) == 1
        scale = kdim**-0.5 if scale is None else scale
        s = (query.transpose(1, 2) * scale) @ key.transpose(1, 2).transpose(-2, -1)
        if attn_bias is not None:
            s = s + attn_bias
        return (s.softmax(-1) @ value.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("scale", [None, 0.7])
def test_xformers_plumbing_with_stand_in(monkeypatch, scale):
    (q, k, v, dout), rpb = _inputs((2, 3, 197, 16), "cpu", seed=6)
    ref = _fwd_bwd("math", q, k, v, dout, torch.float64, rpb, torch.float64, scale)
    with pytest.raises(RuntimeError, match="needs CUDA"):  # the real dispatch refuses CPU tensors
        attention_with_bias(q, k, v, rpb().double(), backend="xformers")
    # Let the public dispatch through on CPU, with the stand-in as xformers.ops.
    monkeypatch.setattr(AB, "_XFORMERS", (_FakeXformersOps, ""))
    monkeypatch.setattr(A, "_unavailable_reason", lambda name, q, v: None)
    before = _FakeXformersOps.calls
    got = _fwd_bwd("xformers", q, k, v, dout, torch.float64, rpb, torch.float64, scale)
    assert _FakeXformersOps.calls == before + 1
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------
# Dispatch, errors, autocast
# ------------------------------------------------------------------------------------------------------
def test_available_backends_and_auto_on_cpu():
    assert available_attention_backends("cpu") == ["math", "sdpa"]
    assert available_attention_backends(torch.device("cpu")) == ["math", "sdpa"]
    if not HAS_CUDA:
        assert available_attention_backends("cuda") == []
    q = torch.randn(1, 2, 5, 8)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert resolve_attention_backend("auto", q.to(dtype)) == "sdpa"
    assert set(A.AUTO_PRIORITY["cuda"]) == set(A.ATTENTION_BACKENDS)


def test_unknown_backend_lists_names():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="'auto', 'math', 'sdpa', 'flex', 'xformers'"):
        attention_with_bias(q, q, q, None, backend="flash")


@pytest.mark.parametrize("backend,why", [("flex", "needs CUDA tensors.*backward does not run on CPU"), ("xformers", "needs CUDA")])
def test_cuda_only_backends_refuse_cpu(backend, why):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match=f"'{backend}' is unavailable: .*{why}"):
        attention_with_bias(q, q, q, torch.zeros(2, 5, 5), backend=backend)


@pytest.mark.parametrize(
    "qs,ks,vs,bs,match",
    [
        ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), (4, 5, 5), "bias of shape"),
        ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), (3, 5, 6), "bias of shape"),
        ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), (5,), "bias of shape"),
        ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), (1, 2, 3, 5, 5), "bias of shape"),
        ((2, 3, 5, 8), (2, 3, 5, 4), (2, 3, 5, 8), None, "k must be"),
        ((2, 3, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8), None, "k must be"),
        ((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 6, 8), None, "v must be"),
        ((2, 3, 5, 8), (2, 3, 5, 8), (3, 3, 5, 8), None, "v must be"),
        ((3, 5, 8), (3, 5, 8), (3, 5, 8), None, "q must be 4-D"),
    ],
)
def test_bad_shapes_raise(qs, ks, vs, bs, match):
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    bias = None if bs is None else torch.randn(bs)
    with pytest.raises(ValueError, match=match):
        attention_with_bias(q, k, v, bias)


def test_bad_dtypes_raise():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="share one dtype"):
        attention_with_bias(q, q.half(), q)
    with pytest.raises(TypeError, match="floating-point"):
        attention_with_bias(q, q, q, torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        attention_with_bias(q.int(), q.int(), q.int())


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_computes_in_input_dtype_under_autocast(backend):
    q, k, v = (torch.randn(2, 3, 13, 8) for _ in range(3))
    bias = torch.randn(3, 13, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_with_bias(q, k, v, bias, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_with_bias(q, k, v, bias, backend="math"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", [_case("cpu", "math"), *BACKEND_CASES])
def test_only_bias_requires_grad(device, backend):
    """pytorch/pytorch#148476: the efficient SDPA kernel crashed when only the mask needed a gradient."""
    _trimmed_on_cuda(device, backend, shape=(2, 3, 13, 16))
    dtype = torch.float64 if device == "cpu" else torch.float32
    (q, k, v, dout), rpb = _inputs((2, 3, 13, 16), device, seed=7)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    bias = rpb().detach().to(dtype)

    def bias_grad(backend, dt):
        b = bias.to(dt).requires_grad_()
        out = attention_with_bias(q.to(dt), k.to(dt), v.to(dt), b, backend=backend)
        return torch.autograd.grad(out, b, dout.to(dt))[0].double()

    got, ref = bias_grad(backend, dtype), bias_grad("math", torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    else:  # the flash-attention rule, as in _check_flash_rule
        err, err_pt = _max_err(got, ref), _max_err(bias_grad("math", dtype), ref)
        assert err <= 2 * err_pt + 1e-6 * max(1.0, ref.abs().max().item()), (err, err_pt)


# ------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
def test_compile_fullgraph_no_graph_breaks_cpu(backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    rpb = RelativePositionBias((3, 4), 3)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()

    def f(q, k, v):
        return attention_with_bias(q, k, v, rpb(), backend=backend)

    q, k, v = (torch.randn(2, 3, 13, 8, requires_grad=True) for _ in range(3))
    out = torch.compile(f, backend=counter, fullgraph=True)(q, k, v)
    out.sum().backward()
    assert counter.frame_count == 1
    assert rpb.relative_position_bias_table.grad is not None
    torch.testing.assert_close(out, f(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # about 15-25 s on 2 cores: inductor compiles forward and backward
def test_compile_inductor_forward_backward_cpu():
    torch._dynamo.reset()
    rpb = RelativePositionBias((3, 4), 3)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()

    def f(q, k, v):
        return attention_with_bias(q, k, v, rpb(), backend="auto")

    base = [torch.randn(2, 3, 13, 8) for _ in range(3)]
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        rpb.zero_grad()
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(torch.ones_like(out) * torch.arange(8.0))
        results.append([out, q.grad, k.grad, v.grad, rpb.relative_position_bias_table.grad.clone()])
    for name, c, e in zip(NAMES, results[1], results[0]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_sdpa_uses_the_efficient_kernel_on_model_views():
    torch.manual_seed(0)
    attn = Attention(768, 12).cuda().bfloat16()
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16)
    rpb = RelativePositionBias((14, 14), 12).cuda()
    q, k, v = attn.qkv_projection(x)
    out = attention_with_bias(q, k, v, rpb(), backend="sdpa")
    assert "Efficient" in out.grad_fn.name(), out.grad_fn.name()
    out.float().square().sum().backward()
    assert rpb.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(TRITON_INTERPRETED, reason="TRITON_INTERPRET=1: run with BEIT_FAST_REAL_GPU=1")
def test_cuda_flex_does_not_recompile_for_new_bias_tensors():
    from torch._dynamo.utils import counters

    (q, k, v, dout), rpb = _inputs((2, 3, 197, 64), "cuda", seed=8)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    rpb = rpb.float()
    attention_with_bias(q, k, v, rpb(), backend="flex").backward(dout.float())
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):
        attention_with_bias(q, k, v, rpb() * 1.5, backend="flex").backward(dout.float())
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(HAS_XFORMERS, reason="checks the message when xformers is missing")
def test_cuda_xformers_missing_message():
    q = torch.randn(1, 2, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="xformers cannot be imported"):
        attention_with_bias(q, q, q, None, backend="xformers")
    assert "xformers" not in available_attention_backends("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_unsupported_inputs_auto_falls_back_and_explicit_kernels_refuse():
    q = torch.randn(1, 2, 5, 8, device="cuda", dtype=torch.float64)
    assert resolve_attention_backend("auto", q) == "math"
    for backend in ("sdpa", "flex"):
        with pytest.raises(RuntimeError, match="float16/bfloat16/float32"):
            resolve_attention_backend(backend, q)
    with pytest.raises(RuntimeError, match="head dims >= 16"):
        resolve_attention_backend("flex", q.float())
    q6 = torch.randn(1, 2, 5, 6, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="divisible by 8"):
        resolve_attention_backend("sdpa", q6)


def test_flex_kernel_options_are_valid_tiles():
    """The tiles the "flex" backend passes per card (FLEX_KERNEL_OPTIONS) are FlexAttention option names
    (fwd_/bwd_ prefixed) whose block shapes inductor accepts: powers of two that divide its 128-wide
    sparse blocks, with BLOCK_N1 % BLOCK_M1 == BLOCK_M2 % BLOCK_N2 == 0 (the backward kernel's asserts)."""
    from torch.nn.attention.flex_attention import FlexKernelOptions

    names = set(FlexKernelOptions.__annotations__)
    assert A.FLEX_KERNEL_OPTIONS, "no card has explicit tiles"
    for cap, opts in A.FLEX_KERNEL_OPTIONS.items():
        plain = {}
        for key, value in opts.items():
            assert key.startswith(("fwd_", "bwd_")), key
            assert key[4:] in names, f"{cap}: {key} is not a FlexAttention kernel option"
            plain[key] = value
        for key in ("fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"):
            v = plain[key]
            assert v >= 16 and v & (v - 1) == 0 and 128 % v == 0, (cap, key, v)
        assert plain["bwd_BLOCK_N1"] % plain["bwd_BLOCK_M1"] == 0
        assert plain["bwd_BLOCK_M2"] % plain["bwd_BLOCK_N2"] == 0
    assert A.flex_kernel_options(torch.zeros(1, 1, 4, 64)) is None  # CPU: torch's defaults


def test_flex_backend_passes_the_card_tiles(monkeypatch):
    """On a card with explicit tiles, the compiled flex function receives them as kernel_options."""
    seen = {}

    def fake_flex(q, k, v, score_mod=None, scale=None, **kw):
        seen.update(kw)
        return q

    monkeypatch.setattr(AB, "_compiled_flex", lambda: fake_flex)
    monkeypatch.setattr(AB, "flex_kernel_options", lambda q: {"fwd_BLOCK_M": 64})
    q = torch.randn(1, 2, 5, 16)
    AB._flex_attention(q, q, q, torch.zeros(2, 5, 5), 0.25)
    assert seen == {"kernel_options": {"fwd_BLOCK_M": 64}}
    seen.clear()
    monkeypatch.setattr(AB, "flex_kernel_options", lambda q: None)
    AB._flex_attention(q, q, q, None, 0.25)
    assert seen == {}
