"""The JPEG decoder of the image folders (``--jpeg_decoder``, beit_fast.data.image_folder "JPEG decoding"): simplejpeg gives
Pillow's pixels bit for bit for every kind of JPEG it is used for, everything else (and every file it finds a
problem in) goes to Pillow, bad files fail and are skipped exactly as with Pillow, the pixel limit is checked
before any decoding, and the choice reaches the datasets of pretraining and fine-tuning (and their workers)."""
import importlib.util
import io
import os
import pickle
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from beit_fast.data import jpeg as jpeg_mod
from beit_fast.data.image_folder import ImageFolderDataset, resolve_jpeg_decoder

load = ImageFolderDataset.load_image


@pytest.fixture
def simplejpeg(monkeypatch):
    """The simplejpeg module (skip where absent), its ``decode_jpeg`` calls counted in ``.calls``."""
    sj = pytest.importorskip("simplejpeg")
    calls = []
    real = sj.decode_jpeg

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sj, "decode_jpeg", counted)
    monkeypatch.setattr(sj, "calls", calls, raising=False)
    return sj


def _photo(width, height, seed=0):
    """Smooth gradients plus noise: chroma detail that subsampling and upsampling actually change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 2 * y) * 5 % 256], -1)
    return np.clip(arr + rng.integers(-16, 17, arr.shape), 0, 255).astype(np.uint8)


def _pil_jpeg(path, width, height, mode="RGB", **save_kwargs):
    img = Image.fromarray(_photo(width, height))
    img.convert(mode).save(path, "JPEG", quality=90, **save_kwargs)
    return path


def _same_outcome(path, **kwargs):
    """(pixels or error) of the Pillow path and of the simplejpeg path, asserted equal; returns Pillow's."""
    outcomes = []
    for decoder in ("pil", "simplejpeg"):
        try:
            img = load(str(path), jpeg_decoder=decoder, **kwargs)
            assert img.mode == "RGB"
            outcomes.append(("ok", np.asarray(img)))
        except Exception as e:  # noqa: BLE001 - the failure itself is what is compared
            outcomes.append(("error", f"{type(e).__name__}: {e}"))
    (kind_pil, pil), (kind_sj, sj) = outcomes
    assert kind_pil == kind_sj, outcomes
    if kind_pil == "ok":
        assert pil.shape == sj.shape and pil.dtype == sj.dtype == np.uint8
        assert np.array_equal(pil, sj), f"{path}: max difference {np.abs(pil.astype(int) - sj).max()}"
    else:
        assert pil == sj
    return outcomes[0]


# --------------------------------------------------------------------------------------------------------
# Same pixels where simplejpeg decodes
# --------------------------------------------------------------------------------------------------------
SIZES = [(64, 48), (33, 17), (17, 250), (301, 199), (1, 1), (2, 3)]
PIL_KINDS = [  # Pillow's subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    pytest.param("RGB", dict(subsampling=s, progressive=p, **r), id=f"{name}-{'progressive' if p else 'baseline'}"
                 + ("-restarts" if r else ""))
    for s, name in ((0, "444"), (1, "422"), (2, "420"))
    for p in (False, True)
    for r in ({}, {"restart_marker_blocks": 2})
] + [pytest.param("L", dict(progressive=p), id=f"grey-{'progressive' if p else 'baseline'}") for p in (False, True)]


@pytest.mark.parametrize("mode,save_kwargs", PIL_KINDS)
def test_simplejpeg_gives_pillows_pixels(tmp_path, simplejpeg, mode, save_kwargs):
    written = 0
    for width, height in SIZES:
        path = tmp_path / f"{width}x{height}.jpg"
        try:
            _pil_jpeg(path, width, height, mode, **save_kwargs)
        except OSError:  # Pillow cannot write restart markers into a 1x1 image
            assert width * height <= 1 and "restart_marker_blocks" in save_kwargs
            continue
        before = len(simplejpeg.calls)
        _same_outcome(path)
        assert len(simplejpeg.calls) == before + 1  # simplejpeg did decode it (once, no fallback)
        written += 1
    assert written >= len(SIZES) - 1


