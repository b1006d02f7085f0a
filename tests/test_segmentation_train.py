"""Segmentation training: the fast step (fused attention with per-block tables, activation checkpointing,
compiled) against the eager step, loss and every gradient; the recipe on the engine resumes bit for bit.
Tiny models (D=32, 4 blocks, 64x64 crops), CPU; the Triton attention runs under the interpreter."""
import copy
import os

import pytest
import torch

from beit_fast.config.segment import SegmentConfig
from beit_fast.model.segmentation import SegmentationHeadConfig, SegmentationLoss, build_segmentation_loss, build_segmenter

DEV = torch.device("cuda" if os.environ.get("BEIT_FAST_REAL_GPU") == "1" and torch.cuda.is_available() else "cpu")
# The Triton attention runs on CUDA or under the interpreter (tests/conftest.py): never skipped.


def make_model(**kw):
    torch.manual_seed(0)
    head = SegmentationHeadConfig(num_classes=5, aux_channels=16)
    model = build_segmenter("tiny", 5, img_size=64, head=head, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0,
                            **kw)
    with torch.no_grad():  # zero tables and LayerScale 0.1 at init: make attention and its bias matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
            elif name.endswith(("gamma_1", "gamma_2")):
                p.fill_(1.0)
            elif "attn.qkv" in name:
                p.normal_(0, 0.3)
    return model.to(DEV).train()


def batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (b, 64, 64), generator=g)
    labels[:, :8] = 255
    return torch.randn(b, 3, 64, 64, generator=g).to(DEV), labels.to(DEV)


def step(loss_fn, model, images, labels):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the heads' Dropout2d draws the same masks in both steps
    loss, acc = loss_fn(images, labels)
    loss.backward()
    return loss.detach(), acc, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ref, got, tol=2e-4):
    """Loss and every gradient, each within ``tol`` of its own largest magnitude (floored at 1e-3 of the largest
    gradient of all: a bias before a BatchNorm has a gradient that is zero but for rounding)."""
    (l1, a1, g1), (l2, a2, g2) = ref, got
    floor = 1e-3 * max(g.abs().max().item() for g in g1.values())
    torch.testing.assert_close(l2, l1, rtol=tol, atol=0)
    torch.testing.assert_close(a2, a1)
    assert set(g1) == set(g2) and sum("relative_position_bias_table" in n for n in g1) == 4
    for name, g in g1.items():
        err = (g2[name] - g).abs().max().item()
        assert err <= tol * max(g.abs().max().item(), floor), f"{name}: {err} vs scale {g.abs().max().item()}"


CASES = [
    pytest.param("sdpa", "none", id="sdpa"),
    pytest.param("math", "all", id="math-ckpt-all"),
    pytest.param("triton", "none", id="triton"),
    pytest.param("triton", 2, id="triton-ckpt2"),
]


@pytest.mark.parametrize("attention,checkpointing", CASES)
def test_fast_step_matches_eager_step(attention, checkpointing):
    model = make_model()
    fast_model = copy.deepcopy(model)
    eager = SegmentationLoss(model)
    fast = build_segmentation_loss(fast_model, fast=True, attention=attention, activation_checkpointing=checkpointing)
    assert {b.attn.attn_backend for b in fast_model.backbone.blocks} == {attention}
    images, labels = batch()
    assert_same(step(eager, model, images, labels), step(fast, fast_model, images, labels))


def test_a_wrong_table_does_not_pass():
    """The parity check has teeth: one block's table transposed (a wrong bias) fails it."""
    model = make_model()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        t = wrong.backbone.blocks[1].attn.relative_position_bias_table
        t.copy_(t.flip(0))
    images, labels = batch()
    with pytest.raises(AssertionError):
        assert_same(step(SegmentationLoss(model), model, images, labels),
                    step(SegmentationLoss(wrong), wrong, images, labels))


