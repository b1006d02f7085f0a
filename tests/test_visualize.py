"""beit_fast.visualize: the four pictures of a run are valid PNGs of the expected pixel size.

One toy pretraining run (6 steps of the tiny model on 32-pixel views, see test_pretrain.toy_args) is
pictured; the curves are also drawn from a hand-written log in another format.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast import pretrain, visualization, visualize
from beit_fast.model.beit import build_model
from beit_fast.visualization.curves import _kind
from beit_fast.visualization.run import _run_images
from beit_fast.tokenizer import build_tokenizer
from test_pretrain import make_toy_images, make_toy_tokenizer, toy_args

DPI = 40
PANEL = int(visualization.PANEL_INCHES * DPI)  # 80 px
CURVES = (int(3 * visualization.CURVE_PANEL_INCHES[0] * DPI), int(visualization.CURVE_PANEL_INCHES[1] * DPI))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished one-epoch toy pretraining run (checkpoints, log.jsonl, a 64-code dVAE on 32px views)."""
    root = tmp_path_factory.mktemp("viz")
    setup = (make_toy_images(root / "images"), make_toy_tokenizer(root / "tok.pt"))
    out = root / "run"
    pretrain.main(toy_args(setup, out, "--epochs", "1", "--warmup_epochs", "0", "--log_freq", "2"))
    return out


def _png(path, size, mode="RGB"):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size, (path, img.size, size)
        assert img.mode == mode
        img.load()  # decodes the whole file: a truncated PNG fails here
        arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 1, f"{path} is blank"


def test_visualize_run_writes_the_four_pictures(toy_run, tmp_path):
    paths = visualization.visualize_run(toy_run, tmp_path / "pics", num_images=3, seed=1, dpi=DPI)
    assert [p.name for p in paths] == [visualization.FILENAMES[p] for p in visualization.PARTS]
    _png(paths[0], (3 * PANEL, 2 * PANEL))  # mask: one column per image, 2 rows
    _png(paths[1], (3 * PANEL, 2 * PANEL))  # reconstruction
    _png(paths[2], (5 * PANEL, 3 * PANEL))  # predictions: one row per image, 5 columns
    _png(paths[3], CURVES)
    # deterministic: the same call draws the same pictures
    again = visualization.visualize_run(toy_run, tmp_path / "again", num_images=3, seed=1, dpi=DPI, only="mask,predictions")
    for p in again:
        assert p.read_bytes() == (tmp_path / "pics" / p.name).read_bytes()


def test_cli(toy_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out_dir", "--num_images", "--seed", "--only", "--checkpoint", "--tokenizer", "--data_path",
                 "--dpi", "--palette"):
        assert flag in text
    out = tmp_path / "cli"
    paths = visualize.main([str(toy_run), "--out_dir", str(out), "--only", "curves,mask", "--num_images", "1",
                            "--dpi", str(DPI), "--palette", "--checkpoint", str(toy_run / "checkpoint-1.pt")])
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "mask.png"] == sorted(p.name for p in paths)
    _png(out / "mask.png", (PANEL, 2 * PANEL), mode="P")
    _png(out / "curves.png", CURVES, mode="P")


def test_cli_errors(toy_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no log in"):
        visualize.main([str(empty), "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        visualize.main([str(empty), "--out_dir", str(tmp_path / "x"), "--only", "mask"])
    with pytest.raises(SystemExit, match="unknown picture"):
        visualize.main([str(toy_run), "--only", "masks"])
    with pytest.raises(SystemExit, match="tokenizer weights not found"):
        visualize.main([str(toy_run), "--out_dir", str(tmp_path / "x"), "--only", "reconstruction",
                        "--tokenizer", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit, match="run folder not found"):
        visualize.main([str(tmp_path / "missing")])


def test_curves_from_a_hand_written_log(tmp_path):
    log = tmp_path / "finetune.jsonl"
    lines = [json.dumps({"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1), "top1": 40 + 10 * e,
                         "lr": 1e-3 * 0.5 ** e, "note": "text is ignored"}) for e in range(5)]
    lines.insert(2, "{not json")  # e.g. a line cut off by a kill
    lines.append(json.dumps({"epoch": 5, "train_loss": 0.3}))  # keys missing from some records
    log.write_text("\n".join(lines) + "\n")
    _png(visualization.plot_curves(log, tmp_path / "c.png", dpi=DPI), CURVES)
    only_loss = tmp_path / "loss.jsonl"
    only_loss.write_text('{"loss": 3.0}\n{"loss": 2.5}\n')  # no x key, no accuracy, no lr: still a picture
    _png(visualization.plot_curves(only_loss, tmp_path / "l.png", dpi=DPI), CURVES)
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no numeric metrics|no loss"):
        visualization.plot_curves(tmp_path / "empty.jsonl", tmp_path / "e.png")
    with pytest.raises(FileNotFoundError, match="log not found"):
        visualization.plot_curves(tmp_path / "missing.jsonl", tmp_path / "m.png")


def test_library_functions_and_an_encoder_only_tokenizer(tmp_path):
    torch.manual_seed(0)
    # plot_mask: a PIL image with an [h, w] mask, patch size given
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    _png(visualization.plot_mask(img, mask, tmp_path / "m.png", patch_size=8, title="x", dpi=DPI), (PANEL, 2 * PANEL))
    with pytest.raises(ValueError, match="does not cover"):
        visualization.plot_mask(img, mask, tmp_path / "m.png", patch_size=16)

    dalle = build_tokenizer("dalle", random_init=True, n_hid=4, vocab_size=64, input_size=32)
    views = torch.rand(2, 3, 32, 32) * 0.8 + 0.1
    with pytest.raises(ValueError, match="no decoder"):
        visualization.plot_reconstruction(dalle, views, tmp_path / "r.png")

    model = build_model("tiny", img_size=32, patch_size=8, vocab_size=64, depth=1)
    patch = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    masks[1, 3:12] = True
    res = visualization.mim_predictions(model, dalle, patch, views, masks)
    assert torch.equal(res["predicted"][~masks], res["tokens"][~masks])  # visible tokens are kept
    assert not res["correct"][~masks].any()
    assert torch.allclose(res["accuracy"], res["correct"].sum(1).float() / masks.sum(1).float())
    # without a decoder: input, mask, right/wrong
    _png(visualization.plot_predictions(model, dalle, patch, views, masks, tmp_path / "p.png", dpi=DPI),
         (3 * PANEL, 2 * PANEL))
    dvae = build_tokenizer("dvae", random_init=True, preset="tiny", vocab_size=64, input_size=32)
    _png(visualization.plot_predictions(model, dvae, patch, views, masks, tmp_path / "p5.png", dpi=DPI),
         (5 * PANEL, 2 * PANEL))
    _png(visualization.plot_reconstruction(dvae, views, tmp_path / "r.png", dpi=DPI), (2 * PANEL, 2 * PANEL))
    with pytest.raises(ValueError, match="predicts 64 tokens"):
        visualization.mim_predictions(model, build_tokenizer("dvae", random_init=True, preset="tiny", input_size=32),
                                  patch, views, masks)


def test_demo_run_pictures_the_sample_photographs():
    images, names = _run_images({"data_path": None}, 2, seed=0)
    assert names == ["astronaut", "chelsea"]
    assert all(im.mode == "RGB" and max(im.size) <= 512 for im in images)


def test_curves_put_the_unigram_baseline_beside_loss_and_accuracy():
    assert _kind("unigram_entropy") == _kind("loss") == "loss"
    assert _kind("unigram_acc") == _kind("mlm_acc") == "accuracy"
