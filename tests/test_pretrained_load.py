"""Loading pretraining checkpoints into the classifier; relative position bias resizing; official key names."""
import functools

import pytest
import torch

from beit_fast.utils.checkpoint import atomic_save
from beit_fast.model.beit import build_classifier, build_model
from beit_fast.interop.pretrained import (
    PretrainedLoadError, classifier_config_from_checkpoint, load_pretrained, resize_pos_embed,
    resize_rel_pos_bias_table,
)

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, vocab_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(g):
    return (2 * g[0] - 1) * (2 * g[1] - 1) + 3


# --------------------------------------------------------------------------------------------------
# resize_rel_pos_bias_table
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bicubic", "geometric"])
def test_resize_identity_when_grid_unchanged(method):
    table = torch.randn(_rows((14, 14)), 3)
    out = resize_rel_pos_bias_table(table, (14, 14), (14, 14), method=method)
    assert out is table


@pytest.mark.parametrize("method", ["bicubic", "geometric"])
def test_resize_14_to_24_shape_constant_heads_and_cls_rows(method):
    heads = 3
    table = torch.empty(_rows((14, 14)), heads)
    table[:-3] = torch.tensor([0.5, -1.0, 2.0])  # a constant map per head
    table[-3:] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out = resize_rel_pos_bias_table(table, (14, 14), (24, 24), method=method)
    assert out.shape == (47 * 47 + 3, heads) == (_rows((24, 24)), heads)
    torch.testing.assert_close(out[:-3], table[:1].expand(47 * 47, heads), rtol=0, atol=1e-5)
    assert torch.equal(out[-3:], table[-3:])


def test_resize_keeps_centre_of_smooth_map_and_handles_non_square():
    g = (5, 5)
    dh = torch.arange(-4, 5, dtype=torch.float32)
    smooth = (dh[:, None] * 0.1 + dh[None, :] * 0.2).reshape(-1, 1)  # a linear ramp (bicubic keeps it inside)
    table = torch.cat((smooth, torch.zeros(3, 1)))
    up = resize_rel_pos_bias_table(table, g, (9, 9))
    m = up[:-3, 0].reshape(17, 17)
    assert m[8, 8].abs() < 0.05  # the zero offset stays (about) zero
    assert (m[8, 1:] - m[8, :-1] > 0).all()  # still increasing along w
    ns = resize_rel_pos_bias_table(torch.randn(_rows((3, 4)), 2), (3, 4), (6, 5))
    assert ns.shape == (_rows((6, 5)), 2)
    down = resize_rel_pos_bias_table(torch.randn(_rows((8, 8)), 2), (8, 8), (4, 4))
    assert down.shape == (_rows((4, 4)), 2)


def test_resize_errors():
    with pytest.raises(ValueError, match="rows"):
        resize_rel_pos_bias_table(torch.zeros(100, 2), (14, 14), (24, 24))
    with pytest.raises(ValueError, match="geometric"):
        resize_rel_pos_bias_table(torch.zeros(_rows((8, 8)), 2), (8, 8), (4, 4), method="geometric")
    with pytest.raises(ValueError, match="method"):
        resize_rel_pos_bias_table(torch.zeros(_rows((8, 8)), 2), (8, 8), (4, 4), method="nearest")


def test_resize_pos_embed_keeps_cls():
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, (4, 4)) is pe
    out = resize_pos_embed(pe, (6, 6))
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])


