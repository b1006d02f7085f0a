"""The device input pipeline (beit_fast.data.pipeline, ``--data_pipeline gpu``) against the PIL pipeline.

Stated tolerance, CPU tensors (the decoder is libjpeg-turbo, as Pillow's): the views equal the PIL views
bit for bit (max and mean error 0, reported in the assertion messages). With a decoder that differs from
libjpeg's (a stand-in for nvJPEG: libjpeg-turbo's fast integer IDCT and plain chroma upsampling) the
error is the decoder's, and a trained demo tokenizer's ids agree with the PIL views' on >= 98% of
positions. On CUDA (skipped elsewhere): nvJPEG views within a mean error of 1 level, ids >= 98%.
"""
from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from beit_fast import pretrain
from beit_fast.data.image_folder import ImageFolderDataset, SkippedImageWarning
from beit_fast.data.pretraining import PretrainDataset, ResumableSampler, build_pretrain_loader
from beit_fast.data.masking import MaskingGenerator
from beit_fast.data.pipeline import (
    DeviceTwoViewTransform, EncodedPretrainDataset, build_device_pretrain_loader, collate_encoded, color_jitter,
    resample_weights, resize_crops, vertical_pass_first,
)
from beit_fast.data.pipeline import render as render_mod  # the decoders live there: monkeypatch them there
from beit_fast.data.pipeline.ops import contrast_means
from beit_fast.data.samples import sample_photographs
from beit_fast.tokenizer import DiscreteVAE, DVAEConfig
from beit_fast.train.dvae import train_dvae
from beit_fast.data.transforms import (
    BRIGHTNESS, CONTRAST, SATURATION, TokenizerViewTransform, TwoViewConfig, TwoViewTransform, unmap_pixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------
def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Ten real photographs (scikit-image), 120-260 px: JPEGs at several qualities and subsamplings, one
    greyscale JPEG, one progressive JPEG and one PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    photos = sample_photographs()
    for k in range(10):
        img = photos[k % len(photos)]
        side = int(rng.integers(120, 261))
        small = img.copy()
        small.thumbnail((side, side), Image.BICUBIC)
        path = root / f"img_{k:02d}.jpg"
        if k == 3:
            small.save(root / f"img_{k:02d}.png")
        elif k == 5:
            path.write_bytes(_jpeg_bytes(small.convert("L"), quality=85))
        elif k == 7:
            path.write_bytes(_jpeg_bytes(small, quality=80, progressive=True))
        else:
            path.write_bytes(_jpeg_bytes(small, quality=int(rng.integers(75, 96)), subsampling=k % 3))
    return root


def make_dataset(folder, seed=3, cfg=None):
    cfg = cfg or TwoViewConfig()
    return PretrainDataset(ImageFolderDataset(folder), TwoViewTransform(cfg), MaskingGenerator(14, 75), seed=seed)


@pytest.fixture(scope="session")
def demo_tokenizer():
    """A very small dVAE trained for a few seconds on tokenizer views of the photographs (64 codes)."""
    cfg = DVAEConfig(vocab_size=64, code_dim=16, hidden=8, channel_mult=(1, 1, 2), num_res_blocks=1, input_size=32,
                     kl_weight=1e-3)
    tf = TokenizerViewTransform(TwoViewConfig(second_input_size=32))
    photos = sample_photographs(max_side=300)
    torch.manual_seed(0)
    views = torch.stack([tf(photos[i % len(photos)]) for i in range(192)])
    model = DiscreteVAE(cfg)
    train_dvae(cfg, views, steps=60, batch_size=16, lr=1e-2, device="cpu", seed=0, progress=False,
               save_every=0, model=model)
    return model.eval()


def report(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[float, float]:
    """(max, mean) absolute difference in 8-bit levels (``scale``: levels per unit of the tensors)."""
    d = (a.double() - b.double()).abs() * scale
    return d.max().item(), d.mean().item()


# --------------------------------------------------------------------------------------------------------
# the draws
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jitter,hflip", [(0.4, 0.5), (0.0, 0.5), (0.4, 0.0), (0.0, 0.0)])
def test_draw_params_then_apply_equals_the_transform(jitter, hflip):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 210, 3), dtype=np.uint8))
    cfg = TwoViewConfig(input_size=48, second_input_size=24, color_jitter=jitter, hflip_prob=hflip)
    for cls in (TwoViewTransform, TokenizerViewTransform):
        tf = cls(cfg)
        for seed in range(6):
            torch.manual_seed(seed)
            expected = tf(img)
            after = torch.rand(1)
            torch.manual_seed(seed)
            params = tf.draw_params(150, 210)
            got = tf.apply_params(img, params)
            assert torch.equal(torch.rand(1), after)  # the same random numbers were drawn
            for x, y in zip(expected if isinstance(expected, tuple) else (expected,),
                            got if isinstance(got, tuple) else (got,)):
                assert torch.equal(x, y), (cls.__name__, seed)
            assert len(params.jitter) == (3 if jitter else 0)


