"""Fused linear + cross-entropy: Triton path (interpreter on CPU) vs the fp32 PyTorch reference, loss,
accuracy and every gradient, plus input checks and torch.compile (with ignored rows).

Every buffer the kernel driver allocates is pre-filled with NaN (``poison`` fixture). Small
``MAX_BLOCK_V`` / ``MAX_CHUNK_BYTES`` values are used where a test wants the multi-block row loop or
several row chunks.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import beit_fast.kernels.cross_entropy as ce_kernels
from beit_fast.ops import masked_linear_cross_entropy, masked_linear_cross_entropy_reference
from kernel_test_utils import DEVICE, PoisonedTorch, exact_fp32_reference, seed_for_current_test  # noqa: F401 (autouse fixture)

LOWP = (torch.float16, torch.bfloat16)
IGN = -100


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ce_kernels, "torch", PoisonedTorch(torch))


def _make(shape, D, V, dtype, ignore_frac=0.25, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else seed_for_current_test())
    hidden = torch.randn(*shape, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * (2.0 / D**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    # half the labels are the argmax of the logits, so the accuracy is far from 0 and checked for real
    predicted = F.linear(hidden.float(), weight.float(), b.float() if b is not None else None).argmax(-1)
    labels = torch.where(torch.rand(shape, generator=g) < 0.5, predicted, labels)
    if ignore_frac >= 1.0:
        labels.fill_(IGN)
    elif ignore_frac > 0:
        labels[torch.rand(shape, generator=g) < ignore_frac] = IGN
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return move(hidden), move(weight), move(b), move(labels)


def _run(fn, hidden, weight, bias, labels, reduction, grad_scale, need=(True, True, True)):
    leaves = [hidden.clone().requires_grad_(need[0]), weight.clone().requires_grad_(need[1]),
              bias.clone().requires_grad_(need[2]) if bias is not None else None]
    loss, acc = fn(leaves[0], leaves[1], leaves[2], labels, reduction)
    if any(t is not None and t.requires_grad for t in leaves):
        (loss * grad_scale.to(loss.device)).sum().backward()
    return loss.detach(), acc, [t.grad if t is not None else None for t in leaves]


def _triton(h, w, b, y, red):
    return masked_linear_cross_entropy(h, w, b, y, ignore_index=IGN, reduction=red, return_accuracy=True,
                                       backend="triton")


def _reference(h, w, b, y, red):
    return masked_linear_cross_entropy_reference(h, w, b, y, ignore_index=IGN, reduction=red, return_accuracy=True)


def _torch_lowp(h, w, b, y, red):
    """PyTorch's own low-precision pipeline (what autocast does): logits in the input dtype, loss in fp32."""
    D = h.shape[-1]
    logits = F.linear(h.reshape(-1, D), w, b).float()
    yy = y.reshape(-1)
    if red == "none":
        loss = F.cross_entropy(logits, yy, ignore_index=IGN, reduction="none").reshape(y.shape)
    else:
        loss = F.cross_entropy(logits, yy, ignore_index=IGN, reduction="sum")
        if red == "mean":
            loss = loss / (yy != IGN).sum().clamp(min=1)
    acc = ((logits.argmax(-1) == yy) & (yy != IGN)).sum() / (yy != IGN).sum().clamp(min=1)
    return loss, acc


def _grad_scale(reduction, shape):
    if reduction == "none":
        return torch.randn(shape)
    return torch.tensor(1.7)


def _close32(actual, expected, name):
    assert actual is not None and expected is not None, name
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=2e-5 * scale, msg=name)


def _lowp_close(actual, torch_lowp, ref32, name, dtype, out_dtype=None):
    assert actual.dtype == (out_dtype or dtype), (name, actual.dtype)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    ref32 = ref32.float()
    if ref32.numel() == 0:
        return
    ours = (actual.float() - ref32).abs().max().item()
    theirs = (torch_lowp.float() - ref32).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref32.abs().max().item()
    assert ours <= 2.0 * theirs + ulp, f"{name}: max error {ours:.3e} vs PyTorch {dtype} {theirs:.3e} (ulp {ulp:.1e})"


def _accuracy_ok(acc, acc_ref, hidden, weight, bias, labels, logit_err):
    """Accuracy may differ from the fp32 reference, and the reference from the accuracy computed here from
    fp32 logits, only through rows whose top-2 fp32 logits are within the logits error (near ties)."""
    D = hidden.shape[-1]
    logits = F.linear(hidden.reshape(-1, D).float(), weight.float(), bias.float() if bias is not None else None)
    y = labels.reshape(-1)
    counted = y != IGN
    n = max(1, int(counted.sum()))
    if logits.shape[0] == 0:
        assert acc.item() == 0.0
        return
    top2 = logits.topk(min(2, logits.shape[1]), dim=-1).values
    gap = top2[:, 0] - top2[:, -1]
    near_ties = int(((gap <= 2 * logit_err + 1e-6) & counted).sum())
    assert acc.dtype == torch.float32 and acc.dim() == 0 and not acc.requires_grad
    assert abs(acc.item() - acc_ref.item()) * n <= near_ties + 1e-3, (acc.item(), acc_ref.item(), near_ties)
    direct = int(((logits.argmax(-1) == y) & counted).sum()) / n
    assert abs(acc_ref.item() - direct) * n <= near_ties + 1e-3, (acc_ref.item(), direct, near_ties)