# --------------------------------------------------------------------------------------------------
# Classifier layout
# --------------------------------------------------------------------------------------------------
def test_classifier_keys_are_official_finetune_names():
    model = build_classifier("tiny", 7, depth=1, **{k: v for k, v in SMALL.items() if k != "depth"})
    expected = {
        "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "blocks.0.gamma_1", "blocks.0.gamma_2", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.relative_position_bias_table",
        "blocks.0.attn.relative_position_index", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias",
    }
    assert set(model.state_dict()) == expected
    assert model.state_dict()["blocks.0.attn.relative_position_bias_table"].shape == (_rows((4, 4)), 2)
    assert torch.count_nonzero(model.blocks[0].attn.relative_position_bias_table) == 0
    cls_model = build_classifier("tiny", 7, use_mean_pooling=False, use_abs_pos_emb=True, use_rel_pos_bias=False,
                                 use_shared_rel_pos_bias=True, **{k: v for k, v in SMALL.items() if k != "depth"},
                                 depth=1)
    keys = set(cls_model.state_dict())
    assert {"norm.weight", "norm.bias", "pos_embed", "rel_pos_bias.relative_position_bias_table",
            "rel_pos_bias.relative_position_index"} <= keys
    assert not any(k.startswith("fc_norm") or "attn.relative_position" in k for k in keys)
    assert cls_model.no_weight_decay() == {"pos_embed", "cls_token"} and cls_model.get_num_layers() == 1
    assert cls_model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_head_init_scaled():
    torch.manual_seed(0)
    model = build_classifier("tiny", 10, **SMALL)
    assert model.head.weight.abs().max() <= 0.02 * 0.001 + 1e-12
    assert model.head.weight.abs().max() > 0
    assert torch.count_nonzero(model.head.bias) == 0
    big = build_classifier("tiny", 10, init_scale=1.0, **SMALL)
    assert big.head.weight.abs().max() > 0.005


# --------------------------------------------------------------------------------------------------
# load_pretrained
# --------------------------------------------------------------------------------------------------
def _pretrained(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model("tiny", **{**SMALL, **kw})
    with torch.no_grad():  # make every tensor distinctive (the tables start at zero)
        model.rel_pos_bias.relative_position_bias_table.normal_()
        model.norm.weight.normal_()
    return model


def _check_loaded(clf, pre, report):
    sd = pre.state_dict()
    table = sd["rel_pos_bias.relative_position_bias_table"]
    for blk in clf.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, table)
    tables = [blk.attn.relative_position_bias_table for blk in clf.blocks]
    assert tables[0].data_ptr() != tables[1].data_ptr()  # copies, not one shared tensor
    own = clf.state_dict()
    for k, v in sd.items():
        if k.startswith(("lm_head", "rel_pos_bias", "norm.")) or k == "mask_token":
            continue
        assert torch.equal(own[k], v), k
    assert "lm_head.weight" not in own and "mask_token" not in own
    assert clf.head.weight.abs().max() <= 2e-5
    assert torch.equal(clf.fc_norm.weight, torch.ones_like(clf.fc_norm.weight))
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report["unexpected"] == []
    assert any("lm_head" in n for n in report["notes"]) and any("shared" in n for n in report["notes"])


def test_load_pretrained_from_state_dict():
    pre = _pretrained()
    clf = build_classifier("tiny", 10, **SMALL)
    sd = pre.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    report = load_pretrained(clf, sd)
    _check_loaded(clf, pre, report)
    assert all(torch.equal(before[k], v) for k, v in sd.items()) and set(before) == set(sd)  # input not modified


def test_load_pretrained_from_file(tmp_path):
    pre = _pretrained(1)
    path = atomic_save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "pt.pt")
    clf = build_classifier("tiny", 10, **SMALL)
    _check_loaded(clf, pre, load_pretrained(clf, path))
    assert load_pretrained(build_classifier("tiny", 10, **SMALL), {"module": pre.state_dict()})["missing"]
    cfg = classifier_config_from_checkpoint(path, img_size=32)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (32, 2, 2, 4, 32)


