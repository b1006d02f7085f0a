"""beit_fast.model.modules: the nn.Module wrappers give the results of the plain PyTorch layers they replace."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_fast.model.beit import Attention, PatchEmbed, RelativePositionBias
from beit_fast.model.modules import FusedLinearCrossEntropyLoss, PatchEmbedMask, RelPosBiasAttention

RTOL, ATOL = 1e-5, 1e-6


def leaf(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_()


def grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


# --------------------------------------------------------------------------------------------------
# FusedLinearCrossEntropyLoss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_matches_linear_plus_cross_entropy(reduction):
    h, w, b = leaf(2, 7, 16, seed=1), leaf(40, 16, seed=2, scale=0.3), leaf(40, seed=3)
    labels = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = -1  # a custom ignore_index
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 40), labels.reshape(-1), ignore_index=-1,
                          reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(2, 7)
    (ref.sum() * 1.5).backward()
    ref_grads = grads(h, w, b)
    loss_fn = FusedLinearCrossEntropyLoss(ignore_index=-1, reduction=reduction)
    loss = loss_fn(h, w, b, labels)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    (loss.sum() * 1.5).backward()
    for got, exp in zip(grads(h, w, b), ref_grads):
        torch.testing.assert_close(got, exp, rtol=RTOL, atol=ATOL)


def test_fused_loss_accuracy_no_bias_and_errors():
    h, w = leaf(12, 8, seed=5), leaf(10, 8, seed=6)
    labels = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(7))
    loss, acc = FusedLinearCrossEntropyLoss(return_accuracy=True)(h, w, None, labels)
    logits = h @ w.T
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), rtol=RTOL, atol=ATOL)
    assert acc.item() == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        FusedLinearCrossEntropyLoss(backend="cuda")


def test_fused_loss_follows_autocast():
    h, w, b = leaf(9, 16, seed=8), leaf(30, 16, seed=9), leaf(30, seed=10)
    labels = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FusedLinearCrossEntropyLoss(backend="reference")(h, w, b, labels)
    assert loss.dtype == torch.float32
    # the inputs were cast to bf16 first; the reference op then forms fp32 logits from those bf16 values
    bf = [t.detach().bfloat16().float() for t in (h, w, b)]
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(*bf), labels), rtol=RTOL, atol=ATOL)
    assert (loss - F.cross_entropy(F.linear(h, w, b), labels)).abs() > 1e-4  # not the fp32 result
    loss.backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0  # reaches the fp32 weights


# --------------------------------------------------------------------------------------------------
# PatchEmbedMask
# --------------------------------------------------------------------------------------------------
def test_patch_embed_mask_matches_patch_embed_and_blend():
    torch.manual_seed(0)
    ref = PatchEmbed(32, 8, 3, 24)
    module = PatchEmbedMask(32, 8, 3, 24)
    module.load_state_dict(ref.state_dict(), strict=True)  # proj.weight / proj.bias
    x = leaf(2, 3, 32, 32, seed=1)
    token = leaf(1, 1, 24, seed=2)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.4
    e = ref(x)
    wts = mask.unsqueeze(-1).float()
    expected = e * (1 - wts) + token * wts
    cotangent = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(4))
    (expected * cotangent).sum().backward()
    ref_grads = grads(x, token, ref.proj.weight, ref.proj.bias)
    out = module(x, mask, token)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    (out * cotangent).sum().backward()
    for got, exp in zip(grads(x, token, module.proj.weight, module.proj.bias), ref_grads):
        torch.testing.assert_close(got, exp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(module(x), e, rtol=RTOL, atol=ATOL)  # no mask: a plain patch embedding
    assert module(x, mask.reshape(2, 4, 4), token).shape == (2, 16, 24)  # [B, H/P, W/P] masks too


def test_patch_embed_mask_from_conv_shares_parameters_and_checks_inputs():
    conv = nn.Conv2d(3, 16, 8, stride=8)
    module = PatchEmbedMask.from_conv(conv)
    assert module.proj is conv and module.proj.weight.device.type == "cpu"
    assert module(torch.randn(1, 3, 16, 24)).shape == (1, 6, 16)  # no img_size: any multiple of P
    with pytest.raises(ValueError, match="multiple of the patch size"):
        module(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="patch projection"):
        PatchEmbedMask.from_conv(nn.Conv2d(3, 16, 8, stride=4))
    fixed = PatchEmbedMask(32, 8, 3, 16)
    with pytest.raises(ValueError, match="does not match"):
        fixed(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="mask_token"):
        fixed(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# RelPosBiasAttention
# --------------------------------------------------------------------------------------------------
def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_rel_pos_bias_attention_matches_timm_attention(backend):
    timm_beit = pytest.importorskip("timm.models.beit")
    torch.manual_seed(0)
    ref = timm_beit.Attention(32, num_heads=4, qkv_bias=True, window_size=(4, 4))
    _perturb(ref, 1)
    module = RelPosBiasAttention(32, 4, window_size=(4, 4), backend=backend)
    module.load_state_dict(ref.state_dict(), strict=True)  # timm's names, index not persistent in either
    x = leaf(2, 17, 32, seed=2)
    shared = leaf(4, 17, 17, seed=3)
    cotangent = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    expected = ref(x, shared_rel_pos_bias=shared)
    (expected * cotangent).sum().backward()
    ref_grads = grads(x, shared, ref.qkv.weight, ref.q_bias, ref.v_bias, ref.relative_position_bias_table)
    out = module(x, shared)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    (out * cotangent).sum().backward()
    got = grads(x, shared, module.qkv.weight, module.q_bias, module.v_bias, module.relative_position_bias_table)
    for g_, e_ in zip(got, ref_grads):
        torch.testing.assert_close(g_, e_, rtol=RTOL, atol=ATOL)


def test_rel_pos_bias_attention_matches_our_reference_attention():
    torch.manual_seed(0)
    ref = Attention(32, 4)
    _perturb(ref, 4)
    bias_module = RelativePositionBias((4, 4), 4)
    _perturb(bias_module, 5)
    module = RelPosBiasAttention(32, 4)  # no window: the bias comes from outside, like pretraining's
    module.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=True)
    x = leaf(3, 17, 32, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(module(x, bias_module()), ref(x, bias_module()), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="attention backend"):
        RelPosBiasAttention(32, 4, backend="flash")
