"""apply_beit_fast_to_hf: the patched transformers BEiT models give the unpatched models' results.

Tiny configs (hidden 32, 2 layers, 32x32 images, 8x8 patches, vocab 50), random weights, fp32 on CPU.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel  # noqa: E402

from beit_fast.interop import apply_beit_fast_to_hf, beit_fast_patch_info, revert_beit_fast  # noqa: E402

B, N, V = 3, 16, 50
# fp32 tolerances: the fused paths reorder a few reductions (SDPA, the fused loss); nothing else differs
RTOL, ATOL = 1e-5, 1e-6


def hf_config(**kw) -> BeitConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, vocab_size=V, layer_scale_init_value=0.1, drop_path_rate=0.0, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BeitConfig(**base)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-trivial weights everywhere (HF zero-initialises tokens and bias tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def mim_model(**kw) -> BeitForMaskedImageModeling:
    torch.manual_seed(0)
    cfg = hf_config(use_mask_token=True, use_shared_relative_position_bias=True, **kw)
    return perturb_(BeitForMaskedImageModeling(cfg)).train()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.4
    mask[:, 0] = True  # at least one masked patch per image
    tokens = torch.randint(0, V, (B, N), generator=g)
    return x, mask, tokens


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("variant", ["shared", "per_layer_abs_pos"])
def test_mim_loss_and_gradients_match_unpatched(attention, variant):
    kw = {} if variant == "shared" else dict(use_relative_position_bias=True, use_absolute_position_embeddings=True)
    ref_model = mim_model(**kw)
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention=attention)
    x, mask, tokens = batch()
    labels = tokens[mask]
    ref, ref_grads = loss_and_grads(ref_model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    out, grads = loss_and_grads(model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    assert out.logits is None
    assert_grads_close(grads, ref_grads)
    # the mask token, the bias tables and the head all get their gradients through the fused ops
    for name in ("beit.embeddings.mask_token", "lm_head.weight"):
        assert grads[name].abs().sum() > 0
    assert any("relative_position_bias_table" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_mim_masked_only_loss_is_hf_formula_and_no_full_logits():
    model = mim_model()
    x, mask, tokens = batch(1)
    labels = tokens[mask]
    labels[::4] = -100  # ignored, as by HF's CrossEntropyLoss
    with torch.no_grad():
        ref_logits = model(pixel_values=x, bool_masked_pos=mask).logits  # unpatched: [B, N, V]
    expected = F.cross_entropy(ref_logits[mask], labels)  # HF's own loss formula, ignore_index -100

    apply_beit_fast_to_hf(model)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = model(pixel_values=x, bool_masked_pos=mask, labels=labels)
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    assert out.logits is None and not head_calls
    # what autograd keeps: the masked rows' logits [M, V] at most, never HF's [B, N, V]
    m = int(mask.sum())
    vocab_sized = [s for s in shapes if V in s]
    assert (m, V) in vocab_sized
    assert all(math.prod(s) < B * N * V for s in vocab_sized), vocab_sized

    # a [B, N] token grid gives the same loss; return_logits adds HF's full logits
    grid = tokens.masked_fill(~mask, 0)
    grid[mask] = labels
    out2 = model(pixel_values=x, bool_masked_pos=mask, labels=grid, return_logits=True)
    torch.testing.assert_close(out2.loss, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out2.logits, ref_logits, rtol=RTOL, atol=ATOL)
    assert len(head_calls) == 1


def test_mim_return_conventions():
    model = apply_beit_fast_to_hf(mim_model().eval(), return_logits=False)
    x, mask, tokens = batch(2)
    labels = tokens[mask]
    with torch.no_grad():
        tup = model(pixel_values=x, bool_masked_pos=mask, labels=labels, return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].dim() == 0
        tup = model(pixel_values=x, bool_masked_pos=mask, labels=labels, return_dict=False, return_logits=True)
        assert len(tup) == 2 and tup[1].shape == (B, N, V)
        # no labels: HF's forward (full logits, no loss), with the fused attention and embedding underneath
        out = model(pixel_values=x, bool_masked_pos=mask)
        ref = revert_beit_fast(copy.deepcopy(model))(pixel_values=x, bool_masked_pos=mask)
    assert out.loss is None
    torch.testing.assert_close(out.logits, ref.logits, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="one token per masked patch"):
        model(pixel_values=x, bool_masked_pos=mask, labels=labels[:-1])


def test_all_labels_ignored_gives_zero_not_nan():
    model = apply_beit_fast_to_hf(mim_model())
    x, mask, _ = batch()
    labels = torch.full((int(mask.sum()),), -100)
    out = model(pixel_values=x, bool_masked_pos=mask, labels=labels)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_classification_logits_loss_and_gradients_match(mean_pooling):
    torch.manual_seed(0)
    cfg = hf_config(num_labels=5, use_relative_position_bias=True, use_mean_pooling=mean_pooling)
    ref_model = perturb_(BeitForImageClassification(cfg)).train()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention="math")
    info = beit_fast_patch_info(model)
    assert info["options"]["fused_loss"] is None  # nothing to fuse in a 5-way classifier
    assert len(info["replaced"]["BeitRelativePositionBias.forward -> cached-index gather"]) == 2
    x, _, _ = batch()
    y = torch.tensor([0, 3, 4])
    ref, ref_grads = loss_and_grads(ref_model, pixel_values=x, labels=y)
    out, grads = loss_and_grads(model, pixel_values=x, labels=y)
    torch.testing.assert_close(out.logits, ref.logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, ref_grads)


def test_base_model_patched():
    torch.manual_seed(0)
    ref_model = perturb_(BeitModel(hf_config(use_mask_token=True, use_relative_position_bias=True))).eval()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention="sdpa")
    x, mask, _ = batch()
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(model(x, bool_masked_pos=m).last_hidden_state,
                                       ref_model(x, bool_masked_pos=m).last_hidden_state, rtol=RTOL, atol=ATOL)


def test_rel_pos_bias_gather_is_exact():
    model = mim_model(use_relative_position_bias=True)
    modules = [model.beit.shared_position_bias] + [layer.relative_position_bias for layer in model.beit.layers]
    ref = [m((4, 4)) for m in modules]
    apply_beit_fast_to_hf(model)
    for m, r in zip(modules, ref):
        assert torch.equal(m((4, 4)), r)
        # another window size still takes HF's own (interpolating) path
        assert m((5, 5)).shape == (1, 2, 26, 26)


def test_revert_restores_original_behaviour_exactly():
    ref_model = mim_model()
    model = copy.deepcopy(ref_model)
    keys_before = list(model.state_dict())
    x, mask, tokens = batch()
    labels = tokens[mask]
    ref, ref_grads = loss_and_grads(ref_model, pixel_values=x, bool_masked_pos=mask, labels=labels)

    apply_beit_fast_to_hf(model, attention="math")
    apply_beit_fast_to_hf(model, attention="sdpa")  # re-applying replaces, it does not stack
    assert list(model.state_dict()) == keys_before  # no parameter or buffer added
    assert "forward" in model.__dict__ and "forward" not in ref_model.__dict__  # this instance only
    assert "forward" in model.beit.layers[0].attention.__dict__
    assert BeitForMaskedImageModeling.forward is type(ref_model).forward

    assert revert_beit_fast(model) is model
    assert beit_fast_patch_info(model) is None
    for mod in model.modules():
        assert not any(k.startswith("_beit_fast") or k == "forward" for k in mod.__dict__), type(mod).__name__
    out, grads = loss_and_grads(model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
    assert set(grads) == set(ref_grads) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    assert revert_beit_fast(model) is model  # a no-op on an unpatched model


def test_patched_model_copies_and_pickles():
    import inspect
    import io

    model = apply_beit_fast_to_hf(mim_model().eval())
    assert "return_logits" in inspect.signature(model.forward).parameters  # e.g. for HF's Trainer
    x, mask, tokens = batch()
    with torch.no_grad():
        expected = model(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert clone.forward.args[0] is clone  # bound to the copy, not to the original
        attn = clone.beit.layers[0].attention
        assert attn.forward.args[0] is attn
        with torch.no_grad():
            assert torch.equal(clone(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss, expected)
        revert_beit_fast(clone)
        assert "forward" not in clone.__dict__ and "forward" not in attn.__dict__
    assert beit_fast_patch_info(model) is not None  # the original is still patched


def test_dropout_in_training_falls_back_to_hf_attention():
    ref_model = mim_model(attention_probs_dropout_prob=0.3)
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention="math", fused_embed=False, fused_loss=False)
    x, mask, _ = batch()
    torch.manual_seed(5)
    ref = ref_model(pixel_values=x, bool_masked_pos=mask).logits
    torch.manual_seed(5)
    out = model(pixel_values=x, bool_masked_pos=mask).logits
    assert torch.equal(out, ref)  # HF's own attention with its dropout, same random stream


def test_autocast_bf16_keeps_hf_dtypes():
    ref_model = mim_model().eval()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    x, mask, tokens = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        e_ref = ref_model.beit.embeddings(x, bool_masked_pos=mask)
        e = model.beit.embeddings(x, bool_masked_pos=mask)
        loss = model(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss
        ref_loss = ref_model(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss
    assert e.dtype == e_ref.dtype == torch.float32  # HF's blend with the fp32 mask token promotes
    assert loss.dtype == ref_loss.dtype == torch.float32
    # bf16 GEMMs on both sides: agreement at bf16 resolution (8 bits of mantissa)
    torch.testing.assert_close(e, e_ref, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)


def test_triton_kernels_through_the_patch():
    """The Triton embedding and loss kernels (interpreted on CPU) inside the patched HF model."""
    from beit_fast.ops.backend import triton_available, triton_interpreting

    if not (triton_available() and triton_interpreting()):
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest)")
    ref_model = mim_model()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention="math", fused_loss="triton",
                                  fused_embed="triton")
    x, mask, tokens = batch()
    labels = tokens[mask]
    ref, ref_grads = loss_and_grads(ref_model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    out, grads = loss_and_grads(model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    for name in ("beit.embeddings.mask_token", "beit.embeddings.patch_embeddings.projection.weight",
                 "lm_head.weight", "lm_head.bias"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=2e-5, msg=name)


def test_unknown_model_types_are_refused():
    timm_beit = pytest.importorskip("timm.models.beit")
    from beit_fast.model import build_model

    for obj in (torch.nn.Linear(2, 2), build_model("tiny", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                   num_heads=2, vocab_size=8),
                timm_beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)):
        with pytest.raises(TypeError, match=type(obj).__name__) as info:
            apply_beit_fast_to_hf(obj)
        assert "BeitForMaskedImageModeling" in str(info.value)


def test_bad_options_are_refused():
    model = mim_model()
    with pytest.raises(ValueError, match="attention"):
        apply_beit_fast_to_hf(model, attention="flash")
    with pytest.raises(ValueError, match="fused_loss"):
        apply_beit_fast_to_hf(model, fused_loss="cuda")
    assert beit_fast_patch_info(model) is None  # nothing half-applied
