"""Checkpoint conversion: official (ours) <-> HuggingFace <-> timm, files, and the CLI."""
import argparse
import os
import runpy
import sys

import pytest
import torch

from beit_fast.interop import (
    convert_state_dict,
    detect_format,
    detect_layout,
    hf_to_official,
    infer_architecture,
    load_state_dict,
    official_config_from_state_dict,
    official_pretrain_to_finetune,
    official_to_hf,
    official_to_timm,
    save_state_dict,
    timm_kwargs_from_state_dict,
    timm_to_official,
)
from beit_fast.model.beit import VisionTransformerForMaskedImageModeling, build_model, relative_position_index

transformers = pytest.importorskip("transformers")
timm_beit = pytest.importorskip("timm.models.beit")
from transformers import BeitConfig as HFConfig  # noqa: E402
from transformers import BeitForImageClassification, BeitForMaskedImageModeling  # noqa: E402

from beit_fast.convert import main as convert_main  # noqa: E402
from beit_fast.interop import hf_config_from_state_dict, official_config_from_hf  # noqa: E402

V = 50
ATOL = 1e-5  # fp32 forward of two different implementations (same math, different op order)


def perturb_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def ours() -> VisionTransformerForMaskedImageModeling:
    torch.manual_seed(0)
    return perturb_(build_model("tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                vocab_size=V)).eval()


def hf_mim(**kw) -> BeitForMaskedImageModeling:
    torch.manual_seed(0)
    cfg = HFConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                   patch_size=8, vocab_size=V, use_mask_token=True, use_shared_relative_position_bias=True, **kw)
    return perturb_(BeitForMaskedImageModeling(cfg)).eval()  # layer_norm_eps: HF's default 1e-12


def timm_cls(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, init_values=0.1,
                use_abs_pos_emb=False, use_rel_pos_bias=True)
    base.update(kw)
    torch.manual_seed(0)
    return perturb_(timm_beit.Beit(**base)).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.rand(2, 16, generator=g) < 0.4
    mask[:, 0] = True
    return x, mask


def assert_identical(a: dict, b: dict, ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
def test_detect_format_and_layout():
    sd = ours().state_dict()
    assert (detect_format(sd), detect_layout(sd)) == ("official", "pretrain")
    assert detect_format(official_to_hf(sd, naming="hf")) == "hf"
    assert detect_format(official_to_hf(sd, naming="hf_legacy")) == "hf_legacy"
    tsd = timm_cls().state_dict()
    assert (detect_format(tsd), detect_layout(tsd)) == ("timm", "classification")
    assert detect_format(timm_to_official(tsd)) == "official"
    assert detect_layout(official_to_hf(timm_to_official(tsd))) == "classification"
    bare = {k: v for k, v in official_to_hf(sd).items() if k.startswith("beit.")}
    assert detect_format({k[len("beit."):]: v for k, v in bare.items()}) == "hf"  # a bare BeitModel


@pytest.mark.parametrize("sd, match", [
    ({"weight": torch.zeros(2)}, "unrecognised state dict"),
    ({"backbone.blocks.0.attn.qkv.weight": torch.zeros(3, 1), "decode_head.conv_seg.weight": torch.zeros(1)},
     "segmentation"),
    ({"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), "blocks.0.attn.in_proj_weight": torch.zeros(12, 4)},
     "qkv.weight"),
])
def test_detect_format_refuses_unknown(sd, match):
    with pytest.raises(ValueError, match=match):
        detect_format(sd)


# --------------------------------------------------------------------------------------------------
# official <-> HF
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("naming", ["hf", "hf_legacy"])
def test_official_to_hf_to_official_is_bitwise_identical(naming):
    sd = ours().state_dict()
    sd = {k: (v.to(torch.bfloat16) if k.startswith("blocks.1.") and v.is_floating_point() else v)
          for k, v in sd.items()}  # dtypes are carried as they are
    assert_identical(hf_to_official(official_to_hf(sd, naming=naming)), sd)
    ft = timm_to_official(timm_cls(use_shared_rel_pos_bias=True, use_abs_pos_emb=True).state_dict())
    assert_identical(hf_to_official(official_to_hf(ft, naming=naming)), ft)


def test_official_relative_position_index_is_timm_and_hf_index():
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    for grid in ((4, 4), (14, 14), (3, 5)):
        ours_index = relative_position_index(grid)
        assert torch.equal(ours_index, timm_beit.gen_relative_position_index(grid))
        assert torch.equal(ours_index, BeitRelativePositionBias.generate_relative_position_index(grid))


def test_hf_mim_converts_to_our_model_with_same_outputs_and_back():
    hf = hf_mim()
    x, mask = inputs()
    sd = convert_state_dict(hf.state_dict(), "official")
    cfg = official_config_from_hf(hf.config)
    assert cfg.layer_norm_eps == 1e-12  # carried from the HF config: HF's default, not the official 1e-6
    model = VisionTransformerForMaskedImageModeling(cfg).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        expected = hf(pixel_values=x, bool_masked_pos=mask).logits[mask]
        torch.testing.assert_close(model(x, mask), expected, rtol=1e-5, atol=ATOL)
    # and back: a fresh HF model loading our state dict is the original one, bit for bit
    again = BeitForMaskedImageModeling(hf.config).eval()
    again.load_state_dict(official_to_hf(model.state_dict(), naming="auto"), strict=True)
    assert_identical(again.state_dict(), hf.state_dict())


def test_our_model_converts_to_hf_with_same_outputs():
    model = ours()
    sd = model.state_dict()
    cfg = hf_config_from_state_dict(sd)
    assert cfg.layer_norm_eps == 1e-6 and cfg.num_attention_heads == 2 and cfg.image_size == 32
    hf = BeitForMaskedImageModeling(cfg).eval()
    hf.load_state_dict(official_to_hf(sd), strict=True)
    x, mask = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x, bool_masked_pos=mask).logits[mask], model(x, mask),
                                   rtol=1e-5, atol=ATOL)
    rebuilt = VisionTransformerForMaskedImageModeling(official_config_from_state_dict(sd))
    rebuilt.load_state_dict(sd, strict=True)


def test_legacy_names_are_what_save_pretrained_writes(tmp_path):
    hf = hf_mim(use_relative_position_bias=True)
    hf.save_pretrained(tmp_path)
    on_disk = load_state_dict(tmp_path)
    assert detect_format(on_disk) == "hf_legacy"
    official = convert_state_dict(on_disk, "official")
    assert_identical(official, convert_state_dict(hf.state_dict(), "official"))
    ours_legacy = official_to_hf(official, naming="hf_legacy")
    assert sorted(ours_legacy) == sorted(on_disk)
    assert all(torch.equal(ours_legacy[k], on_disk[k]) for k in on_disk)


def test_hf_cases_without_official_counterpart_are_refused():
    sd = official_to_hf(ours().state_dict())
    bad = dict(sd)
    bad["beit.layers.0.attention.k_proj.bias"] = torch.ones(32)
    with pytest.raises(ValueError, match="key bias"):
        hf_to_official(bad)
    zero = dict(sd)
    zero["beit.layers.0.attention.k_proj.bias"] = torch.zeros(32)  # an all-zero key bias is BEiT's
    assert "blocks.0.attn.qkv.weight" in hf_to_official(zero)
    two_norms = dict(sd, **{"beit.layernorm.weight": torch.ones(32), "beit.layernorm.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="use_mean_pooling=False"):
        hf_to_official(two_norms)


# --------------------------------------------------------------------------------------------------
# timm <-> official <-> HF classification
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_pooling", [True, False])
def test_timm_classifier_through_hf_and_back(mean_pooling):
    t = timm_cls(global_pool="avg" if mean_pooling else "token", use_fc_norm=mean_pooling)
    tsd = t.state_dict()
    official = convert_state_dict(tsd, "official")
    assert "blocks.0.attn.relative_position_index" in official  # the official fine-tuning layout saves it
    hf_sd = convert_state_dict(official, "hf")
    hf = BeitForImageClassification(hf_config_from_state_dict(official)).eval()
    hf.load_state_dict(hf_sd, strict=True)
    x, _ = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, t(x), rtol=1e-5, atol=ATOL)
    assert_identical(convert_state_dict(hf.state_dict(), "timm"), tsd)
    rebuilt = timm_beit.Beit(**timm_kwargs_from_state_dict(hf.state_dict()))
    rebuilt.load_state_dict(convert_state_dict(hf.state_dict(), "timm"), strict=True)


def test_official_pretrain_to_timm_backbone():
    model = ours()
    sd = model.state_dict()
    with pytest.raises(ValueError, match="drop_mim_head"):
        official_to_timm(sd)
    tsd = official_to_timm(sd, drop_mim_head=True)
    kwargs = timm_kwargs_from_state_dict(tsd, num_heads=2)
    assert kwargs["use_shared_rel_pos_bias"] and not kwargs["use_fc_norm"] and kwargs["num_classes"] == 0
    t = timm_beit.Beit(**kwargs).eval()
    t.load_state_dict(tsd, strict=True)
    x, _ = inputs(3)
    no_mask = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(t.forward_features(x), model.forward_features(x, no_mask), rtol=1e-5, atol=ATOL)


def test_official_pretrain_to_finetune_per_block_tables():
    sd = ours().state_dict()
    ft = official_pretrain_to_finetune(sd)
    shared = sd["rel_pos_bias.relative_position_bias_table"]
    for i in range(2):
        assert torch.equal(ft[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert not any(k.startswith(("rel_pos_bias", "lm_head", "mask_token", "norm.")) for k in ft)
    # the fine-tuning model: mean pooling + a new fc_norm and head, as the official recipe builds it
    t = timm_beit.Beit(**timm_kwargs_from_state_dict(ft, num_classes=5, use_fc_norm=True, global_pool="avg"))
    result = t.load_state_dict(official_to_timm(ft), strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert not result.unexpected_keys
    arch = infer_architecture(ft)
    assert arch["use_rel_pos_bias"] and not arch["use_shared_rel_pos_bias"] and arch["layout"] == "backbone"


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def test_save_and_load_files(tmp_path):
    sd = official_to_hf(ours().state_dict(), naming="hf_legacy")
    for name, wrap in (("a.safetensors", None), ("b.pt", None), ("c.pth", "model")):
        path = save_state_dict(sd, tmp_path / name, wrap=wrap)
        back = load_state_dict(path)
        assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    assert sorted(load_state_dict(tmp_path / "ddp.pth")) == sorted(sd)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pt")


def test_pickled_objects_need_trust(tmp_path):
    sd = ours().state_dict()
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="trust_pickle"):
        load_state_dict(tmp_path / "official.pth")
    with pytest.warns(UserWarning, match="arbitrary code"):
        assert sorted(load_state_dict(tmp_path / "official.pth", trust_pickle=True)) == sorted(sd)


def _corrupt_safetensors(tmp_path):
    """Broken .safetensors files a download or a disk can produce, and crafted ones."""
    import json
    import struct

    good = save_state_dict(ours().state_dict(), tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    files = {
        "truncated": good[: len(good) // 2],
        "header_only": good[: 8 + n],
        "tiny": good[:5],
        "empty": b"",
        "random": os.urandom(4096),
        "huge_header_length": struct.pack("<Q", 2**62) + good[8:],
        "bad_json": struct.pack("<Q", 16) + b"{not json at all" + good[24:],
    }
    shifted = dict(header)
    shifted[name] = {**header[name], "data_offsets": [0, 2**40]}
    text = json.dumps(shifted).encode()
    files["offsets_past_the_end"] = struct.pack("<Q", len(text)) + text + good[8 + n:]
    wrong = dict(header)
    wrong[name] = {**header[name], "dtype": "NOPE"}
    text = json.dumps(wrong).encode()
    files["unknown_dtype"] = struct.pack("<Q", len(text)) + text + good[8 + n:]
    paths = {}
    for key, data in files.items():
        paths[key] = tmp_path / f"{key}.safetensors"
        paths[key].write_bytes(data)
    return paths


def test_corrupt_safetensors_give_clear_errors(tmp_path, capsys):
    for key, path in _corrupt_safetensors(tmp_path).items():
        with pytest.raises(ValueError, match=f"{path.name}.*not a valid safetensors file"):
            load_state_dict(path)
        assert convert_main([str(path), str(tmp_path / f"{key}.pt")]) == 1, key
        err = capsys.readouterr().err
        assert "error:" in err and path.name in err and "Traceback" not in err, (key, err)
        assert not (tmp_path / f"{key}.pt").exists()


def test_hf_index_shards_stay_inside_their_folder(tmp_path):
    import json

    sd = official_to_hf(ours().state_dict(), naming="hf_legacy")
    save_state_dict(sd, tmp_path / "outside.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors"):
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in sd}}))
        with pytest.raises(ValueError, match="outside"):
            load_state_dict(hf)
        assert convert_main([str(hf), str(tmp_path / "o.pt")]) == 1
    # a shard inside the folder (also in a subfolder) loads
    save_state_dict(sd, hf / "sub" / "model-00001-of-00001.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "sub/model-00001-of-00001.safetensors" for k in sd}}))
    assert sorted(load_state_dict(hf)) == sorted(sd)
    (hf / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(ValueError, match="index"):
        load_state_dict(hf)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_official_to_hf_directory_loads_with_from_pretrained(tmp_path, capsys):
    model = ours()
    src = save_state_dict(model.state_dict(), tmp_path / "checkpoint.pth", wrap="model")
    assert convert_main([str(src), str(tmp_path / "hf_dir"), "--to", "hf"]) == 0
    assert "official, pretrain layout" in capsys.readouterr().out
    hf = BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf_dir").eval()
    assert hf.config.layer_norm_eps == 1e-6
    x, mask = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x, bool_masked_pos=mask).logits[mask], model(x, mask),
                                   rtol=1e-5, atol=ATOL)
    # HF directory -> official safetensors -> our model, bit for bit the same weights
    out = tmp_path / "back.safetensors"
    assert convert_main([str(tmp_path / "hf_dir"), str(out), "-q"]) == 0
    assert_identical(load_state_dict(out), model.state_dict(), ordered=False)  # safetensors sorts its keys


@pytest.mark.filterwarnings("ignore:'beit_fast.convert' found in sys.modules:RuntimeWarning")
def test_cli_to_timm_and_module_entry_point(tmp_path, monkeypatch):
    src = save_state_dict(ours().state_dict(), tmp_path / "pt.safetensors")
    dst = tmp_path / "timm.pt"
    assert convert_main([str(src), str(dst), "--to", "timm", "-q"]) == 1  # refused: MIM head
    monkeypatch.setattr(sys, "argv", ["beit_fast.convert", str(src), str(dst), "--to", "timm", "--drop-mim-head",
                                      "--format", "safetensors", "-q"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("beit_fast.convert", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:  # --format wins over the suffix
        assert "mask_token" not in f.keys() and "blocks.0.attn.qkv.weight" in f.keys()


def test_cli_errors(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope.pt"), str(tmp_path / "out.pt")]) == 1
    assert "SRC not found" in capsys.readouterr().err
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    assert convert_main([str(tmp_path / "other.pt"), str(tmp_path / "out.pt")]) == 1
    assert "unrecognised state dict" in capsys.readouterr().err
    src = save_state_dict(ours().state_dict(), tmp_path / "ok.pt")
    (tmp_path / "exists.pt").write_bytes(b"")
    assert convert_main([str(src), str(tmp_path / "exists.pt")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert convert_main([str(src), str(tmp_path / "exists.pt"), "--overwrite", "-q"]) == 0
    assert convert_main([str(src), str(tmp_path / "x.pt"), "--from", "hf"]) == 1
    assert "looks like 'official'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--to", "--format", "--from", "--hf-naming", "--drop-mim-head", "--num-heads", "--img-size",
                 "--layer-norm-eps", "--trust-pickle", "--overwrite", "--quiet"):
        assert flag in help_text
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(src), str(tmp_path / "y.pt"), "--to", "onnx"])
    assert exit_info.value.code == 2
    assert os.path.exists(src)


def test_non_square_grid_needs_grid_for_the_index():
    t = timm_cls(img_size=(24, 40), use_shared_rel_pos_bias=True)
    tsd = t.state_dict()
    with pytest.raises(ValueError, match="grid"):
        timm_to_official(tsd)
    official = timm_to_official(tsd, grid=(3, 5))
    assert torch.equal(official["blocks.1.attn.relative_position_index"], relative_position_index((3, 5)))
    assert torch.equal(official["rel_pos_bias.relative_position_index"], relative_position_index((3, 5)))
    back = hf_to_official(official_to_hf(official), grid=(3, 5))
    assert_identical(back, official)
