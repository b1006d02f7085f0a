"""apply_beit_fast_to_timm: the patched timm Beit gives the unpatched model's results and keeps timm's
contract (the fused_attn flag, attention-map extraction, signatures)."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

timm_beit = pytest.importorskip("timm.models.beit")

import beit_fast.interop.timm as timm_patch  # noqa: E402
from beit_fast.interop import apply_beit_fast_to_timm, beit_fast_patch_info, revert_beit_fast  # noqa: E402
from kernel_test_utils import assert_close_rel  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6  # fp32; only the attention kernel differs
REL = 1e-5  # the parity tests: max error <= REL x max |timm's value|, tensor by tensor


def timm_model(**kw) -> torch.nn.Module:
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, init_values=0.1,
                use_abs_pos_emb=False, use_rel_pos_bias=True)
    base.update(kw)
    torch.manual_seed(0)
    model = timm_beit.Beit(**base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial bias tables, LayerScale and head (timm zero/0.001-initialises them)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.train()


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 2, 4])


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("rel_pos", ["per_block", "shared", "both"])
def test_logits_and_gradients_match_unpatched(attention, rel_pos):
    kw = {"per_block": {}, "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
          "both": dict(use_shared_rel_pos_bias=True)}[rel_pos]
    ref_model = timm_model(**kw)
    model = apply_beit_fast_to_timm(copy.deepcopy(ref_model), attention=attention)
    assert len(beit_fast_patch_info(model)["replaced"]["beit.Attention.forward -> attention_with_bias"]) == 2
    x, y = batch()
    ref_logits, ref_grads = loss_and_grads(ref_model, x, y)
    logits, grads = loss_and_grads(model, x, y)
    assert_close_rel(logits, ref_logits, REL, "logits")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], REL, name)
    assert any("relative_position_bias_table" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_timm_eager_attention_also_matches():
    """timm's non-fused path (q * scale @ k^T + biases) against the patched fused one."""
    ref_model = timm_model()
    model = apply_beit_fast_to_timm(copy.deepcopy(ref_model), attention="math")
    for blk in ref_model.blocks:
        blk.attn.fused_attn = False
    x, y = batch()
    ref_logits, ref_grads = loss_and_grads(ref_model, x, y)
    logits, grads = loss_and_grads(model, x, y)
    assert_close_rel(logits, ref_logits, REL, "logits")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], REL, name)


def test_activation_checkpointing_and_revert():
    ref_model = timm_model()
    model = copy.deepcopy(ref_model)
    apply_beit_fast_to_timm(model, activation_checkpointing=True)
    assert model.grad_checkpointing is True
    x, y = batch()
    ref_logits, ref_grads = loss_and_grads(ref_model, x, y)
    logits, grads = loss_and_grads(model, x, y)
    assert_close_rel(logits, ref_logits, REL, "logits")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], REL, name)

    revert_beit_fast(model)
    assert model.grad_checkpointing is False
    assert beit_fast_patch_info(model) is None
    for mod in model.modules():
        assert "forward" not in mod.__dict__ and "_beit_fast_attention" not in mod.__dict__
    logits, grads = loss_and_grads(model, x, y)
    assert torch.equal(logits, ref_logits)  # the class's own forward again, bit for bit
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_patch_is_per_instance_and_leaves_checkpointing_alone_by_default():
    a, b = timm_model(), timm_model()
    b.set_grad_checkpointing(True)
    apply_beit_fast_to_timm(b)
    assert b.grad_checkpointing is True  # False means "do not touch", not "switch off"
    assert "forward" in b.blocks[0].attn.__dict__ and "forward" not in a.blocks[0].attn.__dict__
    assert type(a.blocks[0].attn).forward is timm_beit.Attention.forward
    assert list(a.state_dict()) == list(b.state_dict())


def test_attention_dropout_falls_back_in_training():
    ref_model = timm_model(attn_drop_rate=0.3)
    model = apply_beit_fast_to_timm(copy.deepcopy(ref_model))
    x, _ = batch()
    torch.manual_seed(3)
    ref = ref_model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), ref)
    model.eval(), ref_model.eval()
    with torch.no_grad():  # in eval the fused path runs (no dropout)
        torch.testing.assert_close(model(x), ref_model(x), rtol=RTOL, atol=ATOL)


def test_unknown_types_are_refused():
    transformers = pytest.importorskip("transformers")
    vit = pytest.importorskip("timm.models.vision_transformer")
    hf = transformers.BeitModel(transformers.BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, image_size=32, patch_size=8))
    for obj in (torch.nn.Linear(2, 2), hf,
                vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)):
        with pytest.raises(TypeError, match=type(obj).__name__) as info:
            apply_beit_fast_to_timm(obj)
        assert "timm.models.beit.Beit" in str(info.value)
    with pytest.raises(ValueError, match="attention"):
        apply_beit_fast_to_timm(timm_model(), attention="flash")


def _count_fused_attention_calls(monkeypatch) -> list:
    calls = []
    real = timm_patch.attention_with_bias
    monkeypatch.setattr(timm_patch, "attention_with_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fused_attn_flag_keeps_its_meaning(monkeypatch):
    """The patch replaces timm's fused path only: a block with fused_attn=False runs timm's eager attention,
    bit for bit, and timm's attention-map extraction (hooks on attn_drop) sees the maps."""
    from timm.utils import AttentionExtract

    calls = _count_fused_attention_calls(monkeypatch)
    ref_model = timm_model().eval()
    for blk in ref_model.blocks:
        blk.attn.fused_attn = False
    model = apply_beit_fast_to_timm(copy.deepcopy(ref_model))
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x), ref_model(x))
        maps = AttentionExtract(model, method="hook")(x)
        ref_maps = AttentionExtract(ref_model, method="hook")(x)
    assert not calls
    assert list(maps) == ["blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop"] == list(ref_maps)
    for name in maps:
        assert maps[name].shape == (3, 2, 17, 17) and torch.equal(maps[name], ref_maps[name])
    model.blocks[0].attn.fused_attn = True  # per block, at any time
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=RTOL, atol=ATOL)
    assert len(calls) == 1


def test_signature_is_timms():
    model = apply_beit_fast_to_timm(timm_model())
    attn = model.blocks[0].attn
    assert "forward" in attn.__dict__
    assert inspect.signature(attn.forward) == inspect.signature(timm_beit.Attention.forward.__get__(attn))
    assert attn.forward.__name__ == "forward" and attn.forward.__doc__ == timm_beit.Attention.forward.__doc__
