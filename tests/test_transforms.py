"""Tests of beit_fast.data.transforms: the BEiT two-view transform, its tokenizer-view-only variant and RGB conversion."""
import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from PIL import Image

from beit_fast.data.transforms import (
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, TokenizerViewTransform, TwoViewConfig, TwoViewTransform,
    map_pixels, to_rgb, unmap_pixels,
)


def coord_image(width=256, height=256):
    """R = x, G = y (exact for 256x256), B = 128: a pixel's colour encodes its coordinates."""
    x = np.arange(width, dtype=np.float64) * 255.0 / (width - 1)
    y = np.arange(height, dtype=np.float64) * 255.0 / (height - 1)
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.rint(x)[None, :]
    arr[..., 1] = np.rint(y)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr, "RGB")


def to_unit(patch, tok, cfg):
    """Undo the normalisations: both views back to [0, 1] RGB."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return patch * std + mean, unmap_pixels(tok)


def pooled(x, cells):
    return TF.adaptive_avg_pool2d(x[None], cells)[0]


class RecordingTransform(TwoViewTransform):
    def sample_box(self, img):
        self.last_box = super().sample_box(img)
        self.last_size = img.size
        return self.last_box


# --------------------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_defaults():
    tf = TwoViewTransform()
    torch.manual_seed(0)
    patch, tok = tf(coord_image(300, 200))
    assert patch.shape == (3, 224, 224) and patch.dtype == torch.float32
    assert tok.shape == (3, 112, 112) and tok.dtype == torch.float32
    cfg = tf.cfg
    assert (cfg.input_size, cfg.second_input_size) == (224, 112)
    assert (cfg.interpolation, cfg.second_interpolation) == ("bicubic", "lanczos")
    assert cfg.scale == (0.08, 1.0) and cfg.ratio == pytest.approx((0.75, 4 / 3))
    # ColorJitter(0.4, 0.4, 0.4) without hue, flip p = 0.5
    cj = tf.color_jitter
    assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
    assert cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue is None
    assert tf.hflip.p == 0.5
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("hflip", [0.0, 1.0])
@pytest.mark.parametrize("size", [(256, 256), (300, 180)])
def test_both_views_show_the_same_crop_box(hflip, size):
    """Decode the source coordinates seen by every 8x8 (patch) / 4x4 (tokenizer) cell: they must agree with
    each other AND with the box the transform sampled (in the flipped image when flipping)."""
    W, H = size
    cfg = TwoViewConfig(color_jitter=0.0, hflip_prob=hflip)
    tf = RecordingTransform(cfg)
    img = coord_image(W, H)
    for seed in range(12):
        torch.manual_seed(seed)
        patch, tok = tf(img)
        i, j, h, w = tf.last_box
        assert 0 <= i and 0 <= j and i + h <= H and j + w <= W
        p, t = to_unit(patch, tok, cfg)
        pp, tt = pooled(p, 28) * 255, pooled(t, 28) * 255
        # the two views agree with each other
        assert (pp - tt).abs()[:2, 1:-1, 1:-1].max() < 1.5, seed
        assert (pp - tt).abs()[:2].max() < 3.0, seed
        # and with the sampled box: expected source coordinate at each cell centre
        k = torch.arange(28, dtype=torch.float64) + 0.5
        xs = j + k * w / 28 - 0.5  # in the (possibly flipped) image the box refers to
        ys = i + k * h / 28 - 0.5
        if hflip == 1.0:
            xs = (W - 1) - xs  # the flipped image's column x shows the original column W-1-x
        exp_r = (xs * 255.0 / (W - 1))[None, :].expand(28, 28)
        exp_g = (ys * 255.0 / (H - 1))[:, None].expand(28, 28)
        for view in (pp, tt):
            assert (view[0].double() - exp_r).abs()[1:-1, 1:-1].max() < 2.0, (seed, tf.last_box)
            assert (view[1].double() - exp_g).abs()[1:-1, 1:-1].max() < 2.0, (seed, tf.last_box)


def test_centre_fallback_for_extreme_aspect_ratio():
    cfg = TwoViewConfig(color_jitter=0.0, hflip_prob=0.0)
    tf = RecordingTransform(cfg)
    img = coord_image(2000, 20)  # no box of ratio <= 4/3 and area >= 8% fits: the fallback is taken
    torch.manual_seed(0)
    patch, tok = tf(img)
    assert tf.last_box == (0, (2000 - round(20 * 4 / 3)) // 2, 20, round(20 * 4 / 3))
    assert patch.shape == (3, 224, 224) and tok.shape == (3, 112, 112)


def test_normalisations_and_map_pixels():
    rgb = (200, 100, 50)
    img = Image.new("RGB", (64, 48), rgb)
    c = torch.tensor(rgb, dtype=torch.float32) / 255
    # official default: mean = std = 0.5
    cfg = TwoViewConfig(color_jitter=0.0, hflip_prob=0.0)
    patch, tok = TwoViewTransform(cfg)(img)
    assert torch.allclose(patch, ((c - 0.5) / 0.5).view(3, 1, 1).expand_as(patch), atol=1e-6)
    assert torch.allclose(tok, (0.8 * c + 0.1).view(3, 1, 1).expand_as(tok), atol=1e-6)
    # ImageNet mean/std
    cfg_in = TwoViewConfig(color_jitter=0.0, hflip_prob=0.0, imagenet_default_mean_and_std=True)
    patch_in, tok_in = TwoViewTransform(cfg_in)(img)
    m, s = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    assert torch.allclose(patch_in, ((c - m) / s).view(3, 1, 1).expand_as(patch_in), atol=1e-5)
    assert torch.equal(tok_in, tok)  # the tokenizer view does not depend on that flag
    # ranges: black and white images
    for value, p_exp, t_exp in ((0, -1.0, 0.1), (255, 1.0, 0.9)):
        p, t = TwoViewTransform(cfg)(Image.new("RGB", (40, 40), (value,) * 3))
        assert torch.allclose(p, torch.full_like(p, p_exp)) and torch.allclose(t, torch.full_like(t, t_exp))
    # map_pixels / unmap_pixels
    x = torch.linspace(0, 1, 11)
    assert torch.allclose(map_pixels(x), 0.8 * x + 0.1)
    assert map_pixels(x).min() == pytest.approx(0.1) and map_pixels(x).max() == pytest.approx(0.9)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    # "customized" tokenizer view: Normalize(0.5, 0.5)
    cfg_c = TwoViewConfig(color_jitter=0.0, hflip_prob=0.0, tokenizer_view="customized")
    _, tok_c = TwoViewTransform(cfg_c)(img)
    assert torch.allclose(tok_c, ((c - 0.5) / 0.5).view(3, 1, 1).expand_as(tok_c), atol=1e-6)


def test_value_ranges_on_a_black_and_white_image():
    blocks = (np.indices((8, 10)).sum(0) % 2 * 255).astype(np.uint8)  # 8x10 checkerboard of 32px squares
    img = Image.fromarray(np.kron(blocks, np.ones((32, 32), np.uint8))).convert("RGB")
    tf = TwoViewTransform(TwoViewConfig(color_jitter=0.0))
    for seed in range(3):
        torch.manual_seed(seed)
        patch, tok = tf(img)
        # Pillow clamps bicubic / Lanczos overshoot to [0, 255]: the ranges are exactly [-1, 1], [0.1, 0.9]
        assert patch.min().item() == pytest.approx(-1.0) and patch.max().item() == pytest.approx(1.0)
        assert tok.min().item() == pytest.approx(0.1) and tok.max().item() == pytest.approx(0.9)


def _slope(view):
    """Sign of the left-to-right trend of the red channel."""
    r = view[0]
    return torch.sign((r[:, -8:].mean() - r[:, :8].mean())).item()


def test_hflip_applies_to_both_views_together():
    cfg = TwoViewConfig(color_jitter=0.0, hflip_prob=0.5)
    tf = TwoViewTransform(cfg)
    img = coord_image(256, 256)
    signs = []
    for seed in range(40):
        torch.manual_seed(seed)
        patch, tok = tf(img)
        sp, st = _slope(patch), _slope(tok)
        assert sp != 0 and sp == st, seed
        signs.append(sp)
    flipped = signs.count(-1.0)
    assert 8 <= flipped <= 32  # p = 0.5 over 40 samples (binomial: outside this range has p < 1e-4)
    for p, expected in ((0.0, 1.0), (1.0, -1.0)):
        tf = TwoViewTransform(TwoViewConfig(color_jitter=0.0, hflip_prob=p))
        for seed in range(5):
            torch.manual_seed(seed)
            patch, tok = tf(img)
            assert _slope(patch) == _slope(tok) == expected


def test_randomness_comes_only_from_torch_global_rng():
    arr = np.random.default_rng(1).integers(0, 256, size=(200, 260, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    tf = TwoViewTransform()
    torch.manual_seed(5)
    random.seed(1)
    np.random.seed(1)
    a = tf(img)
    torch.manual_seed(5)
    random.seed(2)  # other Python / numpy global seeds must not matter
    np.random.seed(2)
    b = tf(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(6)
    c = tf(img)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("jitter", [0.4, 0.0])
def test_tokenizer_view_transform_is_the_second_view(jitter):
    """Same torch draws, same rendering: under one seed it gives exactly TwoViewTransform's tokenizer view."""
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(150, 210, 3), dtype=np.uint8))
    cfg = TwoViewConfig(second_input_size=40, color_jitter=jitter)
    tok_only = TokenizerViewTransform(cfg)
    for seed in range(3):
        torch.manual_seed(seed)
        _, expected = TwoViewTransform(cfg)(img)
        after_two = torch.rand(1)
        torch.manual_seed(seed)
        view = tok_only(img)
        assert torch.equal(view, expected) and torch.equal(torch.rand(1), after_two)
    assert view.shape == (3, 40, 40) and "40px lanczos dall-e" in repr(tok_only) and "patch" not in repr(tok_only)