@pytest.mark.parametrize("subsampling", ["444", "422", "420", "440", "411"])
def test_simplejpeg_gives_pillows_pixels_for_subsamplings_pillow_cannot_write(tmp_path, simplejpeg, subsampling):
    """4:4:0 and 4:1:1 JPEGs (written by libjpeg-turbo through simplejpeg): the same pixels too."""
    for width, height in SIZES:
        path = tmp_path / f"{width}x{height}.jpg"
        path.write_bytes(simplejpeg.encode_jpeg(_photo(width, height), quality=90, colorsubsampling=subsampling))
        assert simplejpeg.decode_jpeg_header(path.read_bytes())[3] == subsampling
        before = len(simplejpeg.calls)
        _same_outcome(path)
        assert len(simplejpeg.calls) == before + 1


def test_extended_sequential_frame_gives_pillows_pixels(tmp_path, simplejpeg):
    """SOF1 (extended sequential, Huffman) with 8-bit samples decodes as baseline: the same pixels."""
    raw = _pil_jpeg(io.BytesIO(), 40, 30).getvalue()
    sof = raw.index(b"\xff\xc0")
    path = tmp_path / "sof1.jpg"
    path.write_bytes(raw[:sof] + b"\xff\xc1" + raw[sof + 2:])
    assert jpeg_mod._jpeg_frame_marker(path.read_bytes()) == 0xC1
    _same_outcome(path)
    assert len(simplejpeg.calls) == 1


# --------------------------------------------------------------------------------------------------------
# Pillow for everything else
# --------------------------------------------------------------------------------------------------------
def _with_adobe_segment(raw: bytes, transform: int) -> bytes:
    """``raw`` with an Adobe APP14 segment (colour transform ``transform``) after the start of image."""
    body = b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes([transform])
    return raw[:2] + b"\xff\xee" + (len(body) + 2).to_bytes(2, "big") + body + raw[2:]


def test_other_files_are_decoded_by_pillow(tmp_path, simplejpeg):
    rgb = Image.fromarray(_photo(40, 30))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)  # Adobe-marked, inverted CMYK
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    (tmp_path / "adobe_ycc.jpg").write_bytes(_with_adobe_segment(raw, 1))
    sof = raw.index(b"\xff\xc0")
    (tmp_path / "arithmetic.jpg").write_bytes(raw[:sof] + b"\xff\xc9" + raw[sof + 2:])  # SOF9: not ours
    rgb.save(tmp_path / "png.jpg", "PNG")  # a PNG named .jpg
    rgb.save(tmp_path / "plain.png")
    rgb.save(tmp_path / "multi.jpg", "MPO", save_all=True, append_images=[rgb.rotate(90)])
    for name in ("cmyk.jpg", "adobe_ycc.jpg", "arithmetic.jpg", "png.jpg", "plain.png", "multi.jpg"):
        _same_outcome(tmp_path / name)
    assert simplejpeg.calls == []  # none of them reached simplejpeg
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(tmp_path / "multi.jpg") as im:
        assert im.format == "MPO"


