"""Fused patch embedding + mask-token substitution: Triton kernel (under the interpreter on CPU) vs the
PyTorch reference, forward and every gradient, plus input checks and torch.compile.

Every output buffer the kernel launchers allocate is pre-filled with NaN (``poison`` fixture), so an
element a kernel fails to write makes the comparison fail.
"""
from __future__ import annotations


import pytest
import torch

import beit_fast.kernels.patch_embed as pe_kernels
from beit_fast.ops import patch_embed_mask, patch_embed_mask_reference
from kernel_test_utils import DEVICE, PoisonedTorch, exact_fp32_reference, seed_for_current_test  # noqa: F401 (autouse fixture)

LOWP = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(pe_kernels, "torch", PoisonedTorch(torch))


def _make(B, C, H, W, D, P, dtype, mask_kind="random", seed=None, bias=True):
    g = torch.Generator().manual_seed(seed if seed is not None else seed_for_current_test())
    N = (H // P) * (W // P)
    pixels = torch.randn(B, C, H, W, generator=g).to(dtype)
    weight = (torch.randn(D, C, P, P, generator=g) * (1.0 / (C * P * P) ** 0.5)).to(dtype)
    b = (torch.randn(D, generator=g) * 0.5).to(dtype) if bias else None
    token = torch.randn(D, generator=g).to(dtype)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "all":
        mask = torch.ones(B, N, dtype=torch.bool)
    elif mask_kind == "nothing":
        mask = torch.zeros(B, N, dtype=torch.bool)
    else:
        mask = torch.rand(B, N, generator=g) < 0.4
        if B > 1:
            mask[0] = True  # one fully masked image: whole tiles skip the GEMM
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return move(pixels), move(weight), move(b), move(token), move(mask)


def _run(fn, pixels, weight, bias, token, mask, grad_out, need_pixels=True):
    leaves = [pixels.clone().requires_grad_(need_pixels), weight.clone().requires_grad_(),
              bias.clone().requires_grad_() if bias is not None else None, token.clone().requires_grad_()]
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3], mask)
    out.backward(grad_out.to(out.device, out.dtype))
    grads = [t.grad if t is not None else None for t in leaves]
    return out.detach(), grads


def _triton(*a):
    return patch_embed_mask(*a, backend="triton")


def _reference(*a):
    return patch_embed_mask_reference(*a)


def _fp32_close(actual, expected, name):
    assert actual is not None and expected is not None, name
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=2e-5 * scale, msg=name)


