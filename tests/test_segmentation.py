"""Semantic segmentation (beit_fast.model.segmentation): HF and official mmseg layouts with logits parity, the metric
against a hand-worked example and an independent implementation, the training pipeline's properties, sliding
window vs whole image, layer-decay groups, bad input. Tiny models (D=32, 64x64 inputs), CPU."""
import colorsys
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast.model.segmentation import SegmentationHeadConfig, build_segmenter
from beit_fast.data.segmentation import (SegmentationDataError, SegmentationFolder, SegTrainTransform, _hsv_to_rgb,
                                         _rgb_to_hsv, pair_folders, photometric_distortion, reduce_zero_label_)
from beit_fast.model.segmentation_inference import model_logits, predict, rescale_size, slide_logits
from beit_fast.interop.segmentation_keys import (convert_segmentation_state_dict, detect_segmentation_format, hf_config_for,
                                         out_indices_from_hf, segmentation_from_hf, segmentation_to_hf,
                                         segmenter_from_hf_config)
from beit_fast.train.segmentation_metrics import SegmentationMetric, intersect_and_union
from beit_fast.train.segmentation import poly_schedule, segmentation_param_groups

TINY = dict(embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)


def tiny_segmenter(classes=5, depth=4, out_indices=None, **kw):
    torch.manual_seed(0)
    head = SegmentationHeadConfig(num_classes=classes, out_indices=out_indices, aux_channels=16)
    return build_segmenter("tiny", classes, img_size=64, head=head, **{**TINY, "depth": depth, **kw})