# --------------------------------------------------------------------------------------------------------
# Bad files: the same failures, the same skips
# --------------------------------------------------------------------------------------------------------
def _bad_jpegs(folder):
    """JPEGs that Pillow rejects, and damaged ones it decodes (libjpeg warnings) which simplejpeg refuses."""
    raw = _pil_jpeg(io.BytesIO(), 80, 64).getvalue()
    sos = raw.index(b"\xff\xda")
    flipped = bytearray(raw)
    for k in range(sos + 300, sos + 340):
        flipped[k] ^= 0x5A
    bogus_restart = bytearray(raw)
    bogus_restart[sos + 400: sos + 402] = b"\xff\xd3"
    files = {
        "truncated_half.jpg": raw[: len(raw) // 2], "no_end_marker.jpg": raw[:-2], "header_only.jpg": raw[:200],
        "zero.jpg": b"", "noise.jpg": os.urandom(500), "soi_only.jpg": b"\xff\xd8\xff",
        "flipped_bits.jpg": bytes(flipped), "bogus_restart.jpg": bytes(bogus_restart),
        "extraneous_bytes.jpg": raw[:sos] + b"\x00\x00\x00" + raw[sos:], "trailing_garbage.jpg": raw + b"junk" * 20,
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return sorted(files)


def test_bad_jpegs_fail_or_decode_exactly_as_with_pillow(tmp_path, simplejpeg):
    outcomes = {name: _same_outcome(tmp_path / name)[0] for name in _bad_jpegs(tmp_path)}
    # Pillow refuses the truncated ones ...
    for name in ("truncated_half.jpg", "header_only.jpg", "zero.jpg", "noise.jpg", "soi_only.jpg"):
        assert outcomes[name] == "error", name
    # ... and decodes the damaged ones, which simplejpeg (strict) refuses: the simplejpeg path gave Pillow's
    # pixels above by handing them to Pillow
    for name in ("flipped_bits.jpg", "bogus_restart.jpg", "extraneous_bytes.jpg"):
        assert outcomes[name] == "ok", name
        with pytest.raises(ValueError, match="Corrupt JPEG data"):
            simplejpeg.decode_jpeg((tmp_path / name).read_bytes(), colorspace="RGB")
    assert outcomes["trailing_garbage.jpg"] == "ok"


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_jpegs_are_skipped_and_counted_as_with_pillow(tmp_path, simplejpeg, workers):
    from beit_fast.data.pretraining import PretrainDataset, build_pretrain_loader
    from beit_fast.data.masking import MaskingGenerator
    from beit_fast.data.transforms import TwoViewConfig, TwoViewTransform

    folder = tmp_path / "mixed"
    folder.mkdir()
    _bad_jpegs(folder)
    for k in range(4):
        _pil_jpeg(folder / f"good_{k}.jpg", 40 + k, 36, subsampling=k % 3, progressive=k == 3)
    results = {}
    for decoder in ("pil", "simplejpeg"):
        images = ImageFolderDataset(folder, jpeg_decoder=decoder)
        ds = PretrainDataset(images, TwoViewTransform(TwoViewConfig(input_size=16, second_input_size=16)),
                             MaskingGenerator(2, 1, min_num_patches=1), seed=3)
        loader = build_pretrain_loader(ds, batch_size=2, num_workers=workers, drop_last=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(loader)
        # the reasons name the open file's descriptor number (Pillow's repr of it), which may differ
        reasons = {p: re.sub(r"name=\d+", "name=N", r) for p, r in loader.skipped.files.items()}
        results[decoder] = (batches, reasons, loader.skipped.events)
    (pil_batches, pil_files, pil_events), (sj_batches, sj_files, sj_events) = results["pil"], results["simplejpeg"]
    assert pil_files == sj_files and pil_events == sj_events
    assert len(pil_files) >= 5  # the truncated, empty and random files Pillow rejects
    assert len(pil_batches) == len(sj_batches)
    for a, b in zip(pil_batches, sj_batches):
        assert all(torch_equal(x, y) for x, y in zip(a, b))
        assert [p for p, _ in a.skipped] == [p for p, _ in b.skipped]
    if workers == 0:
        assert simplejpeg.calls  # and it did decode here (in workers, the calls are not counted)


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_pixel_limit_is_checked_before_any_decoding(tmp_path, simplejpeg, monkeypatch):
    path = _pil_jpeg(tmp_path / "big.jpg", 300, 200)

    def no_header(*args, **kwargs):
        raise AssertionError("simplejpeg read the file of a refused image")

    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", no_header)
    with pytest.raises(ValueError, match=r"300x200 = 60000 pixels is more than max_image_pixels 59999 "
                                         r"\(CLI: --max_image_pixels\)"):
        load(str(path), 59999, "simplejpeg")
    assert simplejpeg.calls == []
    images = ImageFolderDataset(tmp_path, max_image_pixels=59999, jpeg_decoder="simplejpeg")
    with pytest.raises(RuntimeError, match="could not be read"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images[0]
    assert "max_image_pixels 59999" in images.skipped_files[str(path)] and simplejpeg.calls == []


# --------------------------------------------------------------------------------------------------------
# The choice: resolution, errors naming the flag, datasets and workers
# --------------------------------------------------------------------------------------------------------
def test_choice_resolves_and_unknown_or_missing_decoders_fail_clearly(monkeypatch):
    assert resolve_jpeg_decoder("pil") == "pil"
    installed = importlib.util.find_spec("simplejpeg") is not None
    assert resolve_jpeg_decoder("auto") == ("simplejpeg" if installed else "pil")
    with pytest.raises(ValueError, match="--jpeg_decoder"):
        resolve_jpeg_decoder("turbo")
    monkeypatch.setattr(jpeg_mod, "_simplejpeg", lambda: None)  # as where simplejpeg is not installed
    assert resolve_jpeg_decoder("auto") == "pil"
    with pytest.raises(ValueError, match=r"needs the simplejpeg package .*--jpeg_decoder"):
        resolve_jpeg_decoder("simplejpeg")


def _without_simplejpeg(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "simplejpeg" else real(name, *a))


def test_clis_name_the_flag_when_simplejpeg_is_missing(tmp_path, monkeypatch):
    from beit_fast import finetune, linear_probe, pretrain

    _without_simplejpeg(monkeypatch)
    message = "--jpeg_decoder simplejpeg needs the simplejpeg package, which is not installed"
    with pytest.raises(SystemExit, match=message):
        pretrain.main(["--jpeg_decoder", "simplejpeg", "--output_dir", str(tmp_path / "p"), "--no_progress"])
    with pytest.raises(SystemExit, match=message):
        finetune.main(["--jpeg_decoder", "simplejpeg", "--output_dir", str(tmp_path / "f"), "--no_progress"])
    with pytest.raises(SystemExit, match=message):
        linear_probe.main(["--jpeg_decoder", "simplejpeg", "--output_dir", str(tmp_path / "l"), "--no_progress"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        pretrain.main(["--jpeg_decoder", "turbo"])


def test_finetune_config_validation_names_a_bad_decoder():
    from beit_fast.config import FinetuneConfig

    with pytest.raises(ValueError, match="jpeg_decoder must be auto, pil or simplejpeg, got 'turbo'"):
        FinetuneConfig(jpeg_decoder="turbo").validate()


def test_choice_survives_pickling_for_workers(tmp_path, simplejpeg):
    from beit_fast.data.labelled import LabelledImageFolder

    (tmp_path / "a").mkdir()
    _pil_jpeg(tmp_path / "a" / "x.jpg", 20, 20)
    for decoder in ("pil", "simplejpeg"):
        folder = LabelledImageFolder(tmp_path, jpeg_decoder=decoder)
        assert pickle.loads(pickle.dumps(folder)).images.jpeg_decoder == decoder  # as a spawned worker gets it


def test_finetune_cli_choice_reaches_the_datasets(tmp_path, monkeypatch):
    """--jpeg_decoder pil on the fine-tuning command line: the train and val folders decode with Pillow."""
    from beit_fast import finetune
    from beit_fast.data import labelled as labelled_data

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            _pil_jpeg(tmp_path / "data" / split / c / "0.jpg", 24, 24)
    real, built = labelled_data.load_classification_data, []

    class Stop(Exception):
        pass

    def spy(cfg, *args):
        built.append(real(cfg, *args))
        raise Stop

    monkeypatch.setattr(labelled_data, "load_classification_data", spy)
    with pytest.raises(Stop):
        finetune.main(["--data_path", str(tmp_path / "data"), "--jpeg_decoder", "pil", "--model", "tiny",
                       "--input_size", "16", "--patch_size", "8", "--output_dir", str(tmp_path / "run"),
                       "--no_progress", "--device", "cpu"])
    (train, val, classes), = built
    assert train.images.jpeg_decoder == val.images.jpeg_decoder == "pil" and classes == ["a", "b"]


# --------------------------------------------------------------------------------------------------------
# A pretraining run: the same losses with either decoder
# --------------------------------------------------------------------------------------------------------
def test_pretraining_logs_identical_losses_with_either_decoder(tmp_path, simplejpeg, one_thread):
    from beit_fast import pretrain
    from test_pretrain import make_toy_images, make_toy_tokenizer, read_log

    pngs = make_toy_images(tmp_path / "png", n=12, size=40)
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for k, name in enumerate(sorted(os.listdir(pngs))):
        img = Image.open(os.path.join(pngs, name)).convert("L" if k % 4 == 3 else "RGB")
        img.save(folder / (name[:-4] + ".jpg"), quality=85, subsampling=k % 3, progressive=k % 2 == 1)
    tok = make_toy_tokenizer(tmp_path / "tok.pt")
    logs = {}
    for decoder in ("pil", "simplejpeg"):
        out = tmp_path / decoder
        pretrain.main(["--data_path", str(folder), "--tokenizer", "dvae", "--discrete_vae_weight_path", str(tok),
                       "--model", "tiny", "--input_size", "32", "--patch_size", "8", "--num_mask_patches", "6",
                       "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers", "0", "--amp",
                       "none", "--epochs", "1", "--log_freq", "1", "--no_progress", "--output_dir", str(out),
                       "--jpeg_decoder", decoder])
        logs[decoder] = [r["loss"] for r in read_log(out)]
        if decoder == "pil":
            assert simplejpeg.calls == []
    assert len(logs["pil"]) == 3 and np.isfinite(logs["pil"]).all()
    assert logs["pil"] == logs["simplejpeg"]
    assert len(simplejpeg.calls) >= 12  # every image went through simplejpeg