def test_loss_is_mmsegs_and_hfs_reduction():
    """mmseg averages the pixel CE over all pixels (ignored ones count as 0); avg_non_ignore over labelled ones."""
    from beit_fast.model.segmentation import segmentation_loss

    logits = torch.randn(2, 5, 16, 16)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :16] = 255
    up = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    per_pixel = torch.nn.functional.cross_entropy(up, labels, ignore_index=255, reduction="none")
    loss, _ = segmentation_loss(logits, None, labels)
    torch.testing.assert_close(loss, per_pixel.sum() / labels.numel())
    loss, _ = segmentation_loss(logits, logits, labels, avg_non_ignore=True, aux_weight=0.4)
    torch.testing.assert_close(loss, 1.4 * per_pixel.sum() / (labels != 255).sum())


@pytest.mark.slow  # about 135 s at load ~10 on 2 cores (inductor compiles forward and backward)
def test_compiled_fast_step_matches_eager():
    model = make_model()
    fast_model = copy.deepcopy(model)
    fast = build_segmentation_loss(fast_model, fast=True, attention="sdpa", activation_checkpointing="none")
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    images, labels = batch()
    assert_same(step(SegmentationLoss(model), model, images, labels), step(compiled, fast_model, images, labels))


# --------------------------------------------------------------------------------------------------
# The recipe on the engine and loop
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from beit_fast.data.segmentation import SegEvalTransform, SegmentationFolder, SegTrainTransform
    from beit_fast.train.segmentation_demo import write_scene_folders

    d = write_scene_folders(tmp_path_factory.mktemp("scenes"), n_train=6, n_val=2, size=72, seed=0)
    train = SegmentationFolder.from_folders(d["train_images"], d["train_masks"], 4,
                                            transform=SegTrainTransform(crop_size=64, img_scale=(288, 72)))
    val = SegmentationFolder.from_folders(d["val_images"], d["val_masks"], 4, transform=SegEvalTransform())
    return train, val


def _cfg(**kw):
    return SegmentConfig(**{**dict(max_iters=4, eval_interval=2, batch_size=2, crop_size=64, img_scale=(288, 72),
                                   stride=43, num_workers=0, warmup_iters=1, lr=1e-3, fast="off", amp="none",
                                   log_freq=1, drop_path=0.1), **kw})


def _seg_model():
    torch.manual_seed(0)
    return build_segmenter("tiny", 4, img_size=64, head=SegmentationHeadConfig(num_classes=4, channels=16, aux_channels=8),
                           embed_dim=32, depth=4, num_heads=2)


def test_resume_is_bit_exact(scenes, tmp_path):
    from beit_fast.utils.checkpoint import CheckpointError
    from beit_fast.train.segmentation import segmenter_from_checkpoint, train_segmentation

    train, val = scenes
    straight = train_segmentation(_seg_model(), train, val, _cfg(), output_dir=tmp_path / "a", progress=False)
    assert straight["steps"] == 4 and len(straight["history"]) == 2 and 0 <= straight["final"]["mIoU"] <= 1
    stopped = train_segmentation(_seg_model(), train, val, _cfg(stop_after_steps=3), output_dir=tmp_path / "b",
                                 progress=False)
    assert stopped["interrupted"] and stopped["steps"] == 3
    resumed = train_segmentation(_seg_model(), train, val, _cfg(resume="auto"), output_dir=tmp_path / "b",
                                 progress=False)
    assert resumed["steps"] == 4
    a, _ = segmenter_from_checkpoint(tmp_path / "a" / "checkpoint-last.pt")
    b, state = segmenter_from_checkpoint(tmp_path / "b" / "checkpoint-last.pt")
    assert state["kind"] == "segment"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed["final"]["mIoU"] == straight["final"]["mIoU"]
    # a checkpoint of another task is not resumed
    from beit_fast.utils.checkpoint import load_checkpoint

    other = load_checkpoint(tmp_path / "a" / "checkpoint-last.pt")
    other["kind"] = "finetune"
    torch.save(other, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="'finetune' checkpoint, not a segmentation one"):
        train_segmentation(_seg_model(), train, val, _cfg(resume=str(tmp_path / "c.pt")), output_dir=tmp_path / "c",
                           progress=False)


