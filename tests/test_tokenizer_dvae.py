"""Our discrete VAE tokenizer: shapes, Gumbel vs hard paths, schedules, training, checkpoints, CLI."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit_fast.tokenizer import (
    DiscreteVAE, DVAEConfig, VisualTokenizer, build_tokenizer, kl_weight_at, map_pixels, temperature_at,
)
from beit_fast.train.dvae import train_dvae
from beit_fast.tokenizer import dvae as dvae_mod
from beit_fast.tokenizer.dvae import gumbel_softmax
from beit_fast.train.dvae import codebook_stats, evaluate_dvae

SMALL = DVAEConfig(vocab_size=64, code_dim=16, hidden=8, channel_mult=(1, 1, 2), num_res_blocks=1, input_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n, side=32, seed=0):
    """Learnable synthetic tokenizer views: low-frequency colour fields, map_pixels'd."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return map_pixels(F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False))


def test_shapes_and_ranges():
    torch.manual_seed(0)
    m = DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=256))
    assert isinstance(m, VisualTokenizer) and m.vocab_size == 256 and m.input_size == 112 and m.downsample == 8
    x = map_pixels(torch.rand(2, 3, 112, 112))
    logits = m.encode_logits(x)
    assert logits.shape == (2, 256, 14, 14) and logits.dtype == torch.float32
    tok = m.get_codebook_indices(x)
    assert tok.shape == (2, 196) and tok.dtype == torch.int64
    assert int(tok.min()) >= 0 and int(tok.max()) < 256
    assert torch.equal(tok, logits.argmax(1).flatten(1))  # row-major
    img = m.decode_indices(tok)
    assert img.shape == (2, 3, 112, 112) and float(img.min()) >= 0 and float(img.max()) <= 1
    with torch.no_grad():
        recon, lg = m(x, temperature=0.5)
    assert recon.shape == x.shape and lg.shape == logits.shape
    assert float(recon.min()) >= 0.1 - 1e-6 and float(recon.max()) <= 0.9 + 1e-6  # map_pixels scale
    with pytest.raises(ValueError):
        m.decode_indices(torch.zeros(1, 195, dtype=torch.long))
    with pytest.raises(ValueError):
        m.decode_indices(torch.full((1, 196), 256))
    assert m.decode_indices(tok[:, :98], grid=(7, 14)).shape == (2, 3, 56, 112)


def test_hard_path_matches_tokenize_then_decode():
    torch.manual_seed(0)
    m = DiscreteVAE(SMALL).eval()
    x = smooth_images(3)
    with torch.no_grad():
        recon, _ = m(x)  # eval mode -> hard argmax codes
        dec = m.decode_indices(m.get_codebook_indices(x))
    torch.testing.assert_close(recon, map_pixels(dec), atol=1e-6, rtol=1e-6)
    # the relaxed path is stochastic and differs from the hard one at T = 1
    m.train()
    with torch.no_grad():
        r1, _ = m(x, temperature=1.0)
        r2, _ = m(x, temperature=1.0)
    assert not torch.allclose(r1, r2)
    assert not torch.allclose(r1, recon)
    # forcing hard=True in training mode gives the deterministic hard path
    with torch.no_grad():
        torch.testing.assert_close(m(x, hard=True)[0], recon)


def test_gumbel_softmax_distribution_and_limits():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).log_softmax(0)
    n = 40000
    s = gumbel_softmax(logits.view(1, 4, 1, 1).expand(n, 4, 1, 1), temperature=1.0)
    torch.testing.assert_close(s.sum(1), torch.ones(n, 1, 1))
    freq = torch.bincount(s.argmax(1).flatten(), minlength=4).float() / n
    torch.testing.assert_close(freq, logits.exp(), atol=0.012, rtol=0)  # argmax of Gumbel sample ~ softmax
    cold = gumbel_softmax(logits.view(1, 4, 1, 1).expand(1000, 4, 1, 1), temperature=1e-3)
    assert float((cold.max(1).values > 0.99).float().mean()) > 0.98  # nearly one-hot at low temperature
    hot = gumbel_softmax(torch.zeros(2, 8, 3, 3), temperature=100.0)
    torch.testing.assert_close(hot, torch.full_like(hot, 1 / 8), atol=0.01, rtol=0)