def test_color_jitter_changes_colours_and_can_be_disabled():
    img = Image.new("RGB", (64, 64), (120, 80, 60))
    on = TwoViewTransform(TwoViewConfig(hflip_prob=0.0))
    off = TwoViewTransform(TwoViewConfig(hflip_prob=0.0, color_jitter=0.0))
    assert off.color_jitter is None
    means_on, means_off = set(), set()
    for seed in range(6):
        torch.manual_seed(seed)
        means_on.add(round(on(img)[0].mean().item(), 4))
        torch.manual_seed(seed)
        means_off.add(round(off(img)[0].mean().item(), 4))
    assert len(means_on) == 6 and len(means_off) == 1


def test_invalid_config():
    with pytest.raises(ValueError):
        TwoViewConfig(interpolation="cubic")
    with pytest.raises(ValueError):
        TwoViewConfig(tokenizer_view="vqgan")
    with pytest.raises(ValueError):
        TwoViewConfig(scale=(0.5, 0.1))


# --------------------------------------------------------------------------------------------------------
# RGB conversion
# --------------------------------------------------------------------------------------------------------
def _roundtrip(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def test_rgb_is_returned_unchanged():
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(img) is img


def test_grayscale_and_bilevel_to_rgb():
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = np.asarray(to_rgb(Image.fromarray(arr, "L")))
    assert out.shape == (8, 8, 3) and all(np.array_equal(out[..., c], arr) for c in range(3))
    bw = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    assert np.array_equal(np.asarray(to_rgb(bw))[..., 0], [[0, 255], [255, 0]])


def test_alpha_is_composited_over_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque: kept
    arr[0, 1] = (255, 0, 0, 0)  # fully transparent red: background (white), not red
    arr[1, 0] = (0, 0, 0, 128)  # half transparent black: mid grey
    arr[1, 1] = (0, 0, 0, 0)  # fully transparent black: white
    out = np.asarray(to_rgb(_roundtrip(Image.fromarray(arr, "RGBA"), "PNG")))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])
    assert tuple(out[1, 1]) == (255, 255, 255)
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_palette_images_with_and_without_transparency():
    arr = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    p = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert np.array_equal(np.asarray(to_rgb(_roundtrip(p, "PNG"))), arr)
    blue_index = p.getpixel((1, 0))
    pt = _roundtrip(p, "PNG", transparency=blue_index)
    assert "transparency" in pt.info
    assert np.asarray(to_rgb(pt)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    # palette whose entries carry alpha
    pa = Image.new("P", (2, 1))
    pa.putpalette([0, 255, 0, 255, 0, 0, 255, 0], rawmode="RGBA")  # 0: opaque green, 1: transparent blue
    pa.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(pa)).tolist() == [[[0, 255, 0], [255, 255, 255]]]