def test_crop_boxes_and_jitter_draws_match_the_pil_pipeline(photo_folder):
    """The worker-side draws are those the PIL pipeline makes for the same (seed, epoch, index)."""

    class Recording(TwoViewTransform):
        def sample_box(self, img):
            self.box = super().sample_box(img)
            return self.box

    ds = PretrainDataset(ImageFolderDataset(photo_folder), Recording(), MaskingGenerator(14, 75), seed=11)
    enc = EncodedPretrainDataset(ds)
    factors, flips, areas = [], [], []
    for epoch in (0, 1, 5):
        for index in range(len(ds)):
            sample = ds.get(index, epoch)
            e = enc.get(index, epoch)
            assert e.params.box == ds.transform.box, (epoch, index)
            assert torch.equal(e.mask, sample[2])
            h, w = e.image.height, e.image.width
            i, j, bh, bw = e.params.box
            assert 0 <= i and 0 <= j and i + bh <= h and j + bw <= w
            assert sorted(op for op, _ in e.params.jitter) == [BRIGHTNESS, CONTRAST, SATURATION]
            factors += [f for _, f in e.params.jitter]
            flips.append(e.params.flip)
            areas.append(bh * bw / (h * w))
    assert 0.6 <= min(factors) and max(factors) <= 1.4  # ColorJitter(0.4): factors in [0.6, 1.4]
    assert 0.2 <= np.mean(flips) <= 0.8
    assert 0.06 <= min(areas) and max(areas) <= 1.0


# --------------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------------
def _pil_jitter(img: Image.Image, jitter) -> np.ndarray:
    fns = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}
    for op, f in jitter:
        img = fns[op](img, f)
    return np.asarray(img)


def test_color_jitter_is_pillows_bit_for_bit():
    """Batched, zero-padded images of different sizes, each with its own order and factors (incl. > 1)."""
    rng = np.random.default_rng(2)
    photos = sample_photographs(max_side=90)
    imgs = [photos[k] for k in range(6)] + [Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))]
    jitters = []
    for _ in imgs:
        order = rng.permutation(3)
        jitters.append(tuple((int(op), float(np.float32(rng.uniform(0.0, 2.0)))) for op in order))
    hmax, wmax = max(i.size[1] for i in imgs), max(i.size[0] for i in imgs)
    batch = torch.zeros(len(imgs), 3, hmax, wmax, dtype=torch.uint8)
    for k, img in enumerate(imgs):
        batch[k, :, : img.size[1], : img.size[0]] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    ops = torch.tensor([[op for op, _ in j] for j in jitters])
    factors = torch.tensor([[f for _, f in j] for j in jitters], dtype=torch.float32)
    npix = torch.tensor([i.size[0] * i.size[1] for i in imgs])
    out = color_jitter(batch, ops, factors, npix)
    means = contrast_means(batch, ops, factors, npix)
    for k, (img, jitter) in enumerate(zip(imgs, jitters)):
        ref = torch.from_numpy(_pil_jitter(img, jitter).copy()).permute(2, 0, 1)
        got = out[k, :, : img.size[1], : img.size[0]]
        assert torch.equal(got, ref), (k, jitter, report(got, ref, 1.0))
        # on a crop, with the whole image's contrast mean passed in: the crop of the jittered image
        crop = batch[k:k + 1, :, 5:30, 7:40].contiguous()
        got_crop = color_jitter(crop, ops[k:k + 1], factors[k:k + 1], contrast_mean=means[k:k + 1])
        assert torch.equal(got_crop[0], ref[:, 5:30, 7:40]), k
    with pytest.raises(ValueError, match="hue"):
        color_jitter(batch[:1], torch.tensor([[3]]), torch.ones(1, 1), npix[:1])


FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "box": Image.BOX,
           "hamming": Image.HAMMING}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_resampler_is_pillows_bit_for_bit(name):
    """Random crops of photographs and noise, flipped or not, up- and downscaled, tall and wide (Pillow 13
    runs the vertical pass first when the height shrinks much more than the width)."""
    rng = np.random.default_rng(sorted(FILTERS).index(name))
    photos = sample_photographs(max_side=400)
    cases = []
    for t in range(10):
        img = photos[t % len(photos)] if t % 3 else Image.fromarray(
            rng.integers(0, 256, (int(rng.integers(40, 300)), int(rng.integers(40, 300)), 3), dtype=np.uint8))
        W, H = img.size
        h, w = int(rng.integers(8, H + 1)), int(rng.integers(8, W + 1))
        cases.append((img, (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w),
                       bool(t % 2), int(rng.choice([224, 112, 37]))))
    cases.append((photos[0], (0, 100, 400, 60), False, 112))  # tall crop: vertical pass first on Pillow 13
    errors = []
    for img, (i, j, h, w), flip, out in cases:
        W, H = img.size
        ref = np.asarray(TF.resized_crop(TF.hflip(img) if flip else img, i, j, h, w, [out, out],
                                         TF.InterpolationMode(name)))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
        wy = resample_weights(torch.tensor([h]), torch.tensor([i]), torch.tensor([False]), out, H, name)
        wx = resample_weights(torch.tensor([w]), torch.tensor([W - 1 - j if flip else j]), torch.tensor([flip]),
                              out, W, name)
        got = resize_crops(x, wy, wx, vertical_pass_first(torch.tensor([h]), torch.tensor([w]), out, out))[0]
        errors.append(report(got, torch.from_numpy(ref.copy()).permute(2, 0, 1), 1.0))
    worst, mean = max(e[0] for e in errors), float(np.mean([e[1] for e in errors]))
    assert worst == 0, f"{name}: max error {worst} levels, mean {mean:.4f} (Pillow exactness expected)"
    with pytest.raises(ValueError, match="unsupported filter"):
        resample_weights(torch.tensor([4]), torch.tensor([0]), torch.tensor([False]), 2, 4, "nearest")


# --------------------------------------------------------------------------------------------------------
# the whole pipeline against the PIL pipeline
# --------------------------------------------------------------------------------------------------------
def _pil_and_device_batches(ds, batch_size=5, **kw):
    pil = list(build_pretrain_loader(ds, batch_size, 0, ResumableSampler(len(ds), seed=ds.seed)))
    dev = list(build_device_pretrain_loader(ds, batch_size, "cpu", sampler=ResumableSampler(len(ds), seed=ds.seed),
                                            **kw))
    return pil, dev