LONG = DEV.type == "cuda" or os.environ.get("BEIT_FAST_LONG_INTERPRETER") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="N = 1025 / 1601 in Triton's interpreter: 13 s / 34 s on 2 quiet cores, 84 s / 234 s "
                    "at load ~10; set BEIT_FAST_LONG_INTERPRETER=1 (runs on CUDA with BEIT_FAST_REAL_GPU=1)")
@pytest.mark.parametrize("grid", [32, 40], ids=["512px-N1025", "640px-N1601"])
def test_triton_attention_at_segmentation_lengths(grid):
    """The fused attention with a per-block table at the lengths of 512 and 640 px crops (one head of 64, batch 1
    under the interpreter): output and the q, k, v and table gradients against the math reference."""
    from beit_fast.ops.attention import attention_with_rel_pos_bias
    from beit_fast.ops.rel_pos import relative_position_index, relative_position_table_size

    n, heads = grid * grid + 1, (12 if DEV.type == "cuda" else 1)
    index = relative_position_index((grid, grid)).to(DEV)
    g = torch.Generator().manual_seed(grid)
    q, k, v, dout = (torch.randn(1, heads, n, 64, generator=g).to(DEV) for _ in range(4))
    table = (2 * torch.randn(relative_position_table_size((grid, grid)), heads, generator=g)).to(DEV)
    results = {}
    for backend in ("math", "triton"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, table)]
        out = attention_with_rel_pos_bias(*inputs[:3], inputs[3], index, 0.125, backend=backend)
        out.backward(dout)
        results[backend] = [out.detach()] + [t.grad for t in inputs]
    for name, ref, got in zip(("out", "dq", "dk", "dv", "dtable"), results["math"], results["triton"]):
        err = (got - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item(), f"{name}: {err} vs scale {ref.abs().max().item()}"


def test_cli_trains_from_a_pretraining_checkpoint_and_evaluates(tmp_path, capsys):
    from beit_fast.model.beit import build_model
    from beit_fast.segment import main
    from beit_fast.train.segmentation_demo import write_scene_folders

    d = write_scene_folders(tmp_path / "data", n_train=4, n_val=2, size=72, seed=1)
    torch.manual_seed(0)
    pre = build_model("tiny", img_size=32, embed_dim=32, depth=4, num_heads=2)
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "pre.pt")
    common = ["--train_images", str(d["train_images"]), "--train_masks", str(d["train_masks"]), "--val_images",
              str(d["val_images"]), "--val_masks", str(d["val_masks"]), "--num_classes", "4", "--crop_size", "64",
              "--img_scale", "288", "72", "--stride", "43", "--num_workers", "0", "--device", "cpu", "--amp", "none",
              "--no_progress"]
    result = main(common + ["--finetune", str(tmp_path / "pre.pt"), "--max_iters", "2", "--eval_interval", "2",
                            "--batch_size", "2", "--output_dir", str(tmp_path / "run")])
    assert result["steps"] == 2 and 0 <= result["final"]["mIoU"] <= 1
    assert "final: mIoU" in capsys.readouterr().out
    evaluated = main(common + ["--eval", "--resume", str(tmp_path / "run" / "checkpoint-last.pt")])
    assert evaluated["mIoU"] == result["final"]["mIoU"]
    with pytest.raises(SystemExit, match="is a segmentation checkpoint, not a pretrained backbone"):
        main(common + ["--finetune", str(tmp_path / "run" / "checkpoint-last.pt"), "--max_iters", "2",
                       "--eval_interval", "2", "--output_dir", str(tmp_path / "run2")])