def test_temperature_schedule():
    cfg = DVAEConfig(temperature_start=1.0, temperature_end=1 / 16)
    assert temperature_at(0, cfg, 1000) == pytest.approx(1.0)
    assert temperature_at(1000, cfg, 1000) == pytest.approx(1 / 16)
    assert temperature_at(5000, cfg, 1000) == pytest.approx(1 / 16)
    assert temperature_at(500, cfg, 1000) == pytest.approx(1 / 4)  # exponential: geometric midpoint
    assert temperature_at(250, cfg, 1000) == pytest.approx(0.5)
    ts = [temperature_at(s, cfg, 100) for s in range(101)]
    assert all(a > b for a, b in zip(ts, ts[1:]))
    cfg2 = DVAEConfig(temperature_anneal_steps=10)
    assert temperature_at(10, cfg2, 1000) == pytest.approx(1 / 16)
    assert temperature_at(5, cfg2, 1000) == pytest.approx(0.25)


def test_kl_weight_ramp():
    cfg = DVAEConfig(kl_weight=6.6, kl_warmup_steps=5000)
    assert kl_weight_at(0, cfg, 10**6) == 0.0
    assert kl_weight_at(2500, cfg, 10**6) == pytest.approx(3.3)
    assert kl_weight_at(5000, cfg, 10**6) == pytest.approx(6.6)
    assert kl_weight_at(9000, cfg, 10**6) == pytest.approx(6.6)
    cfg2 = DVAEConfig(kl_weight=1.0)  # default warm-up: 10% of the run
    assert kl_weight_at(50, cfg2, 1000) == pytest.approx(0.5)
    assert kl_weight_at(100, cfg2, 1000) == pytest.approx(1.0)


def test_lr_schedule_warmup_then_cosine():
    from beit_fast.train.optim import warmup_cosine_schedule

    s = warmup_cosine_schedule(2e-3, 100, 5)
    assert s.dtype == np.float64 and s.shape == (100,)
    assert list(s[:5]) == [2e-3 * (t + 1) / 5 for t in range(5)]  # reaches the peak at the warm-up's last step
    assert s[5] == 2e-3 and np.all(np.diff(s[5:]) < 0)  # then cosine down ...
    assert s[-1] == pytest.approx(2e-4 + 0.9e-3 * (1 + math.cos(math.pi * 94 / 95)), rel=1e-12)  # ... towards 10%
    assert s[-1] > 2e-4
    assert list(warmup_cosine_schedule(1.0, 3, 10)) == [0.1, 0.2, 0.3]  # a warm-up longer than the run


def test_training_steps_follow_the_schedules():
    """The engine's step sets the lr, the Gumbel temperature and the KL weight of its step (the records hold
    them exactly), from the 5% warm-up + cosine of the peak lr."""
    from beit_fast.train.optim import warmup_cosine_schedule

    metrics = train_dvae(SMALL, smooth_images(16), steps=12, batch_size=4, lr=3e-3, progress=False, eval_batches=1,
                         save_every=0, log_every=1, warmup_steps=3)
    lrs = warmup_cosine_schedule(3e-3, 12, 3)
    assert [h["step"] for h in metrics["history"]] == list(range(12))
    assert [h["lr"] for h in metrics["history"]] == [float(v) for v in lrs]
    assert [h["temperature"] for h in metrics["history"]] == [temperature_at(t, SMALL, 12) for t in range(12)]
    assert [h["kl_weight"] for h in metrics["history"]] == [kl_weight_at(t, SMALL, 12) for t in range(12)]
    assert all(h["loss"] == pytest.approx(h["recon"] + h["kl_weight"] * h["kl"], rel=1e-5) for h in metrics["history"])