def _lowp_close(actual, torch_lowp, ref32, name, dtype):
    """Error of ours vs the fp32 reference no worse than 2x PyTorch's own error at this precision,
    plus one ulp of the largest value."""
    assert actual.dtype == dtype, (name, actual.dtype)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    ref32 = ref32.float()
    ours = (actual.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    theirs = (torch_lowp.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (ref32.abs().max().item() if ref32.numel() else 0.0)
    assert ours <= 2.0 * theirs + ulp, f"{name}: max error {ours:.3e} vs PyTorch {dtype} {theirs:.3e} (ulp {ulp:.1e})"


SHAPES = [
    # B, C, H, W, D, P
    (2, 3, 32, 32, 80, 8),     # D not a multiple of the block
    (3, 3, 24, 40, 100, 4),    # K = 48 (not a multiple of BLOCK_K), N = 60, M = 180 (odd tiles)
    (1, 3, 32, 32, 64, 16),    # the real patch size (K = 768); D a multiple of every D block
    (2, 1, 12, 20, 33, 4),     # one channel, odd D
]


# ------------------------------------------------------------------------------------------------
# forward + backward vs reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["random", "none"])
def test_fp32_matches_reference(shape, mask_kind):
    B, C, H, W, D, P = shape
    args = _make(B, C, H, W, D, P, torch.float32, mask_kind)
    N = (H // P) * (W // P)
    grad_out = torch.randn(B, N, D)
    out, grads = _run(_triton, *args, grad_out)
    ref, ref_grads = _run(_reference, *args, grad_out)
    assert out.shape == (B, N, D) and out.dtype == torch.float32
    _fp32_close(out, ref, "out")
    for name, a, r in zip(["pixels", "weight", "bias"], grads, ref_grads):
        _fp32_close(a, r, f"grad {name}")
    if mask_kind == "none":
        assert grads[3] is None and ref_grads[3] is None  # mask_token unused
    else:
        _fp32_close(grads[3], ref_grads[3], "grad mask_token")
        # masked rows are the token, bit for bit
        tok = args[3]
        assert torch.equal(out[args[4]], tok.expand_as(out[args[4]]))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_low_precision_error_bound(dtype, shape):
    B, C, H, W, D, P = shape
    args = _make(B, C, H, W, D, P, dtype)
    N = (H // P) * (W // P)
    grad_out = torch.randn(B, N, D).to(dtype)
    out, grads = _run(_triton, *args, grad_out)
    t_out, t_grads = _run(_reference, *args, grad_out)  # PyTorch at this precision
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in args]
    r_out, r_grads = _run(_reference, *args32, grad_out.float())  # fp32 reference, same inputs
    _lowp_close(out, t_out, r_out, "out", dtype)
    for name, a, t, r in zip(["pixels", "weight", "bias", "mask_token"], grads, t_grads, r_grads):
        _lowp_close(a, t, r, f"grad {name}", dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", LOWP)
def test_fp32_mask_token_under_low_precision_pixels(backend, dtype):
    """The model keeps its mask token in fp32 under autocast: the output stays in the pixels' dtype and
    the token's gradient, a sum over every masked position, comes back in fp32 (not rounded to bf16, which
    would lose ~3 significant digits of a sum over the whole batch; seen on an H200 in the bf16 step)."""
    pixels, weight, bias, _, mask = _make(4, 3, 32, 32, 64, 8, dtype, seed=3)
    token32 = torch.randn(64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grad_out = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(5))
    out, grads = _run(lambda *a: patch_embed_mask(*a, backend=backend), pixels, weight, bias, token32, mask,
                      grad_out)
    assert out.dtype == dtype
    assert grads[3].dtype == torch.float32
    g = grad_out.to(DEVICE, dtype).float()  # the upstream gradient as the op receives it
    expected = g[mask].sum(0)
    torch.testing.assert_close(grads[3], expected, rtol=1e-5, atol=1e-5)
    # masked rows hold the token rounded once to the output dtype (within one ulp: Triton's CPU
    # interpreter truncates fp32 -> bf16 where the GPU rounds to nearest)
    n = int(mask.sum())
    torch.testing.assert_close(out[mask].float(), token32.expand(n, -1), rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("mask_kind", ["all", "nothing"])
def test_all_or_no_rows_masked(mask_kind):
    args = _make(2, 3, 16, 24, 40, 8, torch.float32, mask_kind)
    grad_out = torch.randn(2, 6, 40)
    out, grads = _run(_triton, *args, grad_out)
    ref, ref_grads = _run(_reference, *args, grad_out)
    _fp32_close(out, ref, "out")
    for name, a, r in zip(["pixels", "weight", "bias", "mask_token"], grads, ref_grads):
        _fp32_close(a, r, f"grad {name}")
    if mask_kind == "all":
        assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0
        assert torch.count_nonzero(grads[0]) == 0
    else:
        assert torch.count_nonzero(grads[3]) == 0


def test_empty_batch():
    args = _make(0, 3, 16, 16, 24, 8, torch.float32)
    args = (args[0], args[1], args[2], args[3], torch.zeros(0, 4, dtype=torch.bool, device=DEVICE))
    out, grads = _run(_triton, *args, torch.randn(0, 4, 24))
    assert out.shape == (0, 4, 24)
    assert grads[0].shape == (0, 3, 16, 16)
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0
    assert torch.count_nonzero(grads[3]) == 0


def test_no_bias_and_pixels_without_grad():
    args = _make(2, 3, 16, 16, 48, 8, torch.float32, bias=False)
    grad_out = torch.randn(2, 4, 48)
    out, grads = _run(_triton, *args, grad_out, need_pixels=False)
    ref, ref_grads = _run(_reference, *args, grad_out, need_pixels=False)
    _fp32_close(out, ref, "out")
    assert grads[0] is None and grads[2] is None
    _fp32_close(grads[1], ref_grads[1], "grad weight")
    _fp32_close(grads[3], ref_grads[3], "grad mask_token")


def test_masked_patches_are_never_read():
    """Masked patches skip the GEMM: NaN pixels there must not reach the output or the weight
    gradient (the reference formula x*(1-w) + t*w would propagate them, documented difference)."""
    B, C, H, W, D, P = 2, 3, 16, 24, 40, 8
    pixels, weight, bias, token, mask = _make(B, C, H, W, D, P, torch.float32)
    mask[1, 0] = True
    mask[1, 1] = False
    poisoned = pixels.clone()
    NPW = W // P
    for b, n in mask.nonzero().tolist():
        ph, pw = divmod(n, NPW)
        poisoned[b, :, ph * P:(ph + 1) * P, pw * P:(pw + 1) * P] = float("nan")
    clean = torch.where(torch.isnan(poisoned), torch.zeros_like(poisoned), poisoned)
    grad_out = torch.randn(B, (H // P) * NPW, D)
    out, grads = _run(_triton, poisoned, weight, bias, token, mask, grad_out, need_pixels=False)
    ref, ref_grads = _run(_reference, clean, weight, bias, token, mask, grad_out, need_pixels=False)
    _fp32_close(out, ref, "out")
    _fp32_close(grads[1], ref_grads[1], "grad weight")
    _fp32_close(grads[2], ref_grads[2], "grad bias")


def test_noncontiguous_inputs_and_3d_mask_and_beit_token_shape():
    B, C, H, W, D, P = 2, 3, 16, 16, 40, 8
    pixels, weight, bias, token, mask = _make(B, C, H, W, D, P, torch.float32)
    px_nc = pixels.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, channels strided
    assert not px_nc.is_contiguous()
    w_nc = weight.transpose(2, 3).contiguous().transpose(2, 3)
    out = patch_embed_mask(px_nc, w_nc, bias, token.view(1, 1, D), mask.view(B, H // P, W // P), backend="triton")
    ref = patch_embed_mask_reference(pixels, weight, bias, token, mask)
    _fp32_close(out, ref, "out")


def test_reference_backend_is_the_reference():
    args = _make(2, 3, 16, 16, 24, 8, torch.float32)
    a = patch_embed_mask(*args, backend="reference")
    b = patch_embed_mask_reference(*args)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_input_checks(backend):
    px, w, b, t, m = _make(2, 3, 16, 16, 24, 8, torch.float32)
    call = lambda *a: patch_embed_mask(*a, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\(3, 16, 16\)"):
        call(px[0], w, b, t, m)
    with pytest.raises(ValueError, match=r"weight must be \[D, C, P, P\]"):
        call(px, w[:, :2], b, t, m)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        call(px[..., :12], w, b, t, m)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
        call(px, w, b[:5], t, m)
    with pytest.raises(ValueError, match="mask_token"):
        call(px, w, b, t[:5], m)
    with pytest.raises(ValueError, match="bool_masked_pos must have shape"):
        call(px, w, b, t, m[:, :3])
    with pytest.raises(TypeError, match="bool tensor"):
        call(px, w, b, t, m.float())
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        call(px, w.half(), b, t, m)
    with pytest.raises(TypeError, match="float64"):
        call(px.double(), w.double(), b.double(), t.double(), m)
    with pytest.raises(ValueError, match="one device"):
        call(px, w.to("meta"), b, t, m)
    with pytest.raises(TypeError, match="mask_token must have the dtype of pixels"):
        call(px, w, b, t.half(), m)
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(px.cpu().numpy(), w, b, t, m)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    B, C, H, W, D, P = 2, 3, 16, 24, 40, 8
    pixels, weight, bias, token, mask = _make(B, C, H, W, D, P, torch.float32)
    grad_out = torch.randn(B, 6, D)

    def f(px, w, b, t, m):
        return patch_embed_mask(px, w, b, t, m, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, pixels, weight, bias, token, mask, grad_out)
    ref, ref_grads = _run(_reference, pixels, weight, bias, token, mask, grad_out)
    _fp32_close(out, ref, "out")
    for name, a, r in zip(["pixels", "weight", "bias", "mask_token"], grads, ref_grads):
        _fp32_close(a, r, f"grad {name}")


def test_opcheck():
    """torch.library's own consistency checks of the registration (schema, fake, autograd)."""
    pixels, weight, bias, token, mask = _make(1, 3, 16, 16, 24, 8, torch.float32)
    args = (pixels.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), token.requires_grad_(), mask)
    torch.library.opcheck(torch.ops.beit_fast.patch_embed_mask.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
