"""apply_beit_fast_to_hf: the patched transformers BEiT models give the unpatched models' results and keep
HF's contract (signatures, attention maps, attention implementation, outputs and tuples, NaN loss).

Tiny configs (hidden 32, 2 layers, 32x32 images, 8x8 patches, vocab 50), random weights, fp32 on CPU.
"""
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BeitBackbone,
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitModel,
)

import beit_fast.interop.hf as hf_patch  # noqa: E402
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


@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("variant", ["shared", "per_layer_abs_pos"])
def test_mim_loss_and_gradients_match_unpatched(attention, variant, fused_loss):
    kw = {} if variant == "shared" else dict(use_relative_position_bias=True, use_absolute_position_embeddings=True)
    ref_model = mim_model(**kw)
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), attention=attention, fused_loss=fused_loss)
    x, mask, tokens = batch()
    labels = tokens[mask]
    ref, ref_grads = loss_and_grads(ref_model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    out, grads = loss_and_grads(model, pixel_values=x, bool_masked_pos=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    if fused_loss:  # the opt-in: no [B, N, vocab] logits
        assert out.logits is None
    else:  # HF's contract: loss and logits
        torch.testing.assert_close(out.logits, ref.logits, rtol=RTOL, atol=ATOL)
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

    apply_beit_fast_to_hf(model, fused_loss=True)
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


def test_fused_loss_return_conventions():
    model = apply_beit_fast_to_hf(mim_model().eval(), fused_loss=True, return_logits=False)
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


def test_fused_loss_all_labels_ignored_gives_zero_not_nan():
    model = apply_beit_fast_to_hf(mim_model(), fused_loss=True)
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
    assert info["options"]["fused_loss"] is None  # nothing to fuse in a 5-way classifier (default: off anyway)
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
    apply_beit_fast_to_hf(model, attention="sdpa", fused_loss=True)  # re-applying replaces, it does not stack
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
    import io

    model = apply_beit_fast_to_hf(mim_model().eval(), fused_loss=True)
    assert inspect.signature(model.forward) == inspect.signature(BeitForMaskedImageModeling.forward.__get__(model))
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
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), fused_loss=True)
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
    from beit_fast.model.beit import build_model

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


# --------------------------------------------------------------------------------------------------
# HF's contract, point by point (found by running transformers' own BEiT model tests on patched models)
# --------------------------------------------------------------------------------------------------
TASK_CLASSES = {cls.__name__: cls for cls in (BeitModel, BeitForMaskedImageModeling, BeitForImageClassification,
                                               BeitForSemanticSegmentation, BeitBackbone)}


def _task_model(name: str, **kw):
    """A perturbed instance of HF BEiT class ``name`` (4 layers so the segmentation head's out_indices fit)."""
    cfg = dict(num_hidden_layers=4, num_labels=3, use_mask_token=True, use_relative_position_bias=True,
               out_indices=[1, 2, 3, 4])
    cfg.update(kw)
    torch.manual_seed(0)
    return perturb_(TASK_CLASSES[name](hf_config(**cfg))).eval()