def test_non_finite_loss_saves_the_model_before_it_and_stops(tmp_path):
    torch.manual_seed(0)
    model = DiscreteVAE(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.full((8, 3, 32, 32), float("nan"))
    path = tmp_path / "dvae.pt"
    with pytest.raises(FloatingPointError, match="non-finite dVAE loss at step 0"):
        train_dvae(SMALL, bad, steps=3, batch_size=4, progress=False, eval_data=smooth_images(4), out_path=path,
                   model=model, save_every=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no update was made
    saved = DiscreteVAE.from_checkpoint(path)
    assert saved.checkpoint_step == 0 and saved.checkpoint_metrics["partial"]
    assert all(torch.equal(v, before[k]) for k, v in saved.state_dict().items())


def test_kl_term():
    m = DiscreteVAE(SMALL)
    x = torch.full((1, 3, 32, 32), 0.5)
    uniform = torch.zeros(1, 64, 4, 4)
    _, logs = m.loss(x, x, uniform, kl_weight=1.0)
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6) and logs["recon"] == 0.0
    peaked = torch.full((1, 64, 4, 4), -1e4)
    peaked[:, 3] = 0
    loss, logs = m.loss(x, x + 0.1, peaked, kl_weight=2.0)
    assert logs["kl"] == pytest.approx(math.log(64), rel=1e-5)
    assert float(loss) == pytest.approx(0.01 + 2.0 * math.log(64), rel=1e-5)
    m_l1 = DiscreteVAE(DVAEConfig(**{**SMALL.__dict__, "recon_loss": "l1"}))
    _, logs = m_l1.loss(x, x + 0.1, uniform, kl_weight=0.0)
    assert logs["recon"] == pytest.approx(0.1, rel=1e-5)


def test_codebook_stats():
    s = codebook_stats(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 10)
    assert s["codes_used"] == 4 and s["perplexity"] == pytest.approx(4.0)
    assert codebook_stats(torch.zeros(50, dtype=torch.long), 10) == {"codes_used": 1, "perplexity": 1.0}


def patchwork_images(n, side=32, seed=0, colors=8):
    """Token-aligned 8x8 cells, each one of ``colors`` fixed colours: a dVAE can reconstruct these exactly."""
    palette = torch.rand(colors, 3, generator=torch.Generator().manual_seed(123))
    cells = torch.randint(0, colors, (n, side // 8, side // 8), generator=torch.Generator().manual_seed(seed))
    return map_pixels(F.interpolate(palette[cells].permute(0, 3, 1, 2), scale_factor=8, mode="nearest"))


def test_training_reduces_reconstruction_error(tmp_path):
    data = patchwork_images(128, seed=1)
    held = patchwork_images(32, seed=2)  # same palette, unseen arrangements
    cfg = DVAEConfig(**{**SMALL.__dict__, "hidden": 16, "kl_weight": 1e-3})
    m = DiscreteVAE(cfg)
    out = tmp_path / "ck" / "dvae.pt"
    metrics = train_dvae(cfg, data, steps=100, batch_size=16, lr=1e-2, out_path=out, device="cpu", seed=0,
                         progress=False, eval_data=held, model=m, save_every=0)
    # measured (seed 0): train recon 0.049 -> 0.006, eval MSE 0.13 -> 0.009, 6 codes used
    assert metrics["train_recon_last"] < 0.5 * metrics["train_recon_first"]
    assert metrics["recon_mse"] < 0.3 * metrics["initial"]["recon_mse"]
    assert metrics["recon_mse"] < 0.03 and metrics["recon_mse"] < 0.5 * metrics["mean_color_mse"]
    assert metrics["codes_used"] >= 4 and metrics["eval_images"] == 32
    assert metrics["history"][0]["temperature"] == pytest.approx(1.0)
    assert metrics["history"][-1]["temperature"] == pytest.approx(temperature_at(99, cfg, 100))
    # the checkpoint reproduces the trained model exactly
    loaded = DiscreteVAE.from_checkpoint(out)
    assert torch.equal(loaded.get_codebook_indices(held), m.get_codebook_indices(held))
    assert loaded.checkpoint_step == 100 and loaded.checkpoint_metrics["recon_mse"] == metrics["recon_mse"]
    assert loaded.cfg == cfg
    tok = build_tokenizer("dvae", out)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert torch.equal(tok.get_codebook_indices(held), m.get_codebook_indices(held))
    assert evaluate_dvae(loaded, [held])["recon_mse"] == pytest.approx(metrics["recon_mse"], rel=1e-5)


@pytest.mark.parametrize("kind", ["tensor", "list", "generator", "dataset_tuples"])
def test_accepted_data_forms(kind):
    x = smooth_images(20, seed=3)
    if kind == "tensor":
        data = x
    elif kind == "list":
        data = list(x)
    elif kind == "generator":
        data = (x[i:i + 5] for i in range(0, 20, 5))  # one-shot iterator of small batches
    else:
        data = torch.utils.data.TensorDataset(x, torch.zeros(20))
    metrics = train_dvae(SMALL, data, steps=3, batch_size=4, lr=1e-3, progress=False, eval_batches=1, save_every=0)
    assert metrics["steps"] == 3 and math.isfinite(metrics["recon_mse"])


def test_checkpoint_atomic_and_periodic(tmp_path, monkeypatch):
    cfg = SMALL
    path = tmp_path / "dvae.pt"
    saved_steps = []
    orig = DiscreteVAE.save

    def spy(self, p, step=0, metrics=None):
        saved_steps.append(step)
        return orig(self, p, step=step, metrics=metrics)

    monkeypatch.setattr(DiscreteVAE, "save", spy)
    train_dvae(cfg, smooth_images(16), steps=5, batch_size=4, progress=False, out_path=path, save_every=2,
               eval_batches=1)
    assert saved_steps == [2, 4, 5]
    assert os.listdir(tmp_path) == ["dvae.pt"]  # no temporary file left behind
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 5 and set(ck) == {"config", "model", "step", "metrics"}
    good = path.read_bytes()

    # a failing write leaves the previous checkpoint intact and no temporary file
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dvae_mod.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        DiscreteVAE(cfg).save(path, step=9)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["dvae.pt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DiscreteVAE.from_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_tokenizer("dvae", tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a beit_fast dVAE checkpoint"):
        build_tokenizer("dvae", bad)
    torch.save(torch.nn.Conv2d(1, 1, 1), bad)  # a whole pickled module (like DALL-E's encoder.pkl)
    with pytest.raises(ValueError, match="not a beit_fast dVAE checkpoint"):
        build_tokenizer("dvae", bad)
    with pytest.raises(ValueError, match="unknown dVAE preset"):
        DVAEConfig.preset("huge")
    with pytest.raises(ValueError):
        DVAEConfig(channel_mult=(1, 2))


def test_tokenize_is_fp32_and_mode_preserving():
    torch.manual_seed(0)
    m = DiscreteVAE(SMALL)
    x = smooth_images(2)
    ref = m.get_codebook_indices(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m.get_codebook_indices(x), ref)
    assert m.training  # restored


def test_tokenizer_view_dataset(tmp_path):
    from PIL import Image

    from beit_fast.data.image_folder import ImageFolderDataset
    from beit_fast.train.tokenizer_training import TokenizerViewDataset
    from beit_fast.data.transforms import TokenizerViewTransform, TwoViewConfig

    arr = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "b.png")  # greyscale file -> RGB
    view = TokenizerViewTransform(TwoViewConfig(second_input_size=24, color_jitter=0.0))
    ds = TokenizerViewDataset(ImageFolderDataset(tmp_path), view, length=5, seed=7)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    a, b = ds[3], ds[3]
    assert torch.equal(torch.rand(1), expected)  # the caller's torch RNG is untouched
    assert len(ds) == 5 and a.shape == (3, 24, 24) and torch.equal(a, b)  # seeded crops are fixed
    assert float(a.min()) >= 0.1 - 1e-6 and float(a.max()) <= 0.9 + 1e-6
    assert not torch.equal(ds[1], a)  # same image (index % 2), another crop
    assert torch.equal(TokenizerViewDataset(list(ds.images), view, length=5, seed=7)[3], a)  # any image sequence


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    return env


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "beit_fast.train_tokenizer", "--help"], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--output", "--steps", "--batch_size", "--lr", "--vocab_size", "--preset", "--temperature_start",
                 "--temperature_end", "--kl_weight", "--seed", "--device", "--data_path", "--input_size"):
        assert flag in r.stdout, flag