def test_device_views_equal_the_pil_views_and_tokens(photo_folder, demo_tokenizer):
    ds = make_dataset(photo_folder)
    pil, dev = _pil_and_device_batches(ds)
    assert len(pil) == len(dev) == 2
    for (p_patch, p_tok, p_mask), (d_patch, d_tok, d_mask) in zip(pil, dev):
        pm, pa = report(d_patch, p_patch, 255 / 2)  # patch view: (x - 0.5) / 0.5
        tm, ta = report(d_tok, p_tok, 255 / 0.8)  # tokenizer view: 0.8 x + 0.1
        assert pm == 0 and tm == 0, f"patch view max {pm:.3f} mean {pa:.5f}, tokenizer view max {tm:.3f} " \
                                    f"mean {ta:.5f} levels (expected bit-identical with the CPU decoder)"
        assert torch.equal(d_mask, p_mask) and d_patch.dtype == torch.float32 and d_tok.shape[-1] == 112
        ids_pil = demo_tokenizer.get_codebook_indices(p_tok)
        ids_dev = demo_tokenizer.get_codebook_indices(d_tok)
        assert (ids_pil == ids_dev).float().mean().item() == 1.0


def _fast_libjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A decoder that differs from libjpeg's default like another implementation would (nvJPEG stand-in):
    libjpeg-turbo's fast integer IDCT and non-smoothed chroma upsampling."""
    simplejpeg = pytest.importorskip("simplejpeg")
    return [torch.from_numpy(simplejpeg.decode_jpeg(d.numpy().tobytes(), colorspace="RGB", fastdct=True,
                                                    fastupsample=True)).permute(2, 0, 1).contiguous()
            for d in data]


def test_another_decoder_stays_within_tolerance_and_keeps_the_tokens(photo_folder, demo_tokenizer, monkeypatch):
    pytest.importorskip("simplejpeg")
    monkeypatch.setattr(render_mod, "_decode_jpeg", _fast_libjpeg)
    ds = make_dataset(photo_folder)
    pil, dev = _pil_and_device_batches(ds, prefetch=0)
    maxes, means, agree = [], [], []
    for (p_patch, p_tok, _), (d_patch, d_tok, _) in zip(pil, dev):
        m, a = report(unmap_pixels(d_tok), unmap_pixels(p_tok), 255)
        maxes.append(m)
        means.append(a)
        ids = demo_tokenizer.get_codebook_indices
        agree.append((ids(p_tok) == ids(d_tok)).float().mean().item())
    msg = (f"tokenizer view vs PIL: max {max(maxes):.1f} levels, mean {np.mean(means):.3f} levels; "
           f"token agreement {min(agree):.4f}")
    assert np.mean(means) < 1.5 and min(agree) >= 0.98, msg