def test_loaded_classifier_matches_pretraining_backbone():
    """Per-block copies of the shared table give the pretraining model's block outputs exactly."""
    pre = _pretrained(2).eval()
    clf = build_classifier("tiny", 10, **SMALL).eval()
    load_pretrained(clf, pre.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        h = pre.embed(x, torch.zeros(3, 16, dtype=torch.bool))
        bias = pre.rel_pos_bias()
        outs = []
        for blk in pre.blocks:
            h = blk(h, bias)
            outs.append(h[:, 1:].mean(1))
        feats = clf.forward_layer_features(x, [2, 1])
        both = clf.forward_layer_features(x, [1], include_cls=True)[0]
    torch.testing.assert_close(feats[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[:, 32:], outs[0], rtol=1e-5, atol=1e-5)


def test_load_with_grid_change_and_cls_pooling():
    pre = _pretrained(3, use_abs_pos_emb=True)
    clf = build_classifier("tiny", 10, use_abs_pos_emb=True, **{**SMALL, "img_size": 24})
    report = load_pretrained(clf, pre.state_dict())
    assert clf.blocks[0].attn.relative_position_bias_table.shape == (_rows((6, 6)), 2)
    assert clf.pos_embed.shape == (1, 37, 32)
    assert torch.equal(clf.pos_embed[:, 0], pre.pos_embed[:, 0])
    assert any("resized" in n for n in report["notes"]) and any("pos_embed" in n for n in report["notes"])
    assert clf(torch.randn(1, 3, 24, 24)).shape == (1, 10)
    cls = build_classifier("tiny", 10, use_mean_pooling=False, **SMALL)
    load_pretrained(cls, _pretrained(4).state_dict())
    assert torch.equal(cls.norm.weight, _pretrained(4).norm.weight)  # [CLS] pooling keeps the pretrained norm


def test_load_hf_layout():
    from beit_fast.interop import convert_state_dict

    pre = _pretrained(5)
    hf = convert_state_dict(pre.state_dict(), to="hf_legacy")
    clf = build_classifier("tiny", 10, **SMALL)
    _check_loaded(clf, pre, load_pretrained(clf, hf))


def test_load_errors():
    pre = _pretrained(6)
    sd = pre.state_dict()
    broken = {k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp")}
    clf = build_classifier("tiny", 10, **SMALL)
    before = clf.state_dict()["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(PretrainedLoadError, match="lacks .* backbone weights"):
        load_pretrained(clf, broken)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, before)  # nothing loaded on error
    report = load_pretrained(clf, broken, strict_backbone=False)
    assert "blocks.1.mlp.fc1.weight" in report["missing"]
    wide = build_classifier("tiny", 10, **{**SMALL, "embed_dim": 64})
    with pytest.raises(PretrainedLoadError, match="shapes differ"):
        load_pretrained(wide, sd)
    with pytest.raises(PretrainedLoadError):
        load_pretrained(clf, {"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_pretrained(clf, "/nonexistent/checkpoint.pt")
    # A fine-tuned checkpoint's head of another class count is dropped, not an error.
    other = build_classifier("tiny", 3, **SMALL)
    report = load_pretrained(clf, other.state_dict())
    assert any("head.weight" in n for n in report["notes"]) and "head.weight" in report["missing"]
    assert "fc_norm.weight" not in report["missing"]


def test_classifier_matches_timm_beit():
    """Our fine-tuning classifier and timm's Beit (official fine-tuning layout) give the same logits."""
    timm_beit = pytest.importorskip("timm.models.beit")
    from beit_fast.interop import convert_state_dict

    torch.manual_seed(0)
    clf = build_classifier("tiny", 5, **SMALL).eval()
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the head and tables are (near) zero at init
    ref = timm_beit.Beit(img_size=16, patch_size=4, num_classes=5, global_pool="avg", embed_dim=32, depth=2,
                         num_heads=2, qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                         norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_state_dict(convert_state_dict(clf.state_dict(), to="timm"), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_classifier_attention_backends_match_reference(backend):
    torch.manual_seed(0)
    clf = build_classifier("tiny", 5, **SMALL).eval()
    with torch.no_grad():
        for blk in clf.blocks:
            blk.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = clf(x)
        fast = clf.configure_fast_path(attention=backend)(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
