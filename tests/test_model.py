import math

import pytest
import torch

from beit_fast.model.beit import BeitConfig, RelativePositionBias, build_model, get_config, relative_position_index

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, vocab_size=50)


def official_keys(depth: int, abs_pos: bool = False) -> set[str]:
    """The state-dict keys of the official VisionTransformerForMaskedImageModeling (shared rel. pos. bias)."""
    keys = {
        "cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index",
        "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias",
    }
    if abs_pos:
        keys.add("pos_embed")
    for i in range(depth):
        for k in ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
                  "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2", "norm2.weight", "norm2.bias",
                  "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            keys.add(f"blocks.{i}.{k}")
    return keys


def test_relative_position_index_hand_computed():
    idx = relative_position_index((14, 14))
    assert idx.shape == (197, 197)
    # [CLS] entries
    assert idx[0, 0] == 731 and (idx[0, 1:] == 729).all() and (idx[1:, 0] == 730).all()
    # patch i == patch j: dh = dw = 0 -> 13 * 27 + 13
    assert (idx[1:, 1:].diagonal() == 13 * 27 + 13).all()
    # patch 0 (row 0, col 0) to patch 15 (row 1, col 1): dh = dw = -1 -> 12 * 27 + 12
    assert idx[1 + 0, 1 + 15] == 12 * 27 + 12
    # patch 195 (13, 13) to patch 0 (0, 0): dh = dw = 13 -> 26 * 27 + 26 = 728, the largest patch entry
    assert idx[1 + 195, 1] == 728 and idx[1:, 1:].max() == 728 and idx[1:, 1:].min() == 0
    # patch (0, 5) to (3, 1): dh = -3, dw = 4
    i, j = 0 * 14 + 5, 3 * 14 + 1
    assert idx[1 + i, 1 + j] == (-3 + 13) * 27 + (4 + 13)
    assert RelativePositionBias((14, 14), 12).relative_position_bias_table.shape == (732, 12)


def test_relative_position_index_rectangular_grid():
    idx = relative_position_index((2, 3))
    table = (2 * 2 - 1) * (2 * 3 - 1) + 3  # 18
    assert idx[0, 0] == table - 1 and idx[0, 3] == table - 3 and idx[4, 0] == table - 2
    # patch (1, 2) -> (0, 0): dh = 1, dw = 2 -> (1 + 1) * 5 + (2 + 2)
    assert idx[1 + 5, 1 + 0] == 2 * 5 + 4


def test_bias_broadcast_matches_table():
    rpb = RelativePositionBias((4, 4), 3)
    torch.nn.init.normal_(rpb.relative_position_bias_table)
    bias = rpb()
    assert bias.shape == (3, 17, 17)
    idx = rpb.relative_position_index
    assert torch.equal(bias[2, 5, 9], rpb.relative_position_bias_table[idx[5, 9], 2])


def test_forward_shapes_and_masked_only_head():
    model = build_model("tiny", **SMALL).eval()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5] = True
    mask[2, 3:10] = True
    logits = model(x, mask)
    assert logits.shape == (12, 50)
    all_logits = model(x, mask, return_all_tokens=True)
    assert all_logits.shape == (3, 16, 50)
    torch.testing.assert_close(all_logits[mask], logits)
    assert model.forward_features(x, mask).shape == (3, 17, 32)