def randomize_(model, scale=0.2):
    """Every parameter and BatchNorm statistic random, so that no layer is an identity by initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, scale)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model


# --------------------------------------------------------------------------------------------------
# HF BeitForSemanticSegmentation and the official mmseg layout
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair():
    """A random HF BeitForSemanticSegmentation (6 blocks: HF cannot read the last block) and its config."""
    transformers = pytest.importorskip("transformers")
    ours = tiny_segmenter(depth=6, out_indices=(0, 1, 2, 4), layer_norm_eps=1e-6)
    config = hf_config_for(ours)
    torch.manual_seed(1)
    hf = randomize_(transformers.BeitForSemanticSegmentation(config)).eval()
    return hf, config


def test_hf_logits_equal_ours_and_state_dict_goes_back_strictly(hf_pair):
    hf, config = hf_pair
    sd = hf.state_dict()
    assert detect_segmentation_format(sd) == "hf"
    ours = segmenter_from_hf_config(config).eval()
    assert list(config.out_indices) == [2, 3, 4, 6]
    assert ours.backbone.out_indices == out_indices_from_hf(config.out_indices) == (0, 1, 2, 4)
    ours.load_state_dict(segmentation_from_hf(sd), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.shape == ref.shape == (2, 5, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # a wrong block order must not pass: HF's out_indices read block i - 2
    wrong = segmenter_from_hf_config(config).eval()
    wrong.load_state_dict(ours.state_dict())
    wrong.backbone.out_indices = (1, 2, 3, 4)  # HF's indices read as block numbers
    with torch.no_grad():
        assert (wrong(x) - ref).abs().max() > 1e-2 * ref.abs().max()
    # back: our state dict in HF names loads strictly into a fresh HF model, values unchanged
    fresh = type(hf)(config)
    fresh.load_state_dict(segmentation_to_hf(ours.state_dict(), "hf"), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_hf_legacy_names_are_save_pretrained_names(hf_pair, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    hf, config = hf_pair
    hf.save_pretrained(tmp_path)
    saved = safetensors.load_file(str(tmp_path / "model.safetensors"))
    assert detect_segmentation_format(saved) == "hf_legacy"
    official = segmentation_from_hf(saved)
    legacy = segmentation_to_hf(official, "hf_legacy")
    assert set(legacy) == set(saved)
    assert all(torch.equal(legacy[k], saved[k]) for k in saved)


def test_official_mmseg_layout_is_ours_and_round_trips():
    model = tiny_segmenter()
    sd = model.state_dict()
    # the official mmseg checkpoint names (BEiT's semantic_segmentation backbone + mmseg UPerHead / FCNHead)
    for key in ("backbone.cls_token", "backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
                "backbone.blocks.0.attn.q_bias", "backbone.blocks.3.attn.relative_position_bias_table",
                "backbone.blocks.3.attn.relative_position_index", "backbone.blocks.0.gamma_1",
                "backbone.fpn1.0.weight", "backbone.fpn1.1.running_var", "backbone.fpn1.3.bias",
                "backbone.fpn2.0.weight", "decode_head.psp_modules.3.1.conv.weight",
                "decode_head.psp_modules.0.1.bn.num_batches_tracked", "decode_head.bottleneck.conv.weight",
                "decode_head.lateral_convs.2.bn.weight", "decode_head.fpn_convs.0.conv.weight",
                "decode_head.fpn_bottleneck.bn.bias", "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight",
                "auxiliary_head.conv_seg.bias"):
        assert key in sd, key
    assert not any(k.startswith("backbone.norm") or "mask_token" in k for k in sd)
    assert detect_segmentation_format(sd) == "official"
    for naming in ("hf", "hf_legacy"):
        there = convert_segmentation_state_dict(sd, naming)
        back = convert_segmentation_state_dict(there, "official")
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd), naming
    model.load_state_dict({"state_dict": sd}["state_dict"], strict=True)


def test_key_conversion_refuses_unknown_keys():
    sd = tiny_segmenter().state_dict()
    with pytest.raises(ValueError, match="no HuggingFace counterpart"):
        segmentation_to_hf({**sd, "decode_head.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a segmentation state dict"):
        detect_segmentation_format({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


def test_backbone_loads_a_pretraining_checkpoint_with_tables_copied_and_resized():
    from beit_fast.model.beit import build_model
    from beit_fast.train.segmentation import load_backbone_pretrained

    torch.manual_seed(0)
    pre = build_model("tiny", img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2)  # 2x2 grid
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_()
    seg = tiny_segmenter()  # 64 px: 4x4 grid
    report = load_backbone_pretrained(seg, {"model": pre.state_dict()})
    assert any("copied the shared" in n for n in report["notes"]) and any("resized" in n for n in report["notes"])
    assert all(k.startswith(("fpn1.", "fpn2.")) for k in report["missing"])
    torch.testing.assert_close(seg.backbone.blocks[2].attn.qkv.weight, pre.blocks[2].attn.qkv.weight)
    table = seg.backbone.blocks[1].attn.relative_position_bias_table
    assert table.shape == (7 * 7 + 3, 2)
    torch.testing.assert_close(table[-3:], pre.rel_pos_bias.relative_position_bias_table[-3:])


# --------------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------------
def test_metric_hand_worked_example():
    # 3 classes; label 255 ignored. Pixels: (pred, label)
    label = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [1, 2, 2, 0]])
    # class 0: label at (0,0),(0,1),(1,3): 3; pred 0 at (0,0),(1,3): 2; intersect 2; union 3 -> IoU 2/3, Acc 2/3
    # class 1: label at (0,2),(0,3),(1,2): 3; pred 1 at (0,1),(0,2),(0,3),(1,0): 4; intersect 2; union 5 -> 2/5, 2/3
    # class 2: label at (1,0): 1; pred 2 at (1,2) (the (1,1) pixel is ignored): 1; intersect 0; union 2 -> 0, 0
    m = SegmentationMetric(3)
    m.update(pred, label)
    r = m.compute()
    assert r["IoU"] == pytest.approx([2 / 3, 2 / 5, 0.0])
    assert r["Acc"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert r["mIoU"] == pytest.approx((2 / 3 + 2 / 5) / 3)
    assert r["aAcc"] == pytest.approx(4 / 7)
    # a class absent from labels and predictions has no IoU (NaN, left out of the mean); one only predicted: IoU 0
    m = SegmentationMetric(4)
    m.update(torch.tensor([0, 0, 3]), torch.tensor([0, 0, 0]))
    r = m.compute()
    assert r["IoU"][0] == pytest.approx(2 / 3) and np.isnan(r["IoU"][1]) and r["IoU"][3] == 0.0
    assert r["mIoU"] == pytest.approx(1 / 3) and r["mAcc"] == pytest.approx(2 / 3)


def _confusion_reference(preds, labels, num_classes, reduce_zero_label):
    """An independent implementation: a confusion matrix over the data set (numpy), IoU = diag / (row + col - diag)."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for p, l in zip(preds, labels):
        p, l = p.numpy().ravel(), l.numpy().ravel().astype(np.int64)
        if reduce_zero_label:
            l = np.where((l == 0) | (l == 255), 255, l - 1)
        keep = (l != 255)
        np.add.at(conf, (l[keep], p[keep]), 1)
    diag = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (conf.sum(0) + conf.sum(1) - diag)
        acc = diag / conf.sum(1)
    return {"aAcc": diag.sum() / conf.sum(), "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc)}


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_metric_matches_a_confusion_matrix(reduce_zero_label):
    g = torch.Generator().manual_seed(0)
    c = 6
    preds, labels = [], []
    for _ in range(5):
        label = torch.randint(0, c + 1 if reduce_zero_label else c, (13, 17), generator=g)
        label[torch.rand(13, 17, generator=g) < 0.1] = 255
        preds.append(torch.where(torch.rand(13, 17, generator=g) < 0.5, torch.randint(0, c, (13, 17), generator=g),
                                 (label - int(reduce_zero_label)).clamp(0, c - 1)))
        labels.append(label)
    m = SegmentationMetric(c, reduce_zero_label=reduce_zero_label)
    for p, l in zip(preds, labels):
        m.update(p, l)
    got, ref = m.compute(), _confusion_reference(preds, labels, c, reduce_zero_label)
    for k in ("aAcc", "mIoU", "mAcc"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_metric_refuses_bad_labels():
    with pytest.raises(ValueError, match="label value 7 is outside 0..4"):
        intersect_and_union(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]), 5)