def test_cmyk_to_rgb_in_memory_and_from_jpeg():
    colours = {(255, 0, 0, 0): (0, 255, 255), (0, 255, 0, 0): (255, 0, 255), (0, 0, 0, 255): (0, 0, 0),
               (0, 0, 0, 0): (255, 255, 255)}
    for cmyk, rgb in colours.items():
        img = Image.new("CMYK", (16, 16), cmyk)
        assert to_rgb(img).getpixel((3, 3)) == rgb
        jpg = _roundtrip(img, "JPEG", quality=95)
        assert jpg.mode == "CMYK"
        got = to_rgb(jpg).getpixel((3, 3))
        assert all(abs(a - b) <= 3 for a, b in zip(got, rgb)), (cmyk, got)


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 30000, 32768], [40000, 50000, 65280, 65535]], dtype=np.uint16)
    img = _roundtrip(Image.fromarray(values), "PNG")
    assert img.mode in ("I;16", "I;16B", "I")
    assert img.convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # what naive conversion does
    out = np.asarray(to_rgb(img))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out[0, 2, 0] == 117  # 30000 / 257
    # 'I' (32-bit int container of 16-bit data) and big-endian 16-bit
    i32 = Image.fromarray(values.astype(np.int32))
    assert i32.mode == "I"
    assert np.array_equal(np.asarray(to_rgb(i32))[..., 1], expected)
    be = Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(be))[..., 0], expected)


def test_float_images():
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(to_rgb(f01))[0, :, 0].tolist() == [0, 128, 255]
    f255 = Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32), "F")
    assert np.asarray(to_rgb(f255))[0, :, 0].tolist() == [0, 100, 255]


def test_transform_accepts_non_rgb_inputs():
    tf = TwoViewTransform(TwoViewConfig(color_jitter=0.0, hflip_prob=0.0))
    gray16 = Image.fromarray(np.full((50, 60), 30000, np.uint16))
    patch, tok = tf(gray16)
    assert torch.allclose(patch, torch.full_like(patch, (117 / 255 - 0.5) / 0.5), atol=1e-6)
    for mode in ("L", "RGBA", "CMYK", "P", "LA"):
        patch, tok = tf(Image.new("RGB", (50, 40), (30, 60, 90)).convert(mode))
        assert patch.shape == (3, 224, 224) and tok.shape == (3, 112, 112)