def test_mask_token_substituted_before_cls():
    model = build_model("tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    emb = model.embed(x, mask)
    patches = model.patch_embed(x)
    torch.testing.assert_close(emb[:, 0], model.cls_token[0].expand(2, -1))
    torch.testing.assert_close(emb[:, 1:][mask], model.mask_token[0, 0].expand(int(mask.sum()), -1))
    torch.testing.assert_close(emb[:, 1:][~mask], patches[~mask])
    # Masked pixels cannot influence the output at all.
    x2 = x.clone()
    grid = x2.view(2, 3, 4, 8, 4, 8)
    for b, p in mask.nonzero().tolist():
        grid[b, :, p // 4, :, p % 4, :] = torch.randn(3, 8, 8)
    torch.testing.assert_close(model.forward_features(x2, mask), model.forward_features(x, mask))


def test_state_dict_keys_match_official():
    model = build_model("tiny", **SMALL)
    assert set(model.state_dict()) == official_keys(2)
    model_abs = build_model("tiny", **SMALL, use_abs_pos_emb=True)
    assert set(model_abs.state_dict()) == official_keys(2, abs_pos=True)


def test_official_layout_state_dict_loads_strictly():
    model = build_model("tiny", **SMALL)
    # An "official" checkpoint: same keys, different values, wrapped as the official script saves it.
    sd = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
          for k, v in model.state_dict().items()}
    checkpoint = {"model": sd, "epoch": 799}
    fresh = build_model("tiny", **SMALL)
    fresh.load_state_dict(checkpoint["model"], strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_official_initialisation():
    torch.manual_seed(0)
    cfg = get_config("base", depth=4, embed_dim=384, num_heads=6, vocab_size=64)
    model = build_model(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "relative" not in name or name.endswith(("q_bias", "v_bias")):
            if "norm" not in name:
                assert torch.count_nonzero(p) == 0, name
    assert torch.count_nonzero(model.rel_pos_bias.relative_position_bias_table) == 0
    assert model.mask_token.abs().max() <= 0.02 and model.cls_token.abs().max() <= 0.02
    assert model.blocks[0].attn.qkv.weight.abs().max() <= 0.02
    # N(0, s) truncated at +-s has std 0.5396 s
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.5396 * 0.02) < 0.0003
    for l, blk in enumerate(model.blocks, start=1):
        limit = 0.02 / math.sqrt(2 * l)
        assert blk.attn.proj.weight.abs().max() <= limit + 1e-7
        assert blk.attn.proj.weight.abs().max() > 0.9 * limit
        assert blk.mlp.fc2.weight.abs().max() <= limit + 1e-7
        assert blk.mlp.fc1.weight.abs().max() > 0.9 * 0.02
        torch.testing.assert_close(blk.gamma_1, torch.full((384,), 0.1))
    assert torch.equal(model.norm.weight, torch.ones(384))


def test_named_configs():
    assert get_config("base").embed_dim == 768 and get_config("base").depth == 12
    assert get_config("large").num_heads == 16 and get_config("large").init_values == 1e-5
    with pytest.raises(ValueError, match="unknown model"):
        get_config("huge-ish")
    with pytest.raises(ValueError, match="divisible"):
        BeitConfig(img_size=225)
    with torch.device("meta"):
        base = build_model("base")
    n = sum(p.numel() for n_, p in base.named_parameters() if not n_.startswith("lm_head"))
    assert 85e6 < n < 87.5e6


def test_no_layerscale_and_no_shared_bias():
    model = build_model("tiny", **SMALL, init_values=0.0, use_shared_rel_pos_bias=False)
    assert model.blocks[0].gamma_1 is None and model.rel_pos_bias is None
    out = model(torch.randn(1, 3, 32, 32), torch.ones(1, 16, dtype=torch.bool))
    assert out.shape == (16, 50)


def test_wrong_input_size_is_clear():
    model = build_model("tiny", **SMALL)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 48, 48), torch.zeros(1, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 15, dtype=torch.bool))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("bias", ["own+shared", "own", "shared", "none"])
def test_attention_is_the_eager_formula_bit_for_bit(amp, bias):
    """model.Attention calls ops.attention ("math" by default): values and gradients are those of the eager
    formula the model used to compute itself, bit for bit, in fp32 and under bf16 autocast (fp32 tables)."""
    from beit_fast.model.beit import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4, window_size=(3, 4) if "own" in bias else None)
    rpb = RelativePositionBias((3, 4), 4)
    with torch.no_grad():
        for p in list(attn.parameters()) + list(rpb.parameters()):
            p.normal_(0, 0.5)
    assert attn.attn_backend == "math"
    x = torch.randn(2, 13, 32)

    def eager(x, shared):
        q, k, v = attn.qkv_projection(x)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        own = attn.table_bias()  # the official order: own + shared, then added to the scores
        bias = shared if own is None else (own if shared is None else own + shared)
        if bias is not None:
            scores = scores + bias
        out = scores.softmax(dim=-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(2, 13, 32))

    results = []
    for fn in (eager, attn):
        attn.zero_grad(set_to_none=True)
        rpb.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(xi, rpb() if "shared" in bias else None)
        out.float().square().sum().backward()
        grads = [p.grad for p in list(attn.parameters()) + list(rpb.parameters()) if p.grad is not None]
        results.append([out, xi.grad, *grads])
    assert len(results[0]) == len(results[1])
    for got, expected in zip(results[1], results[0]):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_attention_backend_names():
    from beit_fast.model.beit import Attention

    attn = Attention(16, 2)
    with pytest.warns(DeprecationWarning, match="deprecated alias of 'math'"):
        attn.attn_backend = "reference"
    assert attn.attn_backend == "math"
    model = build_model("tiny", **SMALL)
    with pytest.warns(DeprecationWarning):
        model.configure_fast_path(attention="reference", fused_embed=None)
    assert {blk.attn.attn_backend for blk in model.blocks} == {"math"}
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model.configure_fast_path(attention="flash")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        model.configure_fast_path(activation_checkpointing="some")