def _count_fused_attention_calls(monkeypatch) -> list:
    calls = []
    real = hf_patch.attention_with_bias
    monkeypatch.setattr(hf_patch, "attention_with_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_signatures_are_hfs():
    """HF (and its test suite) reads forward's parameters and the **kwargs annotation (e.g. to decide
    whether a model can return attentions): every replaced method shows the replaced method's signature."""
    for name in TASK_CLASSES:
        ref = _task_model(name)
        model = apply_beit_fast_to_hf(copy.deepcopy(ref), fused_loss=True)
        pairs = [(model, ref), (model.get_submodule("beit.embeddings" if name != "BeitModel" else "embeddings"),
                                ref.get_submodule("beit.embeddings" if name != "BeitModel" else "embeddings"))]
        beit, ref_beit = (model, ref) if name == "BeitModel" else (model.beit, ref.beit)
        pairs += [(beit.layers[0].attention, ref_beit.layers[0].attention),
                  (beit.layers[0].relative_position_bias, ref_beit.layers[0].relative_position_bias)]
        for patched, orig in pairs:
            assert inspect.signature(patched.forward) == inspect.signature(orig.forward), type(orig).__name__
            assert patched.forward.__name__ == "forward" and patched.forward.__doc__ == orig.forward.__doc__
        assert "forward" in beit.layers[0].attention.__dict__  # really patched


@pytest.mark.parametrize("how", ["keyword", "config"])
def test_output_attentions_returns_hfs_attention_maps(how, monkeypatch):
    """output_attentions=True: HF's attention runs and its maps come back (the fused attention has none)."""
    calls = _count_fused_attention_calls(monkeypatch)
    for impl in ("eager", "sdpa") if how == "keyword" else ("eager",):  # HF's config refuses it with SDPA
        ref = mim_model(use_relative_position_bias=True).eval()
        ref.set_attn_implementation(impl)
        model = apply_beit_fast_to_hf(copy.deepcopy(ref))
        x, mask, _ = batch()
        kw = {"output_attentions": True} if how == "keyword" else {}
        if how == "config":
            ref.config.output_attentions = model.config.output_attentions = True
        with torch.no_grad():
            out = model(pixel_values=x, bool_masked_pos=mask, **kw)
            expected = ref(pixel_values=x, bool_masked_pos=mask, **kw)
        assert len(out.attentions) == len(expected.attentions)
        if impl == "eager":  # HF's SDPA returns no maps; eager returns one per layer
            assert len(out.attentions) == 2 and out.attentions[0].shape == (B, 2, N + 1, N + 1)
        for a, e in zip(out.attentions, expected.attentions):
            torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(out.logits, expected.logits, rtol=RTOL, atol=ATOL)
    assert not calls  # HF's attention ran every time


def test_attn_implementation_is_respected(monkeypatch):
    """The fused attention stands in for HF's SDPA attention only; "eager" (at build time or switched
    later with set_attn_implementation) runs HF's eager attention, bit for bit."""
    calls = _count_fused_attention_calls(monkeypatch)
    ref = mim_model(use_relative_position_bias=True).eval()
    ref.set_attn_implementation("eager")
    model = apply_beit_fast_to_hf(copy.deepcopy(ref))
    x, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x, bool_masked_pos=mask).logits,
                                   ref(pixel_values=x, bool_masked_pos=mask).logits, rtol=RTOL, atol=ATOL)
        out = model.beit.layers[0].attention(torch.randn(B, N + 1, 32), attention_mask=None)
    assert not calls
    assert out[1] is not None and out[1].shape == (B, 2, N + 1, N + 1)  # eager's probabilities
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(pixel_values=x, bool_masked_pos=mask)
    assert len(calls) == 2  # one per layer
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(pixel_values=x, bool_masked_pos=mask)
    assert len(calls) == 2


@pytest.mark.parametrize("return_dict", [True, False])
def test_default_patch_keeps_hfs_mim_outputs(return_dict):
    """Without the fused_loss opt-in, labels give HF's loss AND logits, HF's tuple layout, HF's gradients."""
    ref_model = mim_model()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    assert "forward" not in model.__dict__  # the MIM forward is HF's own
    x, mask, tokens = batch()
    outs = []
    for m in (ref_model, model):
        m.zero_grad(set_to_none=True)
        out = m(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask], return_dict=return_dict,
                output_hidden_states=True)
        (out[0] if not return_dict else out.loss).backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (out, grads) = outs
    assert type(out) is type(ref) and len(out) == len(ref)
    if not return_dict:  # (loss, logits, hidden_states)
        assert len(out) == 3 and out[1].shape == (B, N, V)
    for a, e in zip(out if not return_dict else out.to_tuple(), ref if not return_dict else ref.to_tuple()):
        for t, r in zip(a if isinstance(a, tuple) else (a,), e if isinstance(e, tuple) else (e,)):
            torch.testing.assert_close(t, r, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, ref_grads)


