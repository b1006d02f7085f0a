"""The fast training step against the eager reference: same loss, same gradients (tiny config, CPU)."""
import copy
import os

import numpy as np
import pytest
import torch

from beit_fast.train.mim import FastPretrainEngine, PretrainEngine
from beit_fast.data.masking import MaskingGenerator
from beit_fast.model.beit import build_model, masked_index
from beit_fast.train.optim import build_optimizer

CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, vocab_size=40, drop_path_rate=0.0)
K = 6
# On a GPU machine (BEIT_FAST_REAL_GPU=1) the same parity tests run on CUDA with the real kernels.
DEV = torch.device("cuda" if os.environ.get("BEIT_FAST_REAL_GPU") == "1" and torch.cuda.is_available() else "cpu")


def make_batch(seed: int, fixed: bool):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    gen = MaskingGenerator((4, 4), K, min_num_patches=2, fixed_count=fixed)
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(3)]))
    if not fixed:  # make sure at least one image is short of the target, as the official generator allows
        masks[1] = False
        masks[1, :3] = True
    tokens = torch.randint(0, 40, (3, 16), generator=g)
    return images.to(DEV), masks.to(DEV), tokens.to(DEV)


def engines(model, fast_kwargs):
    ref_model = model.to(DEV)
    fast_model = copy.deepcopy(ref_model)
    sched = np.full(10, 1e-3)
    ref = PretrainEngine(ref_model, None, build_optimizer(ref_model, 1e-3, 0.05), DEV, sched, sched)
    fast = FastPretrainEngine(fast_model, None, build_optimizer(fast_model, 1e-3, 0.05), DEV, sched,
                              sched, num_masked=K, **fast_kwargs)
    return ref, fast


def loss_and_grads(engine, batch):
    images, masks, tokens = batch
    engine.model.zero_grad(set_to_none=True)
    loss, acc = engine.compute_loss(images, masks, tokens)
    loss.backward()
    return loss.detach(), acc, {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def assert_same(ref_out, fast_out, atol=2e-5, rtol=1e-4):
    (l1, a1, g1), (l2, a2, g2) = ref_out, fast_out
    torch.testing.assert_close(l2, l1, atol=atol, rtol=rtol)
    torch.testing.assert_close(a2, a1)
    assert set(g1) == set(g2)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=atol, rtol=rtol, msg=name)


def test_masked_index_matches_boolean_indexing():
    _, masks, tokens = make_batch(0, fixed=False)
    index = masked_index(masks, K)
    real = masks.gather(1, index)
    assert torch.equal(tokens.gather(1, index)[real], tokens[masks])
    assert torch.equal(real.sum(1), masks.sum(1))


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("attention", ["reference", "math", "sdpa"])
@pytest.mark.parametrize("checkpointing", ["none", 2])
def test_fast_eager_matches_reference(fixed, attention, checkpointing):
    torch.manual_seed(0)
    model = build_model("tiny", **CFG)
    with torch.no_grad():  # non-trivial bias table and LayerScale so their gradients are tested too
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
    ref, fast = engines(model, dict(compile=False))
    if attention == "reference":  # the deprecated alias still works, and says so
        with pytest.warns(DeprecationWarning, match="deprecated alias of 'math'"):
            fast.model.configure_fast_path(attention=attention, fused_embed="reference",
                                           activation_checkpointing=checkpointing)
    else:
        fast.model.configure_fast_path(attention=attention, fused_embed="reference", activation_checkpointing=checkpointing)
    batch = make_batch(1, fixed)
    assert_same(loss_and_grads(ref, batch), loss_and_grads(fast, batch))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and DEV.type != "cuda",
                    reason="the Triton attention needs CUDA or the interpreter")
def test_fast_triton_attention_matches_reference():
    """attention="triton" (interpreted on CPU): the blocks get the shared table + index, the kernel gathers
    the bias; loss and every gradient (the shared table's included) match the reference. Two blocks of two
    heads keep the interpreter's program count low."""
    torch.manual_seed(0)
    model = build_model("tiny", **dict(CFG, depth=2, num_heads=2))
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
    ref, fast = engines(model, dict(compile=False))
    fast.model.configure_fast_path(attention="triton", fused_embed="reference", activation_checkpointing=2)
    batch = make_batch(1, fixed=False)
    assert_same(loss_and_grads(ref, batch), loss_and_grads(fast, batch))