def test_cli_flags_become_a_config(tmp_path):
    """The CLI parses its flags into a TokenizerConfig (the flags' defaults are the config's) and validates it,
    every problem named by its flag."""
    from beit_fast.config import TokenizerConfig, from_args
    from beit_fast.train_tokenizer import build_parser

    assert from_args(TokenizerConfig, build_parser().parse_args([])) == TokenizerConfig()
    cfg = from_args(TokenizerConfig, build_parser().parse_args(["--steps", "7", "--kl_weight", "1e-3", "--json"]))
    assert (cfg.steps, cfg.kl_weight, cfg.json, cfg.lr) == (7, 1e-3, True, None)
    bad = TokenizerConfig(steps=0, eval_images=-1, data_path=str(tmp_path / "nope"))
    assert bad.problems() == [f"--data_path {tmp_path / 'nope'}: image folder not found",
                              "--steps must be positive, got 0", "--eval_images must be positive, got -1"]
    (tmp_path / "file").write_text("x")
    not_a_folder = TokenizerConfig(data_path=str(tmp_path / "file"))
    assert not_a_folder.problems() == [f"--data_path {tmp_path / 'file'} is not a folder"]


def test_cli_tiny_run_default_data(tmp_path, capsys):
    from beit_fast.train_tokenizer import main

    out = tmp_path / "tok.pt"
    metrics = main(["--output", str(out), "--steps", "3", "--batch_size", "4", "--input_size", "32",
                    "--vocab_size", "64", "--eval_images", "8", "--no_progress", "--device", "cpu"])
    assert out.is_file() and metrics["steps"] == 3 and metrics["eval_images"] == 8
    printed = capsys.readouterr().out
    assert "codes used" in printed and str(out) in printed
    tok = build_tokenizer("dvae", out)
    assert tok.vocab_size == 64 and tok.input_size == 32
    assert tok.get_codebook_indices(map_pixels(torch.rand(1, 3, 32, 32))).shape == (1, 16)


def test_cli_tiny_run_image_folder(tmp_path):
    from PIL import Image

    from beit_fast.train_tokenizer import main

    rng = np.random.default_rng(0)
    for i in range(3):
        d = tmp_path / "imgs" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(d / f"{i}.jpg")
    out = tmp_path / "tok2.pt"
    metrics = main(["--output", str(out), "--steps", "2", "--batch_size", "2", "--input_size", "32",
                    "--vocab_size", "64", "--eval_images", "4", "--no_progress", "--device", "cpu",
                    "--data_path", str(tmp_path / "imgs"), "--workers", "1"])
    assert out.is_file() and metrics["steps"] == 2
    with pytest.raises(SystemExit, match="--data_path .*nothing: image folder not found"):  # a clear error
        main(["--data_path", str(tmp_path / "nothing"), "--steps", "1", "--output", str(tmp_path / "x.pt")])
