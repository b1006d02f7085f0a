"""The evidence script (pretraining vs random init on the digits): its pieces and a miniature run."""
import json

import numpy as np
import pytest
import torch

from beit_fast.evidence import build_parser, main
from beit_fast.config import EvidenceConfig
from beit_fast.train.evidence import PixelRegressionLoss, RandomMaskingGenerator, summarize, table
from beit_fast.data.digits import DigitsDataset
from beit_fast.model.beit import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_masking_generator_exact_count_and_seeded():
    gen = RandomMaskingGenerator(8, 26)
    a, b = gen(np.random.default_rng(3)), gen(np.random.default_rng(3))
    assert a.shape == (8, 8) and a.dtype == bool and a.sum() == 26
    assert np.array_equal(a, b)
    assert not np.array_equal(a, gen(np.random.default_rng(4)))
    # uniform: every patch is masked at about the same rate
    rate = np.mean([gen(np.random.default_rng(i)) for i in range(2000)], axis=0)
    assert abs(rate.mean() - 26 / 64) < 1e-9 and rate.min() > 0.3 and rate.max() < 0.52
    with pytest.raises(ValueError, match="num_masking_patches"):
        RandomMaskingGenerator(4, 17)


def test_pixel_regression_loss_targets_the_masked_patches():
    torch.manual_seed(0)
    model = build_model("tiny", img_size=16, patch_size=4, vocab_size=8, embed_dim=32, depth=1, num_heads=2)
    loss_module = PixelRegressionLoss(model)
    assert model.pixel_head.out_features == 4 * 4 * 3
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, 15] = True
    loss, acc = loss_module(images, mask, torch.zeros(2, 16, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss) and acc == 0
    loss.backward()
    assert model.pixel_head.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None  # the token head is not used
    # the target is the masked patches' pixels normalised per patch: a head predicting exactly those
    # gives zero loss
    feats = model.forward_features(images, mask)[:, 1:][mask]
    patches = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)[mask]
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-6)
    assert torch.allclose(torch.nn.functional.mse_loss(model.pixel_head(feats), target), loss)
    assert target[0].std() == pytest.approx(1.0, abs=1e-3)


def test_table_and_summary_from_runs():
    runs = [{"variant": v, "seed": s, "finetune_top1": f, "probe_top1": p}
            for v, s, f, p in [("scratch", 0, 0.5, 0.3), ("scratch", 1, 0.6, 0.3), ("beit", 0, 0.8, 0.6),
                               ("beit", 1, 0.7, 0.62)]]
    summary = summarize(runs, ["scratch", "beit"])
    assert summary["beit"]["finetune_mean"] == pytest.approx(0.75)
    assert summary["scratch"]["finetune_std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    text = table({"config": vars(EvidenceConfig()) | {}, "summary": summary, "minutes": 1.0})
    assert "75.0 +- 7.1" in text and "random init" in text


def test_parser_has_help_on_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_miniature_run_end_to_end(tmp_path, capsys):
    """Every stage of the chain, with the ablations, at a size that takes seconds."""
    out = tmp_path / "ev"
    result = main(["--seeds", "1", "--image_size", "16", "--patch_size", "4", "--embed_dim", "32", "--depth", "2",
                   "--num_heads", "2", "--vocab_size", "32", "--tokenizer_steps", "3", "--tokenizer_batch", "8",
                   "--pretrain_epochs", "1", "--pretrain_batch", "256", "--labels_per_class", "2",
                   "--finetune_epochs", "1", "--finetune_batch", "8", "--probe_epochs", "2", "--min_mask_block", "2",
                   "--ablations", "--no_progress", "--output_dir", str(out)])
    variants = [r["variant"] for r in result["runs"]]
    assert variants == ["scratch", "beit", "beit_random_mask", "beit_pixels"]
    for r in result["runs"]:
        assert 0.0 <= r["finetune_top1"] <= 1.0 and 0.0 <= r["probe_top1"] <= 1.0
        assert set(r["probe_per_layer"]) == {1, 2}
        assert (r["pretrain"] is None) == (r["variant"] == "scratch")
        if r["pretrain"] is not None:
            assert r["pretrain"]["steps"] == len(DigitsDataset("train")) // 256
            assert np.isfinite(r["pretrain"]["loss_last"])
    saved = json.loads((out / "evidence.json").read_text())
    assert set(saved["summary"]) == set(variants)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4
    printed = capsys.readouterr().out
    assert "ablation: random masking" in printed and "pixel regression" in printed
    assert (out / "evidence.md").read_text().strip() == table(saved)