CASES = [
    # rows shape, D, V, MAX_BLOCK_V, MAX_CHUNK_BYTES (None = default)
    ((40,), 48, 300, 8192, None),           # single block row, one chunk
    ((37,), 40, 700, 256, None),            # V not a power of two, multi-block row loop
    ((3, 11), 24, 129, 8192, 16 * 129 * 4),  # [B, N, D] input, several chunks (16 rows) + a ragged one
    ((29,), 33, 517, 128, 7 * 517 * 4),      # odd everything, multi-block and chunks of 7 rows
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(case, reduction, monkeypatch):
    shape, D, V, block_v, chunk_bytes = case
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", block_v)
    if chunk_bytes is not None:
        monkeypatch.setattr(ce_kernels, "MAX_CHUNK_BYTES", chunk_bytes)
    h, w, b, y = _make(shape, D, V, torch.float32)
    gs = _grad_scale(reduction, shape)
    loss, acc, grads = _run(_triton, h, w, b, y, reduction, gs)
    rloss, racc, rgrads = _run(_reference, h, w, b, y, reduction, gs)
    assert loss.dtype == torch.float32 and loss.shape == rloss.shape
    _close32(loss, rloss, "loss")
    for name, a, r in zip(["hidden", "weight", "bias"], grads, rgrads):
        _close32(a, r, f"grad {name}")
    _accuracy_ok(acc, racc, h, w, b, y, logit_err=1e-5)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES[1:3])
def test_low_precision_error_bound(case, reduction, dtype, monkeypatch):
    shape, D, V, block_v, chunk_bytes = case
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", block_v)
    if chunk_bytes is not None:
        monkeypatch.setattr(ce_kernels, "MAX_CHUNK_BYTES", chunk_bytes)
    h, w, b, y = _make(shape, D, V, dtype)
    gs = _grad_scale(reduction, shape)
    loss, acc, grads = _run(_triton, h, w, b, y, reduction, gs)
    tloss, tacc, tgrads = _run(_torch_lowp, h, w, b, y, reduction, gs)
    h32, w32, b32 = h.float(), w.float(), b.float()
    rloss, racc, rgrads = _run(_reference, h32, w32, b32, y, reduction, gs)
    _lowp_close(loss, tloss, rloss, "loss", dtype, out_dtype=torch.float32)
    for name, a, t, r in zip(["hidden", "weight", "bias"], grads, tgrads, rgrads):
        _lowp_close(a, t, r, f"grad {name}", dtype)
    logit_err = (F.linear(h.reshape(-1, D), w, b).float() - F.linear(h32.reshape(-1, D), w32, b32)).abs().max()
    _accuracy_ok(acc, racc, h32, w32, b32, y, logit_err=logit_err.item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_all_rows_ignored_gives_zero_not_nan(reduction, backend):
    h, w, b, y = _make((20,), 16, 70, torch.float32, ignore_frac=1.0)
    fn = _triton if backend == "triton" else _reference
    loss, acc, grads = _run(fn, h, w, b, y, reduction, _grad_scale(reduction, (20,)))
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()
    assert acc.item() == 0.0
    for g in grads:
        assert g is not None and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_rows(reduction):
    h, w, b, y = _make((0,), 16, 70, torch.float32)
    loss, acc, grads = _run(_triton, h, w, b, y, reduction, _grad_scale(reduction, (0,)))
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction == "mean":
        assert loss.item() == 0.0
    assert acc.item() == 0.0
    assert grads[0].shape == (0, 16)
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0


def test_no_bias_and_partial_requires_grad():
    h, w, _, y = _make((30,), 24, 90, torch.float32, bias=False)
    for need in [(True, False, False), (False, True, False)]:
        loss, acc, grads = _run(_triton, h, w, None, y, "mean", torch.tensor(1.0), need=need + (False,))
        rloss, racc, rgrads = _run(_reference, h, w, None, y, "mean", torch.tensor(1.0), need=need + (False,))
        _close32(loss, rloss, "loss")
        _accuracy_ok(acc, racc, h, w, None, y, logit_err=1e-5)
        for a, r, n in zip(grads, rgrads, need):
            if n:
                _close32(a, r, "grad")
            else:
                assert a is None


def test_no_grad_mode_and_default_return():
    h, w, b, y = _make((25,), 24, 90, torch.float32)
    with torch.no_grad():
        loss = masked_linear_cross_entropy(h.requires_grad_(), w, b, y, backend="triton")
    assert not isinstance(loss, tuple) and not loss.requires_grad
    _close32(loss, masked_linear_cross_entropy_reference(h, w, b, y), "loss")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the eager label check is for CPU tensors only")
def test_bad_label_cpu_raises_both_backends():
    h, w, b, y = _make((10,), 16, 50, torch.float32, ignore_frac=0)
    y[3] = 50
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 50\).*found 50"):
            masked_linear_cross_entropy(h, w, b, y, backend=backend)
    y[3] = -1
    with pytest.raises(ValueError, match="found -1"):
        masked_linear_cross_entropy(h, w, b, y, backend="triton")