def test_default_patch_all_labels_ignored_gives_nan_like_hf():
    ref_model = mim_model()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    x, mask, _ = batch()
    labels = torch.full((int(mask.sum()),), -100)
    with torch.no_grad():
        ref = ref_model(pixel_values=x, bool_masked_pos=mask, labels=labels)
        out = model(pixel_values=x, bool_masked_pos=mask, labels=labels)
    assert torch.isnan(ref.loss) and torch.isnan(out.loss)
    torch.testing.assert_close(out.logits, ref.logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cls", ["BeitForSemanticSegmentation", "BeitBackbone"])
@pytest.mark.parametrize("rel_pos", ["per_layer", "shared"])
def test_segmentation_and_backbone_patched(cls, rel_pos, monkeypatch):
    calls = _count_fused_attention_calls(monkeypatch)
    kw = dict(use_relative_position_bias=True) if rel_pos == "per_layer" else dict(
        use_relative_position_bias=False, use_shared_relative_position_bias=True)
    ref_model = _task_model(cls, **kw).train()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    info = beit_fast_patch_info(model)["replaced"]
    assert len(info["BeitAttention.forward -> attention_with_bias"]) == 4
    assert info["BeitEmbeddings.forward -> patch_embed_mask"] == ["beit.embeddings"]
    x, _, _ = batch()
    results = []
    for m in (ref_model, model):
        m.zero_grad(set_to_none=True)
        if cls == "BeitForSemanticSegmentation":
            g = torch.Generator().manual_seed(3)
            out = m(pixel_values=x, labels=torch.randint(0, 3, (B, 32, 32), generator=g))
            out.loss.backward()
            maps = (out.logits,)
        else:
            out = m(pixel_values=x)
            maps = out.feature_maps
            sum(f.square().sum() for f in maps).backward()
        results.append((out, maps, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_maps, ref_grads), (out, maps, grads) = results
    assert len(calls) == 4
    assert len(maps) == len(ref_maps)
    for a, e in zip(maps, ref_maps):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)
    if cls == "BeitForSemanticSegmentation":
        torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, ref_grads)
    assert any("relative_position_bias_table" in n and g.abs().sum() > 0 for n, g in grads.items())


PARTS = {  # apply_beit_fast_to_hf keyword -> (the value that switches the part off, the replaced summary key)
    "attention": (None, "BeitAttention.forward -> attention_with_bias"),
    "fast_rel_pos_bias": (False, "BeitRelativePositionBias.forward -> cached-index gather"),
    "fused_embed": (False, "BeitEmbeddings.forward -> patch_embed_mask"),
    "fused_loss": (False, "BeitForMaskedImageModeling.forward -> masked-only masked_linear_cross_entropy"),
}


def test_each_part_switches_on_its_own():
    ref_model = mim_model(use_relative_position_bias=True)
    x, mask, tokens = batch()
    ref = ref_model(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss
    # the defaults: everything but the output-changing fused loss
    default = beit_fast_patch_info(apply_beit_fast_to_hf(copy.deepcopy(ref_model)))
    assert set(default["replaced"]) == {PARTS[p][1] for p in ("attention", "fast_rel_pos_bias", "fused_embed")}
    assert default["options"]["fused_loss"] is None and default["options"]["attention"] == "auto"
    for on in PARTS:
        kw = {part: (True if part != "attention" else "auto") if part == on else off
              for part, (off, _) in PARTS.items()}
        model = apply_beit_fast_to_hf(copy.deepcopy(ref_model), **kw)
        assert set(beit_fast_patch_info(model)["replaced"]) == {PARTS[on][1]}, on
        patched_modules = [name for name, m in model.named_modules() if "forward" in m.__dict__]
        assert patched_modules, on
        torch.testing.assert_close(model(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask]).loss, ref,
                                   rtol=RTOL, atol=ATOL)
    none = apply_beit_fast_to_hf(copy.deepcopy(ref_model), **{p: off for p, (off, _) in PARTS.items()})
    assert beit_fast_patch_info(none)["replaced"] == {}
    assert not [name for name, m in none.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("cls", ["BeitForSemanticSegmentation", "BeitBackbone"])
def test_revert_restores_segmentation_and_backbone_exactly(cls):
    ref_model = _task_model(cls)
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    revert_beit_fast(model)
    for mod in model.modules():
        assert not any(k.startswith("_beit_fast") or k == "forward" for k in mod.__dict__), type(mod).__name__
    x, _, _ = batch()
    with torch.no_grad():
        a, b = model(pixel_values=x), ref_model(pixel_values=x)
    for t, r in zip(a.to_tuple(), b.to_tuple()):
        for tt, rr in zip(t if isinstance(t, tuple) else (t,), r if isinstance(r, tuple) else (r,)):
            assert torch.equal(tt, rr)


def test_patched_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the replaced methods (dynamo only: backend="eager")."""
    ref_model = mim_model(use_relative_position_bias=True).eval()
    model = apply_beit_fast_to_hf(copy.deepcopy(ref_model))
    x, mask, _ = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=x, bool_masked_pos=mask).logits,
                                   ref_model(pixel_values=x, bool_masked_pos=mask).logits, rtol=RTOL, atol=ATOL)
    torch._dynamo.reset()