# --------------------------------------------------------------------------------------------------
# The training pipeline
# --------------------------------------------------------------------------------------------------
def test_rescale_size_is_mmcvs():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # short side to 512: 500 * 512/375 = 682.67
    assert rescale_size(200, 2000, (2048, 512)) == (205, 2048)  # the long side caps


def test_ratio_range_resize_stays_in_its_range():
    t = SegTrainTransform(crop_size=32, img_scale=(128, 32), ratio_range=(0.5, 2.0))
    img, lab = torch.zeros(3, 40, 60, dtype=torch.uint8), torch.zeros(40, 60, dtype=torch.uint8)
    shorts = []
    for s in range(40):
        torch.manual_seed(s)
        i2, l2 = t.resize(img, lab)
        assert i2.shape[-2:] == l2.shape
        shorts.append(min(l2.shape))
    assert 16 <= min(shorts) and max(shorts) <= 64 and max(shorts) - min(shorts) > 20


def _coded(h, w, classes=4, seed=0):
    """An image whose red channel is 40 * its label, so that every geometric step can be checked jointly."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (h // 4, w // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    img = torch.stack([label * 40, torch.arange(w).expand(h, w) % 256, torch.zeros(h, w, dtype=torch.long)])
    return img.to(torch.uint8), label.to(torch.uint8)


def test_crop_flip_pad_move_image_and_mask_together():
    t = SegTrainTransform(crop_size=48, img_scale=(40, 40), ratio_range=(1.0, 1.0), photometric=False,
                          cat_max_ratio=1.0)
    img, lab = _coded(40, 40)  # resized to 40x40 (no change): padded to 48
    flipped = 0
    for s in range(12):
        torch.manual_seed(s)
        out, label = t(img, lab)
        assert out.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
        assert (label[40:] == 255).all() and (label[:, 40:] == 255).all()  # pad 255
        assert (out[:, 40:] == 0).all() and (out[:, :, 40:] == 0).all()  # image padded with 0 after Normalize
        red = (out[0, :40, :40] * 127.5 + 127.5).round()
        assert torch.equal(red, label[:40, :40].float() * 40)  # the image and the mask agree pixel for pixel
        col = (out[1, 0, :40] * 127.5 + 127.5).round()
        flipped += int(col[0] > col[-1])
    assert 0 < flipped < 12  # flips happen, not always


def test_cat_max_ratio_crop_avoids_single_class_crops():
    label = torch.zeros(32, 160, dtype=torch.uint8)
    label[:, 70:86] = 1  # a 16-px stripe of class 1 in a 160-px wide field of class 0
    img = torch.zeros(3, 32, 160, dtype=torch.uint8)

    def ok_rate(ratio):
        t = SegTrainTransform(crop_size=32, cat_max_ratio=ratio)
        ok = 0
        for s in range(60):
            torch.manual_seed(s)
            _, lab = t.random_crop(img, label)
            _, counts = torch.unique(lab, return_counts=True)
            ok += int(len(counts) > 1 and counts.max() / counts.sum() < 0.75)
        return ok / 60

    assert ok_rate(0.75) > 0.6 > 0.3 > ok_rate(1.0)


def test_photometric_distortion_and_hsv():
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-6, rtol=0)
    h, s, v = colorsys.rgb_to_hsv(0.2, 0.5, 0.9)
    torch.testing.assert_close(_rgb_to_hsv(torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)).flatten(),
                               torch.tensor([h, s, v]), atol=1e-6, rtol=0)
    img = torch.randint(0, 256, (3, 16, 16)).float()
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = photometric_distortion(img)
        torch.manual_seed(seed)
        assert torch.equal(out, photometric_distortion(img))  # from torch's generator: reproducible
        assert out.min() >= 0 and out.max() <= 255
        changed += int(not torch.equal(out, img))
    assert changed >= 6


def test_reduce_zero_label():
    lab = np.array([0, 1, 2, 150, 255], np.uint8)
    assert reduce_zero_label_(lab).tolist() == [255, 0, 1, 149, 255]


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
def test_slide_equals_whole_where_they_must():
    model = randomize_(tiny_segmenter(), 0.1).eval()
    fn = lambda x: model_logits(model, x)  # noqa: E731
    img = torch.randn(3, 64, 64)
    with torch.no_grad():
        # an image of the crop size: one window, the same forward
        assert torch.equal(predict(fn, img, 5, mode="slide", crop=64, stride=43, img_scale=None),
                           predict(fn, img, 5, mode="whole", img_scale=None))
        whole = fn(img[None])
        torch.testing.assert_close(slide_logits(fn, img[None], 5, 64, 43), whole)
    # a per-pixel model: every window gives the same logits where windows overlap -> slide == whole, any stride
    w = torch.randn(5, 3)
    pointwise = lambda x: torch.einsum("cd,bdhw->bchw", w, x)  # noqa: E731
    big = torch.randn(2, 3, 50, 70)
    for crop, stride in ((32, 21), (32, 32), (64, 13)):
        torch.testing.assert_close(slide_logits(pointwise, big, 5, crop, stride), pointwise(big), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        slide_logits(pointwise, big, 5, 32, 40)


def test_flip_and_multiscale_predictions():
    w = torch.randn(4, 3)
    pointwise = lambda x: torch.einsum("cd,bdhw->bchw", w, x)  # noqa: E731
    img = torch.randn(3, 48, 40)
    plain = predict(pointwise, img, 4, mode="slide", crop=32, stride=21, img_scale=None)
    assert plain.shape == (48, 40)
    # a per-pixel model is flip-equivariant: flip averaging changes nothing
    assert torch.equal(predict(pointwise, img, 4, mode="slide", crop=32, stride=21, img_scale=None, flip=True), plain)
    ms = predict(pointwise, img, 4, mode="slide", crop=32, stride=21, img_scale=None, ratios=(0.5, 1.0, 1.5))
    assert ms.shape == (48, 40) and (ms == plain).float().mean() > 0.8


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------
def test_layer_decay_groups_are_the_official_ones():
    model = tiny_segmenter()
    groups = segmentation_param_groups(model, 0.05, 0.65)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    L = 4
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** (L + 1))
    assert by_name["backbone.cls_token"]["lr_scale"] == pytest.approx(0.65 ** (L + 1))
    for i in range(L):
        assert by_name[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** (L - i))
    for name in ("backbone.fpn1.0.weight", "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight"):
        assert by_name[name]["lr_scale"] == 1.0 and by_name[name]["weight_decay"] == 0.05, name
    for name in ("backbone.fpn1.1.weight", "decode_head.bottleneck.bn.weight", "backbone.blocks.0.attn.q_bias",
                 "backbone.blocks.0.gamma_1", "decode_head.conv_seg.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    # official constructor: full names are compared with "cls_token", so backbone.cls_token decays
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.1.attn.relative_position_bias_table"]["weight_decay"] == 0.05


def test_poly_schedule_with_linear_warmup():
    s = poly_schedule(1e-3, 100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, min_lr=0.0)
    assert len(s) == 100 and s[0] == pytest.approx(1e-3 * 1e-6)
    assert s[5] == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert s[10] == pytest.approx(1e-3 * 0.9) and s[99] == pytest.approx(1e-5)
    assert np.all(np.diff(s[10:]) < 0)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _write(folder, name, array, mode=None):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(folder / name)


def test_folder_pairs_and_bad_masks(tmp_path):
    img = np.zeros((8, 10, 3), np.uint8)
    _write(tmp_path / "i", "a.jpg", img)
    _write(tmp_path / "i", "b.png", img)
    _write(tmp_path / "m", "a.png", np.zeros((8, 10), np.uint8))
    _write(tmp_path / "m", "c.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(SegmentationDataError, match=r"1 images without a mask .*b\.png.*1 masks without an image.*c\.png"):
        pair_folders(tmp_path / "i", tmp_path / "m")
    (tmp_path / "e").mkdir()
    with pytest.raises(SegmentationDataError, match="no files"):
        pair_folders(tmp_path / "e", tmp_path / "m")
    with pytest.raises(SegmentationDataError, match="no such folder"):
        pair_folders(tmp_path / "nowhere", tmp_path / "m")
    (tmp_path / "i" / "b.png").unlink()
    (tmp_path / "m" / "c.png").unlink()
    pairs = pair_folders(tmp_path / "i", tmp_path / "m")
    ds = SegmentationFolder(pairs, 3)
    assert ds[0][0].shape == (3, 8, 10) and ds[0][1].shape == (8, 10)
    # size mismatch
    _write(tmp_path / "m", "a.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(SegmentationDataError, match="mask size 9x8 differs from its image's 10x8"):
        ds[0]
    # out of range, 255 allowed
    bad = np.zeros((8, 10), np.uint8)
    bad[0, 0], bad[1, 1] = 7, 255
    _write(tmp_path / "m", "a.png", bad)
    with pytest.raises(SegmentationDataError, match=r"label values \[7\] are outside 0..2 and not 255"):
        ds[0]
    assert SegmentationFolder(pairs, 8)[0][1][1, 1] == 255
    # palette masks: the indices are the labels; colour masks are refused
    pal = Image.fromarray(np.full((8, 10), 2, np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "m" / "a.png")
    assert (ds[0][1] == 2).all()
    _write(tmp_path / "m", "a.png", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(SegmentationDataError, match="a RGB mask; masks must be single-channel"):
        ds[0]


def test_checkpoints_of_another_task_are_refused(tmp_path):
    from beit_fast.utils.checkpoint import CheckpointError
    from beit_fast.train.segmentation import load_backbone_pretrained, segmenter_from_checkpoint

    seg = tiny_segmenter()
    with pytest.raises(CheckpointError, match="is a segmentation checkpoint, not a pretrained backbone"):
        load_backbone_pretrained(copy.deepcopy(seg), {"model": seg.state_dict()})
    path = tmp_path / "ft.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "kind": "finetune"}, path)
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint \\(kind 'finetune'\\)"):
        segmenter_from_checkpoint(path)


def test_cli_reports_bad_flags_and_data(tmp_path, capsys):
    from beit_fast.segment import main

    with pytest.raises(SystemExit, match="--num_classes is required"):
        main(["--train_images", str(tmp_path), "--train_masks", str(tmp_path)])
    with pytest.raises(SystemExit, match="--eval_interval 3 must divide --max_iters 10"):
        main(["--data_path", str(tmp_path), "--max_iters", "10", "--eval_interval", "3"])
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit, match="error: .*no files"):
        main(["--train_images", str(tmp_path / "i"), "--train_masks", str(tmp_path / "m"), "--num_classes", "3",
              "--device", "cpu"])


def test_convert_cli_both_ways(tmp_path):
    from beit_fast.convert import main
    from beit_fast.interop.checkpoints import load_state_dict

    sd = tiny_segmenter().state_dict()
    torch.save({"meta": {"iter": 4}, "state_dict": sd}, tmp_path / "mmseg.pth")  # the official mmseg file layout
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "hf.safetensors"), "--to", "hf", "-q"]) == 0
    hf = load_state_dict(tmp_path / "hf.safetensors")
    assert detect_segmentation_format(hf) == "hf_legacy" and "decode_head.classifier.weight" in hf
    assert main([str(tmp_path / "hf.safetensors"), str(tmp_path / "back.pth"), "--to", "official", "-q"]) == 0
    raw = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(raw) == {"state_dict"} and all(torch.equal(raw["state_dict"][k], v) for k, v in sd.items())
    assert set(raw["state_dict"]) == set(sd)
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "t.pt"), "--to", "timm", "-q"]) == 1
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "hfdir"), "--to", "hf", "-q"]) == 1
