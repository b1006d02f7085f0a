"""Linear probe: the classifier on separable features, feature extraction, the layer sweep, the CLI."""
import json

import pytest
import torch
import torch.nn as nn

from beit_fast.utils.checkpoint import atomic_save
from beit_fast.linear_probe import main
from beit_fast.train.probing import extract_features, sweep_layers, train_linear_probe
from beit_fast.model.beit import build_classifier, build_model

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n, num_classes=3, dim=16, seed=0, sep=4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * sep
    y = torch.arange(n) % num_classes
    return centres[y] + torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("batchnorm", [True, False])
def test_probe_on_separable_features(batchnorm):
    tx, ty = _blobs(300, seed=0)
    vx, vy = _blobs(90, seed=1)
    res = train_linear_probe(tx, ty, vx, vy, num_classes=3, epochs=20, lr=1e-2, batch_size=64, batchnorm=batchnorm)
    assert res["top1"] >= 0.99 and res["train_top1"] >= 0.99 and res["top5"] == 1.0
    again = train_linear_probe(tx, ty, vx, vy, num_classes=3, epochs=20, lr=1e-2, batch_size=64, batchnorm=batchnorm)
    assert again == res  # seeded


def test_probe_input_errors():
    tx, ty = _blobs(10)
    with pytest.raises(ValueError, match="labels"):
        train_linear_probe(tx, ty, tx, ty, num_classes=2)
    with pytest.raises(ValueError, match="features"):
        train_linear_probe(tx, ty, tx[:, :4], ty, num_classes=3)


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.x, self.y = _blobs(n, dim=8, seed=seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class _FakeBackbone(nn.Module):
    """Block 2 of 4 carries the class signal, the others noise: the sweep must pick block 2."""

    def get_num_layers(self):
        return 4

    def forward_layer_features(self, x, layers, include_cls=False):
        self.calls = getattr(self, "calls", 0) + 1
        g = torch.Generator().manual_seed(int(x.abs().sum() * 1000) % 2**31)
        return [x if layer == 2 else torch.randn(x.shape, generator=g) for layer in layers]


def test_sweep_picks_the_informative_layer():
    model = _FakeBackbone()
    res = sweep_layers(model, _Toy(150), _Toy(60, seed=1), epochs=15, lr=1e-2, batch_size=32)
    assert set(res["per_layer"]) == {1, 2, 3, 4}
    assert res["best_layer"] == 2 and res["best_top1"] == res["per_layer"][2]["top1"] >= 0.95
    assert max(res["per_layer"][k]["top1"] for k in (1, 3, 4)) < 0.8
    assert model.calls == 2  # one extraction pass per data set (batch 256 > data set sizes)
    sub = sweep_layers(model, _Toy(150), _Toy(60, seed=1), layers=[3, 1], epochs=2)
    assert set(sub["per_layer"]) == {1, 3}


def test_extract_features_real_model():
    torch.manual_seed(0)
    model = build_classifier("tiny", 0, **SMALL).train()
    data = [(torch.randn(3, 16, 16), i % 2) for i in range(5)]
    feats, labels = extract_features(model, data, [3, 1], batch_size=2)
    assert model.training  # mode restored
    assert set(feats) == {1, 3} and feats[1].shape == (5, 32) and feats[1].dtype == torch.float32
    assert labels.tolist() == [0, 1, 0, 1, 0] and labels.dtype == torch.int64
    model.eval()
    with torch.no_grad():
        direct = model.forward_layer_features(torch.stack([d[0] for d in data]), [1, 3])
    torch.testing.assert_close(feats[1], direct[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[3], direct[1], rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    with_cls, _ = extract_features(model, data, [2], include_cls=True)
    assert with_cls[2].shape == (5, 64)


def test_forward_layer_features_stops_early_and_checks_layers():
    model = build_classifier("tiny", 0, **SMALL).eval()

    def boom(*a, **k):
        raise AssertionError("block 3 must not run")

    model.blocks[2].forward = boom
    out = model.forward_layer_features(torch.randn(2, 3, 16, 16), [2, 1])
    assert [o.shape for o in out] == [(2, 32), (2, 32)]
    for bad in ([0], [4], []):
        with pytest.raises(ValueError):
            model.forward_layer_features(torch.randn(1, 3, 16, 16), bad)


def test_cli_help_and_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--sweep" in out and "--layer" in out and "--finetune" in out
    torch.manual_seed(0)
    pre = build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32)
    ckpt = atomic_save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "pt.pt")
    res = main(["--finetune", str(ckpt), "--input_size", "16", "--sweep", "--epochs", "3", "--no_progress",
                "--labels_per_class", "10", "--output_dir", str(tmp_path / "lp")])
    assert set(res["per_layer"]) == {1, 2} and res["best_layer"] in (1, 2)
    printed = capsys.readouterr().out
    assert "best: block" in printed and "<- best" in printed
    saved = json.loads((tmp_path / "lp" / "linear_probe.json").read_text())
    assert saved["best_layer"] == res["best_layer"]
    one = main(["--finetune", str(ckpt), "--input_size", "16", "--layer", "1", "--epochs", "2", "--no_progress",
                "--labels_per_class", "10"])
    assert list(one["per_layer"]) == [1]
    with pytest.raises(SystemExit, match="1..2"):
        main(["--finetune", str(ckpt), "--input_size", "16", "--layer", "5", "--no_progress"])
    with pytest.raises(SystemExit, match="not found"):
        main(["--finetune", str(tmp_path / "missing.pt")])
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")  # refused by its first bytes, before any work
    with pytest.raises(SystemExit, match="--finetune .*text.pt is not a checkpoint: no zip archive"):
        main(["--finetune", str(tmp_path / "text.pt"), "--no_progress"])
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 but no zip archive after it")  # refused by the loader
    with pytest.raises(SystemExit, match="cannot be loaded"):
        main(["--finetune", str(tmp_path / "corrupt.pt"), "--no_progress"])


def test_cli_checkpoint_without_relative_position_bias(tmp_path):
    """A backbone pretrained with absolute position embeddings and no relative bias is probed as such."""
    torch.manual_seed(0)
    pre = build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32, use_shared_rel_pos_bias=False,
                      use_abs_pos_emb=True)
    ckpt = atomic_save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "abs.pt")
    res = main(["--finetune", str(ckpt), "--layer", "2", "--epochs", "1", "--no_progress", "--labels_per_class", "5"])
    assert list(res["per_layer"]) == [2]