def test_deterministic_across_workers_prefetch_and_chunks(photo_folder):
    ds = make_dataset(photo_folder, seed=5)
    runs = []
    for workers, prefetch, chunk in ((0, 0, 64), (2, 1, 3), (2, 2, 1)):
        sampler = ResumableSampler(len(ds), seed=5)
        loader = build_device_pretrain_loader(ds, 4, "cpu", workers, sampler, persistent_workers=workers > 0,
                                              prefetch=prefetch, chunk_size=chunk)
        epochs = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            epochs.append([tuple(t.clone() for t in b) for b in loader])
        runs.append(epochs)
        assert loader.stats.batches == 2
    for run in runs[1:]:
        for e in range(2):
            for a, b in zip(runs[0][e], run[e]):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # another epoch, other views


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def _bad_folder(root):
    """Same layout as tests/test_data.py's (a.png good, b.jpg random bytes, c.png empty, d.jpg truncated,
    e.png good) plus f.jpg CMYK and g.jpg with bytes after the end-of-image marker (both readable)."""
    os.makedirs(root, exist_ok=True)
    photo = sample_photographs(max_side=80)[0]
    photo.save(os.path.join(root, "a.png"))
    (root / "b.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "c.png").write_bytes(b"")
    data = _jpeg_bytes(photo, quality=90)
    (root / "d.jpg").write_bytes(data[: len(data) // 2])
    sample_photographs(max_side=70)[2].save(os.path.join(root, "e.png"))
    (root / "f.jpg").write_bytes(_jpeg_bytes(photo.convert("CMYK"), quality=90))
    (root / "g.jpg").write_bytes(_jpeg_bytes(sample_photographs(max_side=60)[4], quality=90) + b"\0trailer")


def test_bad_files_are_skipped_warned_and_counted_like_the_pil_pipeline(tmp_path):
    _bad_folder(tmp_path)
    ds = make_dataset(tmp_path)
    results = {}
    for kind in ("pil", "gpu"):
        sampler = ResumableSampler(len(ds), seed=0, shuffle=False)
        if kind == "pil":
            loader = build_pretrain_loader(ds, 7, num_workers=2, sampler=sampler, drop_last=False)
        else:
            loader = build_device_pretrain_loader(ds, 7, "cpu", num_workers=2, sampler=sampler, drop_last=False)
        with pytest.warns(SkippedImageWarning) if kind == "pil" else warnings.catch_warnings():
            batches = list(loader)
        results[kind] = (batches, loader.skipped)
    (pil_batches, pil_skipped), (dev_batches, dev_skipped) = results["pil"], results["gpu"]
    assert dev_skipped.num_skipped == pil_skipped.num_skipped == 3
    assert dev_skipped.events == pil_skipped.events == 6
    assert sorted(dev_skipped.files) == sorted(pil_skipped.files)
    assert dev_batches[0].num_skipped == 6
    for x, y in zip(pil_batches[0], dev_batches[0]):
        assert torch.equal(x, y)


def test_a_file_only_the_decoder_rejects_is_replaced_and_counted(photo_folder, monkeypatch):
    """A JPEG whose header parses but whose data neither the device decoder nor Pillow can decode: marked
    unreadable in the main process, the sample redrawn from the next file with its own randomness."""
    ds = make_dataset(photo_folder, seed=2)
    bad_name = "img_01.jpg"
    real_decode, real_pillow = render_mod._decode_jpeg, render_mod._decode_with_pillow
    bad_bytes = (photo_folder / bad_name).read_bytes()

    def decode(data, device):
        if any(d.numel() == len(bad_bytes) and bytes(d.numpy().tobytes()) == bad_bytes for d in data):
            raise RuntimeError("simulated decoder error")
        return real_decode(data, device)

    def pillow(data):
        if bytes(data.numpy().tobytes()) == bad_bytes:
            raise OSError("simulated corrupt data")
        return real_pillow(data)

    monkeypatch.setattr(render_mod, "_decode_jpeg", decode)
    monkeypatch.setattr(render_mod, "_decode_with_pillow", pillow)
    sampler = ResumableSampler(len(ds), seed=2, shuffle=False)
    loader = build_device_pretrain_loader(ds, 5, "cpu", sampler=sampler)
    with pytest.warns(SkippedImageWarning, match=re.escape(bad_name)):
        batches = list(loader)
    assert loader.skipped.num_skipped == 1 and loader.skipped.events == 1
    # row 1 is sample 1 rendered from file 2 with sample 1's randomness: as the PIL pipeline would
    ref_ds = make_dataset(photo_folder, seed=2)
    ref_ds.images.mark_unreadable(1, "bad")
    expected = ref_ds.get(1, epoch=0)
    assert torch.equal(batches[0][0][1], expected[0]) and torch.equal(batches[0][1][1], expected[1])


def test_clear_errors():
    with pytest.raises(ValueError, match="--train_interpolation"):
        DeviceTwoViewTransform(TwoViewConfig(interpolation="nearest"))
    with pytest.raises(TypeError, match="PretrainDataset"):
        EncodedPretrainDataset(object())
    ds = PretrainDataset(sample_photographs()[:2], lambda img: (img, img), MaskingGenerator(14, 75))
    with pytest.raises(TypeError, match="TwoViewTransform"):
        EncodedPretrainDataset(ds)
    with pytest.raises(ValueError, match="empty"):
        collate_encoded([])


# --------------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------------
def _toy_jpegs(folder, n=16, size=48):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        stripes = 127 * (np.sin(xx / (2 + i % 5) + i) > 0)[..., None]
        arr = np.clip(base + stripes + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:03d}.jpg"), quality=90)
    return folder


def _toy_tokenizer(path):
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=64, input_size=32)).save(path)
    return path


def test_pretrain_with_the_gpu_pipeline_on_cpu_equals_the_pil_run(tmp_path):
    images, tok = _toy_jpegs(tmp_path / "images"), _toy_tokenizer(tmp_path / "tok.pt")
    common = ["--data_path", str(images), "--tokenizer", "dvae", "--discrete_vae_weight_path", str(tok),
              "--model", "tiny", "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6",
              "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers", "0", "--amp", "none",
              "--log_freq", "1", "--no_progress", "--epochs", "2", "--warmup_epochs", "1"]
    runs = {}
    for name, flags in (("pil", ["--data_pipeline", "pil"]), ("gpu", ["--data_pipeline", "gpu"]),
                        ("gpu_tokens", ["--data_pipeline", "gpu", "--tokenize_in_loader", "--num_workers", "2"])):
        out = tmp_path / name
        pretrain.main(common + ["--output_dir", str(out), *flags])
        runs[name] = [(r["loss"], r["unigram_entropy"], r["unigram_acc"])
                      for r in map(__import__("json").loads, open(out / "log.jsonl"))]
    # the same losses: same pixels, same tokens (also when the loader's thread computes them); the unigram
    # baseline counts the targets whichever side computed them
    assert len(runs["pil"]) == 8 and runs["gpu"] == runs["pil"] and runs["gpu_tokens"] == runs["pil"]
    assert all(entropy is not None and entropy > 0 for _, entropy, _ in runs["pil"])
    with pytest.raises(SystemExit, match="--tokenize_in_loader needs --data_pipeline gpu"):
        pretrain.main(common + ["--output_dir", str(tmp_path / "bad"), "--tokenize_in_loader"])
    with pytest.raises(SystemExit, match="--data_pipeline gpu supports --train_interpolation"):
        pretrain.main(common + ["--output_dir", str(tmp_path / "bad"), "--data_pipeline", "gpu",
                                "--train_interpolation", "nearest"])


# --------------------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_views_within_tolerance_and_tokens(photo_folder, demo_tokenizer):
    ds = make_dataset(photo_folder)
    pil = list(build_pretrain_loader(ds, 5, 0, ResumableSampler(len(ds), seed=ds.seed)))
    loader = build_device_pretrain_loader(ds, 5, "cuda", sampler=ResumableSampler(len(ds), seed=ds.seed),
                                          pin_memory=True)
    dev = [tuple(t.cpu() for t in b) for b in loader]
    for (p_patch, p_tok, p_mask), (d_patch, d_tok, d_mask) in zip(pil, dev):
        pm, pa = report(d_patch, p_patch, 255 / 2)
        tm, ta = report(d_tok, p_tok, 255 / 0.8)
        ids = demo_tokenizer.get_codebook_indices
        agree = (ids(p_tok) == ids(d_tok)).float().mean().item()
        msg = f"patch max {pm:.2f} mean {pa:.4f}, tokenizer max {tm:.2f} mean {ta:.4f} levels, ids {agree:.4f}"
        assert pa <= 1.0 and ta <= 1.0 and agree >= 0.98, msg
        assert torch.equal(d_mask, p_mask)


def test_loader_side_tokens_equal_the_engines(photo_folder, demo_tokenizer):
    """``set_tokenizer``: each batch carries the tokens the engine would compute (here on CPU tensors; on
    CUDA the same code runs in the prefetch thread on the side stream)."""
    from beit_fast.tokenizer.base import tokenize

    ds = make_dataset(photo_folder)
    loader = build_device_pretrain_loader(ds, 5, "cpu", sampler=ResumableSampler(len(ds), seed=ds.seed))
    loader.set_tokenizer(demo_tokenizer, None)  # fp32 (bf16 convolutions are slow on CPU)
    for batch in loader:
        assert batch.tokens.shape == (5, 196) and batch.tokens.dtype == torch.int64
        assert torch.equal(batch.tokens, tokenize(demo_tokenizer, batch[1]))
    loader.set_tokenizer(None)
    assert not hasattr(next(iter(loader)), "tokens")
