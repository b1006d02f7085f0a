"""Layer-wise lr decay: layer ids, parameter groups against hand-computed scales, schedule application."""
import pytest
import torch

from beit_fast.model.beit import BeitConfig, build_classifier
from beit_fast.train.optim import apply_schedule, layer_id_for_vit, param_groups_layer_decay

TINY = BeitConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, expected", [
    ("cls_token", 0), ("mask_token", 0), ("pos_embed", 0), ("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0),
    ("rel_pos_bias.relative_position_bias_table", 13), ("blocks.0.attn.qkv.weight", 1), ("blocks.0.gamma_1", 1),
    ("blocks.11.mlp.fc2.bias", 12), ("blocks.5.attn.relative_position_bias_table", 6), ("norm.weight", 13),
    ("fc_norm.bias", 13), ("head.weight", 13), ("lm_head.weight", 13),
])
def test_layer_id_for_vit_official_mapping(name, expected):
    assert layer_id_for_vit(name, 12) == expected


def _scale_and_wd(groups):
    out = {}
    for g in groups:
        for name in g["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["lr_scale"], g["weight_decay"], g["layer_id"])
    return out


def test_groups_hand_computed_depth2_decay_half():
    model = build_classifier(TINY, 5, use_abs_pos_emb=True)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    info = _scale_and_wd(groups)
    # Every trainable parameter is in exactly one group, each group holds the tensors it names.
    assert set(info) == {n for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    for g in groups:
        assert all(p is params[n] for n, p in zip(g["param_names"], g["params"]))
    # Hand-computed scales: 0.5 ** (L + 1 - layer), L = 2.
    expected_scale = {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    for name, (scale, _, layer) in info.items():
        assert scale == pytest.approx(expected_scale[layer])
    assert info["cls_token"][0] == info["pos_embed"][0] == info["patch_embed.proj.weight"][0] == 0.125
    assert info["blocks.0.attn.qkv.weight"][0] == 0.25 and info["blocks.0.norm1.weight"][0] == 0.25
    assert info["blocks.1.mlp.fc1.weight"][0] == 0.5
    assert info["blocks.1.attn.relative_position_bias_table"][0] == 0.5
    assert info["head.weight"][0] == info["head.bias"][0] == info["fc_norm.weight"][0] == 1.0
    # Weight decay 0: 1-D params, biases, no_weight_decay() names; the 2-D bias tables decay (official).
    no_wd = {n for n, (_, wd, _) in info.items() if wd == 0.0}
    expected_no_wd = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")} | {"cls_token",
                                                                                                   "pos_embed"}
    assert no_wd == expected_no_wd
    for name in ("blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.gamma_1", "fc_norm.weight", "head.bias"):
        assert name in no_wd
    for name in ("blocks.0.attn.relative_position_bias_table", "head.weight", "patch_embed.proj.weight",
                 "blocks.1.attn.proj.weight"):
        assert info[name][1] == 0.05
    # Groups are per (layer, decay): 4 layers x 2.
    assert len(groups) == 8


def test_extra_no_weight_decay_names_and_shared_table():
    model = build_classifier(TINY, 5, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    groups = param_groups_layer_decay(model, 0.1, 0.5, no_weight_decay=["rel_pos_bias.relative_position_bias_table"])
    info = _scale_and_wd(groups)
    assert info["rel_pos_bias.relative_position_bias_table"] == (1.0, 0.0, 3)


def test_layer_decay_one_gives_unit_scales():
    model = build_classifier(TINY, 3)
    assert all(g["lr_scale"] == 1.0 for g in param_groups_layer_decay(model, 0.05, 1.0))
    with pytest.raises(ValueError):
        param_groups_layer_decay(model, 0.05, 0.0)


def test_apply_schedule_scales_lr_and_keeps_no_decay_groups():
    model = build_classifier(TINY, 3)
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.5), lr=1.0)
    apply_schedule(opt, 2e-3, 0.0)  # a wd schedule that reaches 0 must not turn decay off for good
    apply_schedule(opt, 1e-3, 0.07)
    params = dict(model.named_parameters())
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        name = g["param_names"][0]
        decays = params[name].ndim > 1 and not name.endswith(".bias") and name not in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.07 if decays else 0.0)
    # The optimizer still steps and round-trips through its state dict with the extra keys.
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    opt2 = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.5), lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
