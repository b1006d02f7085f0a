"""The fast training step and the eager step against an independent fp64 reference (tests/reference_beit.py,
shares nothing with beit_fast but the weights): same loss, accuracy and every gradient, each within 1e-5 of
its own largest magnitude (tiny config, CPU). The weights are perturbed (reference_beit.perturb_) so that
attention is clearly non-uniform, LayerScale, the mask token and the bias table matter, and head logits are
of order one; half of the targets are the reference's own prediction, so the accuracy is not trivially 0."""
import copy
import os

import numpy as np
import pytest
import torch

from beit_fast.train.mim import FastPretrainEngine, PretrainEngine
from beit_fast.data.masking import MaskingGenerator
from beit_fast.model.beit import build_model, masked_index
from beit_fast.train.optim import build_optimizer
from kernel_test_utils import assert_close_rel, assert_flash_rule
from kernel_test_utils import exact_fp32_reference  # noqa: F401 (autouse: IEEE fp32 on CUDA)
from reference_beit import grads_of, mim_loss, perturb_

CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, vocab_size=40, drop_path_rate=0.0)
K = 6
REL = 1e-5  # fp32 against fp64: measured <= 4e-6 x max|ref| on every tensor
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


def make_model(**overrides):
    torch.manual_seed(0)
    return perturb_(build_model("tiny", **dict(CFG, **overrides)))


def with_predicted_targets(model, batch, seed=0):
    """Half of the tokens replaced by the model's own prediction (the reference's argmax over all positions),
    so the accuracy is far from 0 and a wrong accuracy shows."""
    images, masks, tokens = batch
    p = {n: t.detach().double().cpu() for n, t in model.named_parameters()}
    from reference_beit import _ln, trunk

    heads = model.cfg.num_heads
    x = _ln(p, "norm.", trunk(p, images.double().cpu(), heads, model.cfg.patch_size, masks.cpu()), 1e-6)[:, 1:]
    predicted = (x @ p["lm_head.weight"].t() + p["lm_head.bias"]).argmax(-1)
    take = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    return images, masks, torch.where(take, predicted, tokens.cpu()).to(tokens.device)


def reference(model, batch, amp_dtype=None):
    """``(loss, acc, grads)`` of the independent reference (CPU): in fp64, or with ``amp_dtype`` in fp32 under
    autocast to it (PyTorch's own error at that precision, from code that shares nothing with the model)."""
    images, masks, tokens = batch
    dtype = torch.float32 if amp_dtype else torch.float64
    p = {n: t.detach().to("cpu", dtype).requires_grad_(True) for n, t in model.named_parameters()}
    with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss, acc = mim_loss(p, images.to("cpu", dtype), masks.cpu(), tokens.cpu(), model.cfg.num_heads,
                             model.cfg.patch_size)
    loss.backward()
    return loss.detach(), acc, grads_of(p)


