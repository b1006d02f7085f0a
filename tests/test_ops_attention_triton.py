"""The "triton" attention backend (beit_fast/kernels/attention.py) against the math reference.

CPU: the kernels run under Triton's interpreter (root conftest), at small shapes. CUDA: the same tests run
the compiled kernels with ``BEIT_FAST_REAL_GPU=1`` (a trimmed set of cases plus BEiT-B's shapes at N 197 and
577, fixed configurations instead of autotuning so that each case compiles once; one test exercises the
autotuner, every configuration valid on the card; on CPU each configuration is forced in turn):

    BEIT_FAST_REAL_GPU=1 pytest tests/test_ops_attention_triton.py

Accuracy rule (flash-attention's): the error of every output and gradient against an fp64 reference computed
from the same rounded inputs is at most twice PyTorch's own error (the math backend at the same precision,
the table kept in fp32 as in the model) plus a small absolute term. Every buffer the launchers allocate
starts as NaN (``poison``), so an element a kernel fails to write fails the test.
"""
from __future__ import annotations

import pytest
import torch

import beit_fast.kernels.attention as KA
from beit_fast.kernels.attention_plan import index_plan
from beit_fast.model.beit import Attention, RelativePositionBias, build_classifier, relative_position_index
from beit_fast.ops import attention as A
from beit_fast.ops.attention import attention_with_bias, attention_with_rel_pos_bias
from kernel_test_utils import DEVICE, PoisonedTorch, exact_fp32_reference  # noqa: F401 (autouse fixture)

CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(
    not CUDA and not A.triton_interpreting(), reason="needs CUDA or TRITON_INTERPRET=1 (root conftest)"
)
NAMES = ["out", "dq", "dk", "dv", "dbias"]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-4}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(KA, "torch", PoisonedTorch(torch))


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Two batch elements per group of the dq kernel: several groups and a ragged last one at these B."""
    monkeypatch.setattr(KA, "BATCH_PER_GROUP", 2)


@pytest.fixture(autouse=True)
def fixed_configs(monkeypatch):
    """On CUDA: the deterministic configurations (one compile per case, no autotuning)."""
    monkeypatch.setattr(KA, "AUTOTUNE", False)


def _window(n: int) -> tuple[int, int]:
    return {13: (3, 4), 17: (4, 4), 50: (7, 7), 197: (14, 14), 577: (24, 24)}[n]


def _make(b, h, n, d, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    v, dout = (torch.randn(b, h, n, dv or d, generator=g, dtype=torch.float64) for _ in range(2))
    index = relative_position_index(_window(n))
    table = torch.randn(int(index.max()) + 1, h, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, dout, table)] + [index.to(DEVICE)]


def _run(backend, q, k, v, dout, dtype, table=None, index=None, bias=None, scale=None, bias_dtype=torch.float32):
    """[out, dq, dk, dv, d(table or bias)] in fp64, from leaves at ``dtype`` (the table / bias at bias_dtype)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if table is not None:
        extra = table.detach().to(bias_dtype).requires_grad_()
        out = attention_with_rel_pos_bias(*leaves, extra, index, scale, backend=backend)
    else:
        extra = None if bias is None else bias.detach().to(bias_dtype).requires_grad_()
        out = attention_with_bias(*leaves, extra, scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape[:3] + v.shape[-1:]
    out.backward(dout.to(dtype))
    grads = [t.grad for t in leaves] + ([] if extra is None else [extra.grad])
    assert all(gr is not None for gr in grads)
    return [out.detach().double()] + [gr.double() for gr in grads]


def _check(dtype, **kw):
    """The flash-attention rule for every output (see the module docstring)."""
    q, k, v, dout = (kw.pop(n) for n in ("q", "k", "v", "dout"))
    ref_kw = dict(kw)
    for name in ("table", "bias"):
        if kw.get(name) is not None:  # the reference sees the table / bias as the model holds it (fp32)
            ref_kw[name] = kw[name].to(torch.float32).double()
    rounded = [t.to(dtype).double() for t in (q, k, v, dout)]
    ref = _run("math", *rounded, torch.float64, bias_dtype=torch.float64, **ref_kw)
    pt = _run("math", q, k, v, dout, dtype, **kw)
    got = _run("triton", q, k, v, dout, dtype, **kw)
    for name, g, p, r in zip(NAMES, got, pt, ref):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (an unwritten element?)"
        scale = max(1.0, r.abs().max().item())
        err, err_pt = (g - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * err_pt + ATOL[dtype] * scale, (
            f"triton {dtype} {name}: error {err:.3g} vs math-at-{dtype} error {err_pt:.3g} (ref max {scale:.3g})"
        )


def _case(*values, cuda=False):
    marks = [] if cuda or not CUDA else [pytest.mark.skip(reason="interpreter-only case (CUDA runs a subset)")]
    return pytest.param(*values, marks=marks)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# ------------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "b,h,n,d,dtype",
    [
        _case(3, 2, 17, 16, F32, cuda=True),
        _case(3, 2, 17, 16, BF16),
        _case(3, 2, 17, 16, F16),
        _case(2, 2, 50, 32, F32),
        _case(2, 1, 197, 64, BF16, cuda=True),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_table_bias_matches_reference(b, h, n, d, dtype):
    q, k, v, dout, table, index = _make(b, h, n, d)
    _check(dtype, q=q, k=k, v=v, dout=dout, table=table, index=index)


@pytest.mark.parametrize(
    "b,h,n,d,dtype", [_case(3, 3, 13, 16, F32), _case(3, 3, 13, 16, BF16, cuda=True), _case(2, 2, 50, 24, F16)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_dense_bias_matches_reference(b, h, n, d, dtype):
    """A dense [H, N, N] bias (as the HF / timm patches pass it); d = 24 is not a power of two."""
    q, k, v, dout, table, index = _make(b, h, n, d, seed=1)
    bias = RelativePositionBias(_window(n), h).to(DEVICE)
    with torch.no_grad():
        bias.relative_position_bias_table.copy_(table)
    _check(dtype, q=q, k=k, v=v, dout=dout, bias=bias())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="BEiT-B sizes take minutes in the interpreter: CUDA only")
@pytest.mark.parametrize("n", [197, 577])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("mode", ["table", "dense"])
def test_beit_b_shapes(mode, dtype, n):
    """BEiT-B's attention (12 heads, head dim 64) at 224 px (N = 197) and 384 px (N = 577), table path (the
    model's) and dense bias (the HF / timm patches'), bf16 and fp16."""
    q, k, v, dout, table, index = _make(4 if n == 197 else 2, 12, n, 64, seed=13)
    if mode == "table":
        _check(dtype, q=q, k=k, v=v, dout=dout, table=table, index=index)
    else:
        _check(dtype, q=q, k=k, v=v, dout=dout, bias=table[index].permute(2, 0, 1).contiguous())


@pytest.mark.parametrize("dtype", [_case(F32), _case(F16, cuda=True)], ids=str)
def test_no_bias_and_distinct_value_head_dim(dtype):
    q, k, v, dout, _, _ = _make(3, 2, 17, 16, dv=32, seed=2)
    _check(dtype, q=q, k=k, v=v, dout=dout, scale=0.3)


@pytest.mark.parametrize("kind", ["BHNN", "NN", "H1N", "strided"])
def test_dense_bias_broadcast_and_strides(kind):
    """Batched biases ([B, H, N, N]: one group per batch element, the partial sums are the gradient),
    biases broadcast over heads or queries, and a non-contiguous bias view."""
    if CUDA and kind != "BHNN":
        pytest.skip("trimmed on CUDA (each bias layout compiles anew): the batched bias runs there")
    b, h, n, d = 3, 2, 13, 16
    q, k, v, dout, _, _ = _make(b, h, n, d, seed=3)
    g = torch.Generator().manual_seed(4)
    shape = {"BHNN": (b, h, n, n), "NN": (n, n), "H1N": (h, 1, n), "strided": (h, n, n)}[kind]
    bias = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    if kind == "strided":
        bias = bias.transpose(-1, -2)
    _check(F32, q=q, k=k, v=v, dout=dout, bias=bias)


def test_cross_attention_lengths():
    """Nq != Nk (the kernels never assume a square score matrix), dense bias [H, Nq, Nk]."""
    g = torch.Generator().manual_seed(10)
    q = torch.randn(3, 2, 13, 16, generator=g, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(3, 2, 17, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    dout = torch.randn(3, 2, 13, 16, generator=g, dtype=torch.float64).to(DEVICE)
    bias = torch.randn(2, 13, 17, generator=g, dtype=torch.float64).to(DEVICE)
    _check(F32, q=q, k=k, v=v, dout=dout, bias=bias)


def test_only_table_requires_grad_and_int32_index():
    q, k, v, dout, table, index = _make(3, 2, 17, 16, seed=5)
    tab = table.float().requires_grad_()
    out = attention_with_rel_pos_bias(q.float(), k.float(), v.float(), tab, index.int(), backend="triton")
    (got,) = torch.autograd.grad(out, tab, dout.float())
    ref = table.clone().requires_grad_()
    out_ref = attention_with_rel_pos_bias(q, k, v, ref, index, backend="math")
    (want,) = torch.autograd.grad(out_ref, ref, dout)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Models: shared table, per-block tables, "own + shared"; no dense bias formed on the triton path
# ------------------------------------------------------------------------------------------------------
def _model_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared,per_block", [(True, False), (False, True), (True, True)],
                         ids=["shared", "per-block", "own+shared"])
def test_classifier_tables_match_reference(shared, per_block, monkeypatch):
    torch.manual_seed(0)
    model = build_classifier("tiny", 5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             use_shared_rel_pos_bias=shared, use_rel_pos_bias=per_block).to(DEVICE)
    with torch.no_grad():  # zero-initialised tables: give them values so the bias matters
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    ref_out, ref_grads = _model_grads(model.configure_fast_path("math"), x)
    import beit_fast.model.beit as M

    def no_dense_bias(*a, **k):
        raise AssertionError("the triton path gathered a dense bias")

    monkeypatch.setattr(M, "gather_relative_position_bias", no_dense_bias)
    monkeypatch.setattr(A, "gather_relative_position_bias", no_dense_bias)
    out, grads = _model_grads(model.configure_fast_path("triton"), x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads)
    tables = [n for n in grads if "relative_position_bias_table" in n]
    assert len(tables) == int(shared) + 2 * int(per_block)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------------
# Determinism, unwritten memory, the position list
# ------------------------------------------------------------------------------------------------------
def test_bitwise_repeatable_and_grouping_independent(monkeypatch):
    q, k, v, dout, table, index = _make(5, 2, 17, 16, seed=6)
    first = _run("triton", q, k, v, dout, F32, table=table, index=index)
    second = _run("triton", q, k, v, dout, F32, table=table, index=index)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"
    monkeypatch.setattr(KA, "BATCH_PER_GROUP", 5)  # one group: another summation order, same values
    one_group = _run("triton", q, k, v, dout, F32, table=table, index=index)
    for name, a, b in zip(NAMES, first, one_group):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(CUDA, reason="interpreter blocks; on CUDA the N = 197 case spans several blocks")
def test_long_sequence_key_loop(monkeypatch):
    """Sequences over several blocks in every loop (keys in the forward and the dq kernel, whose slab of
    partial sums is then summed block by block; queries in the dk/dv kernel): N = 50, 16-wide blocks."""
    small = dict(num_warps=4, num_stages=1)
    for name, cfg in (("INTERP_FWD", dict(BLOCK_M=16, BLOCK_N=16)), ("INTERP_DQ", dict(BLOCK_M=16, BLOCK_N=16)),
                      ("INTERP_DKDV", dict(BLOCK_N=16, BLOCK_M=16))):
        monkeypatch.setattr(KA, name, dict(cfg, **small))
    q, k, v, dout, table, index = _make(3, 1, 50, 16, seed=7)
    _check(F32, q=q, k=k, v=v, dout=dout, table=table, index=index)


def _entries(name: str) -> list[dict]:
    """Every entry of a GPU configuration list of the kernels (both architecture families), untagged."""
    return [{k: v for k, v in d.items() if k != "archs"} for d in getattr(KA, name)]


_TUNED_LISTS = (("INTERP_FWD", "GPU_FWD_CONFIGS"), ("INTERP_DQ", "GPU_DQ_CONFIGS"),
                ("INTERP_DKDV", "GPU_DKDV_CONFIGS"), ("INTERP_TABLE_GRAD", "GPU_TABLE_GRAD_CONFIGS"))


@pytest.mark.skipif(CUDA, reason="on CUDA test_cuda_autotuned_beit_shape runs every configuration valid on the card")
@pytest.mark.parametrize("i", range(max(len(getattr(KA, gpu)) for _, gpu in _TUNED_LISTS)))
def test_every_autotuner_configuration(i, monkeypatch):
    """Each configuration the autotuner may pick, forced in turn (the interpreter runs one configuration per
    kernel): entry i of every list (the shorter lists wrap around), table path at N = 50 (one to four blocks of
    16-128, the last one padded) in fp32, and the dense bias in bf16 at N = 17: the reference's values and
    gradients."""
    for interp, gpu in _TUNED_LISTS:
        entries = _entries(gpu)
        monkeypatch.setattr(KA, interp, entries[i % len(entries)])
    q, k, v, dout, table, index = _make(3, 2, 50, 16, seed=11)
    _check(F32, q=q, k=k, v=v, dout=dout, table=table, index=index)
    q, k, v, dout, table, index = _make(3, 2, 17, 16, seed=12)
    _check(BF16, q=q, k=k, v=v, dout=dout, bias=table[index].permute(2, 0, 1).contiguous())


def test_index_plan_positions_and_errors():
    index = relative_position_index((3, 4)).to(DEVICE)
    T = int(index.max()) + 1
    compact, compact_t, positions = index_plan(index, T)
    assert compact.dtype == torch.int16 and torch.equal(compact.long(), index)
    assert torch.equal(compact_t.long(), index.t())
    flat = index.reshape(-1)
    for t in range(T):
        want = torch.nonzero(flat == t).flatten()
        got = positions[t][positions[t] >= 0].long()
        assert torch.equal(got, want), t
    assert index_plan(index, T)[2] is positions  # cached
    assert index_plan(index.clone(), T)[2] is positions  # an equal index (per-block buffers) shares the plan
    other = index.flip(0).contiguous()
    assert not torch.equal(index_plan(other, T)[0].long(), index)  # a different one gets its own
    assert torch.equal(index_plan(other, T)[0].long(), other)
    with pytest.raises(ValueError, match=r"must be in \[0, 5\)"):
        index_plan(index.clone(), 5)


# ------------------------------------------------------------------------------------------------------
# Dispatch and input errors
# ------------------------------------------------------------------------------------------------------
def test_dispatch_names_and_priority():
    assert "triton" in A.ATTENTION_BACKENDS
    cuda = A.AUTO_PRIORITY["cuda"]
    assert cuda.index("triton") > cuda.index("sdpa")  # not measured yet: after sdpa
    assert "triton" not in A.AUTO_PRIORITY["cpu"]
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    assert A.resolve_attention_backend("triton", q) == "triton"
    if not CUDA:
        assert A.resolve_attention_backend("auto", q) == "sdpa"  # never the interpreter
        assert "triton" not in A.available_attention_backends("cpu")


def test_refusals(monkeypatch):
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: .*float16/bfloat16/float32"):
        attention_with_bias(q.double(), q.double(), q.double(), backend="triton")
    big = torch.randn(1, 2, 5, 136, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        attention_with_bias(big, big, big, backend="triton")
    if not CUDA:
        monkeypatch.setattr(A, "triton_interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors.*interpreter"):
            attention_with_bias(q, q, q, backend="triton")


@pytest.mark.parametrize(
    "table_shape,index_fn,exc,match",
    [
        ((30, 3), lambda i: i, ValueError, r"table must be \[T, H\] with H = 2"),
        ((30,), lambda i: i, ValueError, r"table must be \[T, H\]"),
        ((30, 2), lambda i: i.float(), TypeError, "index must be an int16/int32/int64"),
        ((30, 2), lambda i: i[:4], ValueError, r"index must be \[Nq, Nk\] = \[5, 5\]"),
        ((30, 2), lambda i: i + 28, ValueError, r"index values must be in \[0, 30\)"),
        ((30, 2), lambda i: i - 1, ValueError, r"index values must be in \[0, 30\)"),
    ],
)
def test_table_index_errors(table_shape, index_fn, exc, match):
    q = torch.randn(1, 2, 5, 16)
    index = torch.arange(25).reshape(5, 5) % 7
    with pytest.raises(exc, match=match):
        attention_with_rel_pos_bias(q, q, q, torch.randn(table_shape), index_fn(index), backend="triton")
    with pytest.raises(TypeError, match="table must be a floating-point"):
        attention_with_rel_pos_bias(q, q, q, torch.zeros(30, 2, dtype=torch.long), index, backend="math")


# ------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["table", "dense"])
def test_opcheck(mode):
    q, k, v, dout, table, index = _make(2, 2, 13, 16, seed=8)
    q, k, v, dout, table = (t.float() for t in (q, k, v, dout, table))
    bias = table[index].permute(2, 0, 1).contiguous() if mode == "dense" else None
    tab, idx = (table, index) if mode == "table" else (None, None)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    extra = (bias if bias is not None else tab).clone().requires_grad_()
    args = (*leaves, extra if mode == "dense" else None, extra if mode == "table" else None, idx, 0.25, False)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.beit_fast.attention_forward.default, args, test_utils=utils)
    out, lse = torch.ops.beit_fast.attention_forward(*args)
    bwd_args = (dout, q, k, v, out.detach(), lse, bias, tab, idx, 0.25, True, False)
    torch.library.opcheck(torch.ops.beit_fast.attention_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_block_without_graph_breaks():
    """A fine-tuning attention block (its own table) plus a shared (table, index), compiled with
    fullgraph=True (aot_eager on CPU, as the other ops' tests): one graph, the eager values and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = Attention(32, 2, window_size=(3, 4)).to(DEVICE)
    attn.attn_backend = "triton"
    shared = RelativePositionBias((3, 4), 2).to(DEVICE)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        shared.relative_position_bias_table.normal_()
    x = torch.randn(3, 13, 32, device=DEVICE)

    def f(x):
        return attn(x, (shared.relative_position_bias_table, shared.relative_position_index))

    results = []
    counter = CompileCounterWithBackend("aot_eager")
    for fn in (f, torch.compile(f, backend=counter, fullgraph=True)):
        attn.zero_grad(set_to_none=True)
        shared.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        results.append([out, xi.grad, attn.relative_position_bias_table.grad,
                        shared.relative_position_bias_table.grad, attn.qkv.weight.grad])
    assert counter.frame_count == 1
    for name, c, e in zip(["out", "dx", "own table", "shared table", "qkv"], results[1], results[0]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the autotuner runs on CUDA only")
def test_cuda_autotuned_beit_shape(monkeypatch):
    """BEiT-B's head dim and sequence at bf16 through the autotuner (every config valid on this card is
    benchmarked once): the flash-attention rule still holds for the chosen one."""
    monkeypatch.setattr(KA, "AUTOTUNE", True)
    q, k, v, dout, table, index = _make(4, 2, 197, 64, seed=9)
    _check(BF16, q=q, k=k, v=v, dout=dout, table=table, index=index)
