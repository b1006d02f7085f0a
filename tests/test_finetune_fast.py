"""The fine-tuning fast path (beit_fast.train.loss.ClassificationLoss over the classifier's fast path) against the
eager fine-tuning step of beit_fast.finetune: same loss and every gradient (fp32 tight, bf16 by the
flash-attention rule), compiled to one graph without graph breaks or recompilation (tiny config, CPU; the
Triton attention runs in the interpreter). Fused AdamW over the layer-decay groups: CUDA only."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from beit_fast.data.transforms import build_mixup
from beit_fast.train.loss import ClassificationLoss, build_finetune_loss, classification_loss
from beit_fast.model.beit import build_classifier
from beit_fast.train.optim import apply_schedule, param_groups_layer_decay

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # 4x4 patches, 17 tokens
CLASSES = 5
SMOOTHING = 0.1
# On a GPU machine (BEIT_FAST_REAL_GPU=1) the same parity tests run on CUDA with the real kernels.
DEV = torch.device("cuda" if os.environ.get("BEIT_FAST_REAL_GPU") == "1" and torch.cuda.is_available() else "cpu")
TRITON_OK = os.environ.get("TRITON_INTERPRET") == "1" or DEV.type == "cuda"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="the Triton attention needs CUDA or the interpreter")


def make_model(drop_path: float = 0.0, **kw):
    torch.manual_seed(0)
    model = build_classifier("tiny", CLASSES, drop_path_rate=drop_path, **SMALL, **kw)
    with torch.no_grad():  # zero tables and a 0.001-scaled head at init: give them values so they matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.2)
    return model.to(DEV).train()


def make_batch(seed: int, mixup: bool = True):
    """Images and targets as the fine-tuning loop feeds them: soft targets from build_mixup (mixup/cutmix
    with the label smoothing folded in) or int64 labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 16, 16, generator=g)
    labels = torch.randint(0, CLASSES, (4,), generator=g)
    if mixup:
        torch.manual_seed(seed)  # torchvision's MixUp / CutMix draw from the global generator
        images, targets = build_mixup(CLASSES, 0.8, 1.0, label_smoothing=SMOOTHING)(images, labels)
        assert targets.dtype == torch.float32 and targets.shape == (4, CLASSES)
    else:
        targets = labels
    return images.to(DEV), targets.to(DEV)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def eager_step(model, images, targets, amp_dtype=None):
    """The eager fine-tuning step of beit_fast.finetune._finetune (forward under autocast, its loss, backward),
    written out here so that the loss module is checked against it, not against itself."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = model(images)
    if targets.is_floating_point():
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    else:
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=SMOOTHING)
    loss.backward()
    labels = targets.argmax(-1) if targets.is_floating_point() else targets
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss.detach(), acc, grads(model)


def module_step(loss_fn, model, images, targets):
    model.zero_grad(set_to_none=True)
    loss, acc = loss_fn(images, targets)
    loss.backward()
    return loss.detach(), acc, grads(model)


def assert_same(ref, got, atol=1e-5, rtol=1e-4):
    (l1, a1, g1), (l2, a2, g2) = ref, got
    assert l2.dtype == torch.float32 and l2.shape == ()
    torch.testing.assert_close(l2, l1, atol=atol, rtol=rtol)
    torch.testing.assert_close(a2, a1)
    assert set(g1) == set(g2) and any("relative_position_bias_table" in n for n in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------------------------------
# the loss module itself
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixup", [True, False], ids=["mixup", "labels"])
def test_eager_loss_module_is_the_eager_step_bit_for_bit(mixup):
    model = make_model()
    loss_fn = build_finetune_loss(model, label_smoothing=SMOOTHING, fast=False)
    assert isinstance(loss_fn, ClassificationLoss) and loss_fn.model is model
    images, targets = make_batch(1, mixup)
    ref = eager_step(model, images, targets)
    got = module_step(loss_fn, model, images, targets)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert all(torch.equal(got[2][n], ref[2][n]) for n in ref[2])


def test_classification_loss_dtypes_and_input_errors():
    logits = torch.randn(3, 4, dtype=torch.bfloat16)
    loss, acc = classification_loss(logits, torch.tensor([0, 3, 1]), label_smoothing=0.2)
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32 and not acc.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), torch.tensor([0, 3, 1]), label_smoothing=0.2))
    soft = torch.softmax(torch.randn(3, 4), -1)
    loss, _ = classification_loss(logits, soft)
    torch.testing.assert_close(loss, -(soft * F.log_softmax(logits.float(), -1)).sum(-1).mean())
    with pytest.raises(ValueError, match="soft targets must have the logits' shape"):
        classification_loss(logits, soft[:, :3])
    with pytest.raises(ValueError, match=r"class labels must have shape \[B\]"):
        classification_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int64 class labels"):
        classification_loss(logits, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationLoss(torch.nn.Identity(), label_smoothing=1.0)
    with pytest.raises(TypeError, match="fast=True needs a beit_fast classifier"):
        build_finetune_loss(torch.nn.Linear(4, 4), fast=True)
    model = make_model()
    build_finetune_loss(model, fast=True, attention="math", activation_checkpointing=2)
    assert {b.attn.attn_backend for b in model.blocks} == {"math"} and model.checkpoint_blocks == {1}


# --------------------------------------------------------------------------------------------------
# the fast path against the eager step
# --------------------------------------------------------------------------------------------------
CASES = [
    pytest.param("math", "none", True, id="math-nockpt-mixup"),
    pytest.param("math", "all", True, id="math-ckpt-mixup"),
    pytest.param("sdpa", 2, False, id="sdpa-ckpt2-labels"),
    pytest.param("triton", "none", True, id="triton-nockpt-mixup", marks=needs_triton),
    pytest.param("triton", "all", False, id="triton-ckpt-labels", marks=needs_triton),
]


@pytest.mark.parametrize("attention,checkpointing,mixup", CASES)
def test_fast_matches_eager_step(attention, checkpointing, mixup):
    model = make_model()
    fast_model = copy.deepcopy(model)
    loss_fn = build_finetune_loss(fast_model, label_smoothing=SMOOTHING, fast=True, attention=attention,
                                  activation_checkpointing=checkpointing)
    images, targets = make_batch(2, mixup)
    assert_same(eager_step(model, images, targets), module_step(loss_fn, fast_model, images, targets))


def test_compiled_fast_step_one_graph_matches_eager_and_does_not_recompile():
    """torch.compile(fullgraph=True, dynamic=False) of the loss module with the fused attention ("triton"
    where it runs, else "sdpa") and checkpointing: no graph break, the eager step's loss and gradients,
    and a second batch reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = make_model()
    fast_model = copy.deepcopy(model)
    loss_fn = build_finetune_loss(fast_model, label_smoothing=SMOOTHING, fast=True,
                                  attention="triton" if TRITON_OK else "sdpa", activation_checkpointing=1)
    batch = make_batch(3)
    explanation = torch._dynamo.explain(loss_fn)(*batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=False)
    assert_same(eager_step(model, *batch), module_step(compiled, fast_model, *batch))
    batch = make_batch(4)  # other images, other mixup targets: same shapes, same graph
    assert_same(eager_step(model, *batch), module_step(compiled, fast_model, *batch))
    assert counter.frame_count == 1