def loss_and_grads(engine, batch):
    images, masks, tokens = batch
    engine.model.zero_grad(set_to_none=True)
    loss, acc = engine.compute_loss(images, masks, tokens)
    loss.backward()
    return loss.detach(), acc, {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def assert_same(ref_out, fast_out, rel=REL):
    """``fast_out`` (fp32, any device) against the fp64 ``ref_out``: loss, accuracy, every gradient."""
    (l1, a1, g1), (l2, a2, g2) = ref_out, fast_out
    assert_close_rel(l2.cpu(), l1, rel, "loss")
    assert 0.2 < float(a1) < 0.9 and float(a2) == float(a1), f"accuracy {float(a2)} != reference {float(a1)}"
    assert set(g1) == set(g2), set(g1) ^ set(g2)
    for name in g1:
        assert_close_rel(g2[name].cpu(), g1[name], rel, name)


def check_both(model, ref_engine, fast_engine, batch):
    """The eager engine and the fast engine, each against the independent reference."""
    batch = with_predicted_targets(model, batch)
    want = reference(ref_engine.model, batch)
    assert_same(want, loss_and_grads(ref_engine, batch))
    assert_same(want, loss_and_grads(fast_engine, batch))


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
    model = make_model()
    ref, fast = engines(model, dict(compile=False))
    if attention == "reference":  # the deprecated alias still works, and says so
        with pytest.warns(DeprecationWarning, match="deprecated alias of 'math'"):
            fast.model.configure_fast_path(attention=attention, fused_embed="reference",
                                           activation_checkpointing=checkpointing)
    else:
        fast.model.configure_fast_path(attention=attention, fused_embed="reference", activation_checkpointing=checkpointing)
    check_both(model, ref, fast, make_batch(1, fixed))


def test_fast_triton_attention_matches_reference():
    """attention="triton" (interpreted on CPU): the blocks get the shared table + index, the kernel gathers
    the bias; loss and every gradient (the shared table's included) match the reference. Two blocks of two
    heads keep the interpreter's program count low."""
    model = make_model(depth=2, num_heads=2)
    ref, fast = engines(model, dict(compile=False))
    fast.model.configure_fast_path(attention="triton", fused_embed="reference", activation_checkpointing=2)
    check_both(model, ref, fast, make_batch(1, fixed=False))


def test_fast_triton_kernels_match_reference():
    """The Triton kernels (interpreted on CPU) inside the fast step give the reference's loss and grads."""
    model = make_model()
    ref, fast = engines(model, dict(compile=False, ops_backend="triton"))
    fast.model.configure_fast_path(attention="sdpa", fused_embed="triton")
    check_both(model, ref, fast, make_batch(2, fixed=False))


def test_compiled_step_matches_reference_without_graph_breaks():
    model = make_model()
    ref, fast = engines(model, dict(compile=True))
    fast.model.configure_fast_path(attention="sdpa", fused_embed="reference", activation_checkpointing=2)
    torch._dynamo.reset()
    batch = make_batch(3, fixed=False)
    explanation = torch._dynamo.explain(fast._fast_loss)(*batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    check_both(model, ref, fast, batch)
    # A second batch with another mask pattern reuses the graph (static shapes): no recompilation.
    from torch._dynamo.utils import counters

    frames_before = counters["stats"]["unique_graphs"]
    check_both(model, ref, fast, make_batch(4, fixed=True))
    assert counters["stats"]["unique_graphs"] == frames_before


def test_fast_step_bf16_close_to_fp32_reference():
    """Flash-attention's rule: against the fp64 reference, the bf16 fast step's error (and the eager bf16
    step's) is at most twice that of the independent reference under bf16 autocast (PyTorch at the same
    precision, from code that shares nothing with the model), on the loss and every gradient."""
    model = make_model()
    ref, fast = engines(model, dict(compile=False))
    fast.amp_dtype = torch.bfloat16
    fast.model.configure_fast_path(attention="sdpa", fused_embed="reference")
    ref.amp_dtype = torch.bfloat16
    batch = with_predicted_targets(model, make_batch(5, fixed=True))
    l64, _, g64 = reference(ref.model, batch)
    lref, _, gref = reference(ref.model, batch, amp_dtype=torch.bfloat16)
    leager, _, geager = loss_and_grads(ref, batch)
    lfast, _, gfast = loss_and_grads(fast, batch)
    assert set(gfast) == set(geager) == set(g64)
    for what, loss, grads in (("fast", lfast, gfast), ("eager", leager, geager)):
        assert_flash_rule(loss.cpu(), lref, l64, f"{what} loss")
        for name in g64:
            assert_flash_rule(grads[name].cpu(), gref[name], g64[name], f"{what} {name}")


def test_tokenizer_low_precision_agreement_and_choice():
    """Tokens against an fp64 argmax taken here (the encoder's logits [B, V, h, w] flattened row-major by
    hand): fp32 tokens equal it wherever the top-2 logits are not tied; bf16 tokens equal it wherever the
    top-2 gap exceeds 3 % of the row's largest |logit| (far beyond bf16's rounding), so the agreement is at
    least that fraction; the engine's choice follows the agreement and its tokenize then uses bf16."""
    from beit_fast.train.mim import token_agreement
    from beit_fast.tokenizer.base import tokenize
    from beit_fast.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=64, input_size=32)
    images = (0.1 + 0.8 * torch.rand(4, 3, 32, 32))
    with torch.no_grad():  # the dVAE encoder on 2x - 1, in fp64
        logits = copy.deepcopy(tok.encoder).double().eval()(images.double() * 2 - 1)
    b, v = logits.shape[:2]
    flat = logits.permute(0, 2, 3, 1).reshape(b, -1, v)  # [B, h*w, V], position (i, j) at i*w + j
    want = flat.argmax(-1)
    top2 = flat.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    untied = gap > 1e-4 * flat.abs().amax(-1)
    clear = gap > 0.03 * flat.abs().amax(-1)
    assert untied.float().mean() > 0.9 and clear.float().mean() > 0.5, "too many near-ties to test anything"
    fp32 = tokenize(tok, images)
    assert fp32.shape == (4, 16) and fp32.dtype == torch.int64
    assert torch.equal(fp32[untied], want[untied])
    bf16 = tokenize(tok, images, torch.bfloat16)
    assert torch.equal(bf16[clear], want[clear])
    agreement = token_agreement(tok, images, torch.bfloat16)
    assert agreement == (bf16 == fp32).float().mean().item()
    assert agreement >= clear.float().mean().item()
    assert token_agreement(tok, images, torch.float32) >= untied.float().mean().item()
    sched = np.full(4, 1e-3)
    model = build_model("tiny", **CFG)
    engine = PretrainEngine(model, tok, build_optimizer(model, 1e-3, 0.05), torch.device("cpu"), sched, sched)
    assert engine.choose_tokenizer_precision(images, torch.bfloat16, min_agreement=1.01) == agreement
    assert engine.tokenizer_dtype is None  # refused: agreement can never reach 101 %
    assert engine.choose_tokenizer_precision(images, torch.bfloat16, min_agreement=agreement) == agreement
    assert engine.tokenizer_dtype is torch.bfloat16  # accepted at exactly the measured agreement
    masks = torch.zeros(4, 16, dtype=torch.bool)
    tokens = engine.tokenize(images, masks)
    assert torch.equal(tokens, bf16) and torch.equal(tokens[clear], want[clear])