def test_kernel_marks_out_of_range_label_rows_nan():
    """What runs on CUDA (no host-side check): the bad row's loss and gradient are NaN, others exact."""
    h, w, b, y = _make((12,), 16, 50, torch.float32, ignore_frac=0)
    y[4] = 77
    y[7] = IGN
    loss_rows, correct, gh, gw, gb = ce_kernels.linear_ce_chunked(h, w, b, y, IGN, True, False, False)
    assert torch.isnan(loss_rows[4]) and torch.isnan(gh[4]).all()
    keep = torch.ones(12, dtype=torch.bool, device=h.device)
    keep[4] = False
    ref = F.cross_entropy(F.linear(h, w, b), torch.where(keep, y, IGN), ignore_index=IGN, reduction="none")
    _close32(loss_rows[keep], ref[keep], "loss rows")
    assert loss_rows[7] == 0 and torch.count_nonzero(gh[7]) == 0 and correct[7] == 0


def test_noncontiguous_inputs():
    h, w, b, y = _make((6, 5), 24, 90, torch.float32)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = w.t().contiguous().t()
    y_nc = y.t().contiguous().t()
    assert not (h_nc.is_contiguous() or y_nc.is_contiguous())
    loss, acc = masked_linear_cross_entropy(h_nc, w_nc, b, y_nc, reduction="none", return_accuracy=True, backend="triton")
    rloss, racc = masked_linear_cross_entropy_reference(h, w, b, y, reduction="none", return_accuracy=True)
    _close32(loss, rloss, "loss")
    assert loss.shape == (6, 5)
    _accuracy_ok(acc, racc, h, w, b, y, logit_err=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_input_checks(backend):
    h, w, b, y = _make((8,), 16, 40, torch.float32)
    call = lambda *a, **k: masked_linear_cross_entropy(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"hidden must be \[M, D\] or \[B, N, D\].*\(16,\)"):
        call(h[0], w, b, y)
    with pytest.raises(ValueError, match=r"weight must be \[V, D\] with D = 16.*\(40, 15\)"):
        call(h, w[:, :15], b, y)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        call(h, w, b[:3], y)
    with pytest.raises(ValueError, match=r"labels shape \(7,\) does not match"):
        call(h, w, b, y[:7])
    with pytest.raises(TypeError, match="int64"):
        call(h, w, b, y.int())
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16"):
        call(h, w.bfloat16(), b, y)
    with pytest.raises(TypeError, match="float64"):
        call(h.double(), w.double(), b.double(), y)
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(h, w, b, y, reduction="avg")
    with pytest.raises(ValueError, match="one device"):
        call(h, w.to("meta"), b, y)


# ------------------------------------------------------------------------------------------------
# torch.compile (with ignored rows: a fused loss once went silently wrong there under compile)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_with_ignored_rows(reduction, monkeypatch):
    monkeypatch.setattr(ce_kernels, "MAX_CHUNK_BYTES", 8 * 70 * 4)
    h, w, b, y = _make((3, 9), 16, 70, torch.float32, ignore_frac=0.4)
    gs = _grad_scale(reduction, (3, 9))

    def f(h, w, b, y, red):
        return masked_linear_cross_entropy(h, w, b, y, ignore_index=IGN, reduction=red, return_accuracy=True,
                                           backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, acc, grads = _run(compiled, h, w, b, y, reduction, gs)
    rloss, racc, rgrads = _run(_reference, h, w, b, y, reduction, gs)
    _close32(loss, rloss, "loss")
    for name, a, r in zip(["hidden", "weight", "bias"], grads, rgrads):
        _close32(a, r, f"grad {name}")
    _accuracy_ok(acc, racc, h, w, b, y, logit_err=1e-5)


def test_torch_compile_inductor_with_ignored_rows():
    h, w, b, y = _make((2, 7), 16, 50, torch.float32, ignore_frac=0.4)

    def f(h, w, b, y):
        loss, acc = masked_linear_cross_entropy(h, w, b, y, return_accuracy=True, backend="triton")
        return loss * 2.0, acc

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss, acc = compiled(*leaves, y)
    loss.backward()
    rleaves = [t.clone().requires_grad_() for t in (h, w, b)]
    rloss, racc = masked_linear_cross_entropy_reference(*rleaves, y, return_accuracy=True)
    (rloss * 2.0).backward()
    _close32(loss, rloss * 2.0, "loss")
    for a, r in zip(leaves, rleaves):
        _close32(a.grad, r.grad, "grad")
    _accuracy_ok(acc, racc, h, w, b, y, logit_err=1e-5)


def test_opcheck():
    h, w, b, y = _make((9,), 16, 40, torch.float32)
    for red in ("mean", "none"):
        args = (h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), y, IGN, red,
                True, True, True)
        torch.library.opcheck(torch.ops.beit_fast.masked_linear_cross_entropy.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