@pytest.mark.slow  # about 50 s on 2 cores: inductor compiles forward and backward
def test_compiled_inductor_fast_step_matches_eager():
    """The same with inductor (the default backend), sdpa attention (the CUDA "auto" choice) and
    checkpointing of every block."""
    torch._dynamo.reset()
    model = make_model()
    fast_model = copy.deepcopy(model)
    loss_fn = build_finetune_loss(fast_model, label_smoothing=SMOOTHING, fast=True, attention="sdpa",
                                  activation_checkpointing="all")
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    batch = make_batch(5)
    assert_same(eager_step(model, *batch), module_step(compiled, fast_model, *batch))


def test_drop_path_and_checkpointing_compile_to_one_graph():
    """The recipe's drop path (random per sample) inside checkpointed blocks: still one graph."""
    torch._dynamo.reset()
    model = make_model(drop_path=0.1)
    loss_fn = build_finetune_loss(model, label_smoothing=SMOOTHING, fast=True,
                                  attention="triton" if TRITON_OK else "sdpa", activation_checkpointing="all")
    explanation = torch._dynamo.explain(loss_fn)(*make_batch(6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("triton", marks=needs_triton)])
def test_fast_step_bf16_flash_attention_rule(attention):
    """bf16 autocast: the fast step's error against the fp32 eager step is at most twice the eager bf16
    step's (plus a small atol), for the loss and every gradient."""
    model = make_model()
    fast_model = copy.deepcopy(model)
    loss_fn = build_finetune_loss(fast_model, amp_dtype=torch.bfloat16, label_smoothing=SMOOTHING, fast=True,
                                  attention=attention)
    batch = make_batch(7)
    l32, _, g32 = eager_step(model, *batch)
    lref, _, gref = eager_step(model, *batch, amp_dtype=torch.bfloat16)
    lfast, _, gfast = module_step(loss_fn, fast_model, *batch)
    assert lfast.dtype == torch.float32
    assert abs(lfast - l32) <= 2 * abs(lref - l32) + 1e-3
    assert set(gfast) == set(g32)
    for name in g32:
        err_fast = (gfast[name].float() - g32[name]).abs().max()
        err_ref = (gref[name].float() - g32[name]).abs().max()
        assert err_fast <= 2 * err_ref + 1e-3 * g32[name].abs().max() + 1e-6, name


# --------------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs a CUDA device")
def test_cuda_fused_adamw_with_layer_decay_groups():
    """param_groups_layer_decay's groups (different lr per group, with and without weight decay) work with
    fused AdamW and give the for-loop AdamW's update."""
    torch.manual_seed(0)
    model = build_classifier("tiny", CLASSES, **SMALL).cuda()
    twin = copy.deepcopy(model)
    opts = []
    for m, kw in ((model, {"fused": True}), (twin, {"foreach": False})):
        groups = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.65)
        opt = torch.optim.AdamW(groups, lr=1e-3, **kw)
        apply_schedule(opt, 1e-3, 0.05)
        opts.append(opt)
    assert len({g["lr"] for g in opts[0].param_groups}) > 2
    images, targets = (t.cuda() for t in make_batch(8))
    for m, opt in zip((model, twin), opts):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            ClassificationLoss(m)(images, targets)[0].backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_fast_step_has_no_host_sync():
    """After the warm-up (compile, the index plan), forward + loss + backward + fused AdamW with a
    device-side skip of a non-finite update never synchronises with the host."""
    model = make_model().cuda()
    loss_fn = torch.compile(build_finetune_loss(model, torch.bfloat16, SMOOTHING, fast=True, attention="auto"),
                            fullgraph=True, dynamic=False)
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.65), lr=1e-4, fused=True)
    images, targets = (t.cuda() for t in make_batch(9))

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(images, targets)
        loss.backward()
        opt.found_inf = (~torch.isfinite(loss)).float()
        opt.step()

    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