def test_fast_triton_kernels_match_reference():
    """The Triton kernels (interpreted on CPU) inside the fast step give the reference's loss and grads."""
    torch.manual_seed(0)
    model = build_model("tiny", **CFG)
    ref, fast = engines(model, dict(compile=False, ops_backend="triton"))
    fast.model.configure_fast_path(attention="sdpa", fused_embed="triton")
    batch = make_batch(2, fixed=False)
    assert_same(loss_and_grads(ref, batch), loss_and_grads(fast, batch), atol=1e-4, rtol=1e-3)


def test_compiled_step_matches_reference_without_graph_breaks():
    torch.manual_seed(0)
    model = build_model("tiny", **CFG)
    ref, fast = engines(model, dict(compile=True))
    fast.model.configure_fast_path(attention="sdpa", fused_embed="reference", activation_checkpointing=2)
    torch._dynamo.reset()
    batch = make_batch(3, fixed=False)
    explanation = torch._dynamo.explain(fast._fast_loss)(*batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_same(loss_and_grads(ref, batch), loss_and_grads(fast, batch))
    # A second batch with another mask pattern reuses the graph (static shapes): no recompilation.
    from torch._dynamo.utils import counters

    frames_before = counters["stats"]["unique_graphs"]
    assert_same(loss_and_grads(ref, make_batch(4, fixed=True)), loss_and_grads(fast, make_batch(4, fixed=True)))
    assert counters["stats"]["unique_graphs"] == frames_before


def test_fast_step_bf16_close_to_fp32_reference():
    torch.manual_seed(0)
    model = build_model("tiny", **CFG)
    ref, fast = engines(model, dict(compile=False))
    fast.amp_dtype = torch.bfloat16
    fast.model.configure_fast_path(attention="sdpa", fused_embed="reference")
    ref_bf16 = copy.deepcopy(ref)
    ref_bf16.amp_dtype = torch.bfloat16
    batch = make_batch(5, fixed=True)
    l32, _, g32 = loss_and_grads(ref, batch)
    lref, _, gref = loss_and_grads(ref_bf16, batch)
    lfast, _, gfast = loss_and_grads(fast, batch)
    # Flash-attention's rule: no worse than PyTorch at the same precision, against an fp32 reference.
    assert abs(lfast - l32) <= 2 * abs(lref - l32) + 1e-3
    for name in g32:
        err_fast = (gfast[name].float() - g32[name]).abs().max()
        err_ref = (gref[name].float() - g32[name]).abs().max()
        assert err_fast <= 2 * err_ref + 1e-3 * g32[name].abs().max() + 1e-6, name


def test_tokenizer_low_precision_agreement_and_choice():
    from beit_fast.train.mim import token_agreement
    from beit_fast.tokenizer.base import tokenize
    from beit_fast.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=64, input_size=32)
    images = (0.1 + 0.8 * torch.rand(4, 3, 32, 32))
    assert torch.equal(tokenize(tok, images), tok.get_codebook_indices(images))
    assert token_agreement(tok, images, torch.float32) == 1.0
    agreement = token_agreement(tok, images, torch.bfloat16)
    assert 0.0 <= agreement <= 1.0
    sched = np.full(4, 1e-3)
    model = build_model("tiny", **CFG)
    engine = PretrainEngine(model, tok, build_optimizer(model, 1e-3, 0.05), torch.device("cpu"), sched, sched)
    assert engine.choose_tokenizer_precision(images, torch.bfloat16, min_agreement=1.01) == agreement
    assert engine.tokenizer_dtype is None  # refused: agreement can never reach 101 %
    engine.choose_tokenizer_precision(images, torch.bfloat16, min_agreement=0.0)
    assert engine.tokenizer_dtype is torch.bfloat16
    masks = torch.zeros(4, 16, dtype=torch.bool)
    assert torch.equal(engine.tokenize(images, masks), tokenize(tok, images, torch.bfloat16))
