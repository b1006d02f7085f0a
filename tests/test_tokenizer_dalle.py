"""DALL-E encoder tokenizer: architecture/key layout, loading the pickled dall_e module without the
package, plain state dicts, token shapes and error handling.

A stand-in ``dall_e`` package is written to a temporary directory: the original's ``dall_e/utils.py``
and ``dall_e/encoder.py`` (github.com/openai/DALL-E) with the ``attrs`` decorators replaced by plain
``__init__`` methods that set the same attributes, so instances pickle with the same class paths
(``dall_e.encoder.Encoder``, ``dall_e.encoder.EncoderBlock``, ``dall_e.utils.Conv2d``) and the same
``__dict__`` layout as the released ``encoder.pkl``.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import textwrap

import pytest
import torch

from beit_fast.tokenizer import (
    DalleEncoder,
    VisualTokenizer,
    build_tokenizer,
    dalle_state_dict_from_file,
    load_dalle_encoder,
    map_pixels,
    unmap_pixels,
)

FAKE_UTILS = '''
import math
import torch
import torch.nn as nn
import torch.nn.functional as F

logit_laplace_eps: float = 0.1

class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device('cpu'), requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
        w = torch.empty((self.n_out, self.n_in, self.kw, self.kw), dtype=torch.float32,
            device=self.device, requires_grad=self.requires_grad)
        w.normal_(std=1 / math.sqrt(self.n_in * self.kw ** 2))
        b = torch.zeros((self.n_out,), dtype=torch.float32, device=self.device,
            requires_grad=self.requires_grad)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        if self.use_float16 and 'cuda' in self.w.device.type:
            if x.dtype != torch.float16:
                x = x.half()
            w, b = self.w.half(), self.b.half()
        else:
            if x.dtype != torch.float32:
                x = x.float()
            w, b = self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)
'''

FAKE_ENCODER = '''
import torch
import torch.nn as nn
from collections import OrderedDict
from functools import partial
from dall_e.utils import Conv2d

class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = self.n_out // 4
        self.post_gain = 1 / (self.n_layers ** 2)
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        self.id_path = make_conv(self.n_in, self.n_out, 1) if self.n_in != self.n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ('relu_1', nn.ReLU()),
            ('conv_1', make_conv(self.n_in, self.n_hid, 3)),
            ('relu_2', nn.ReLU()),
            ('conv_2', make_conv(self.n_hid, self.n_hid, 3)),
            ('relu_3', nn.ReLU()),
            ('conv_3', make_conv(self.n_hid, self.n_hid, 3)),
            ('relu_4', nn.ReLU()),
            ('conv_4', make_conv(self.n_hid, self.n_out, 1)),]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)

class Encoder(nn.Module):
    group_count: int = 4

    def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                 device=torch.device('cpu'), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blk_range = range(self.n_blk_per_group)
        n_layers = self.group_count * self.n_blk_per_group
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        make_blk = partial(EncoderBlock, n_layers=n_layers, device=self.device, requires_grad=self.requires_grad)
        self.blocks = nn.Sequential(OrderedDict([
            ('input', make_conv(self.input_channels, 1 * self.n_hid, 7)),
            ('group_1', nn.Sequential(OrderedDict([
                *[(f'block_{i + 1}', make_blk(1 * self.n_hid, 1 * self.n_hid)) for i in blk_range],
                ('pool', nn.MaxPool2d(kernel_size=2)),
            ]))),
            ('group_2', nn.Sequential(OrderedDict([
                *[(f'block_{i + 1}', make_blk(1 * self.n_hid if i == 0 else 2 * self.n_hid, 2 * self.n_hid)) for i in blk_range],
                ('pool', nn.MaxPool2d(kernel_size=2)),
            ]))),
            ('group_3', nn.Sequential(OrderedDict([
                *[(f'block_{i + 1}', make_blk(2 * self.n_hid if i == 0 else 4 * self.n_hid, 4 * self.n_hid)) for i in blk_range],
                ('pool', nn.MaxPool2d(kernel_size=2)),
            ]))),
            ('group_4', nn.Sequential(OrderedDict([
                *[(f'block_{i + 1}', make_blk(4 * self.n_hid if i == 0 else 8 * self.n_hid, 8 * self.n_hid)) for i in blk_range],
            ]))),
            ('output', nn.Sequential(OrderedDict([
                ('relu', nn.ReLU()),
                ('conv', make_conv(8 * self.n_hid, self.vocab_size, 1, use_float16=False)),
            ]))),
        ]))

    def forward(self, x):
        if len(x.shape) != 4:
            raise ValueError(f'input shape {x.shape} is not 4d')
        if x.shape[1] != self.input_channels:
            raise ValueError(f'input has {x.shape[1]} channels but model built for {self.input_channels}')
        if x.dtype != torch.float32:
            raise ValueError('input must have dtype torch.float32')
        return self.blocks(x)
'''

FAKE_DECODER = '''
import torch.nn as nn
from dall_e.utils import Conv2d

class Decoder(nn.Module):
    def __init__(self, n_init=16, vocab_size=64):
        super().__init__()
        self.blocks = nn.Sequential(Conv2d(vocab_size, n_init, 1, use_float16=False))
'''

SMALL = dict(n_hid=8, vocab_size=512)  # same topology as the released model, narrower


pytestmark = pytest.mark.usefixtures("one_thread")


def _drop_fake_modules():
    for name in list(sys.modules):
        if name == "dall_e" or name.startswith("dall_e."):
            del sys.modules[name]


@pytest.fixture
def fake_dall_e(tmp_path):
    """Import a stand-in ``dall_e`` package; yields the module; fully removed afterwards."""
    pkg = tmp_path / "fakepkg" / "dall_e"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "utils.py").write_text(textwrap.dedent(FAKE_UTILS))
    (pkg / "encoder.py").write_text(textwrap.dedent(FAKE_ENCODER))
    (pkg / "decoder.py").write_text(textwrap.dedent(FAKE_DECODER))
    root = str(tmp_path / "fakepkg")
    _drop_fake_modules()
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("dall_e.encoder"), importlib.import_module("dall_e.decoder"), root
    finally:
        if root in sys.path:
            sys.path.remove(root)
        _drop_fake_modules()


def _unimport(root):
    sys.path.remove(root)
    _drop_fake_modules()
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dall_e")


def _images(b=2, side=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    return map_pixels(torch.rand(b, 3, side, side, generator=g))


def _randomise_biases(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)


def _expected_keys(group_count=4, n_blk=2):
    keys = ["blocks.input.w", "blocks.input.b"]
    for g in range(1, group_count + 1):
        for i in range(1, n_blk + 1):
            pre = f"blocks.group_{g}.block_{i}."
            if i == 1 and g > 1:  # the channel count changes in the first block of groups 2-4
                keys += [pre + "id_path.w", pre + "id_path.b"]
            keys += [pre + f"res_path.conv_{j}.{p}" for j in range(1, 5) for p in ("w", "b")]
    return set(keys + ["blocks.output.conv.w", "blocks.output.conv.b"])


# ---------------------------------------------------------------------------------------------------------
def test_map_unmap_pixels():
    x = torch.rand(2, 3, 8, 8)
    m = map_pixels(x)
    assert float(m.min()) >= 0.1 - 1e-7 and float(m.max()) <= 0.9 + 1e-7
    torch.testing.assert_close(m, 0.8 * x + 0.1)
    torch.testing.assert_close(unmap_pixels(m), x)
    assert float(unmap_pixels(torch.tensor([0.0, 1.0])).min()) == 0.0  # clamped
    from beit_fast.data import transforms  # the data pipeline uses the very same definition

    assert (transforms.map_pixels, transforms.unmap_pixels) == (map_pixels, unmap_pixels)


def test_released_layout_keys_and_shapes(fake_dall_e):
    enc_mod, _, _ = fake_dall_e
    ours = DalleEncoder()  # the released configuration
    ref = enc_mod.Encoder()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert set(sd_ours) == set(sd_ref) == _expected_keys()
    for k in sd_ref:
        assert sd_ours[k].shape == sd_ref[k].shape, k
        assert sd_ours[k].dtype == torch.float32
    assert sd_ours["blocks.input.w"].shape == (256, 3, 7, 7)
    assert sd_ours["blocks.group_4.block_2.res_path.conv_1.w"].shape == (512, 2048, 3, 3)
    assert sd_ours["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert ours.vocab_size == 8192 and ours.downsample == 8 and ours.input_size == 112
    assert isinstance(ours, VisualTokenizer)
    assert ours.blocks.group_1.block_1.post_gain == 1 / 64
    assert isinstance(ours.blocks.group_1.block_1.id_path, torch.nn.Identity)
    assert isinstance(ours.blocks.group_1.pool, torch.nn.MaxPool2d) and not hasattr(ours.blocks.group_4, "pool")
    # a state dict of the released layout loads strictly
    ours.load_state_dict(sd_ref, strict=True)


def test_same_logits_as_reference_architecture(fake_dall_e):
    enc_mod, _, _ = fake_dall_e
    ref = enc_mod.Encoder(**SMALL)
    _randomise_biases(ref)
    ours = DalleEncoder(**SMALL)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _images(2, side=64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert torch.equal(ours.get_codebook_indices(x), ref(x).argmax(1).flatten(1))


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_load_pickled_module_without_dall_e_package(fake_dall_e, tmp_path, zipfile_format):
    enc_mod, _, root = fake_dall_e
    ref = enc_mod.Encoder(**SMALL)
    _randomise_biases(ref)
    x = _images(3, side=64, seed=5)
    with torch.no_grad():
        ref_logits = ref(x)
    path = tmp_path / "encoder.pkl"
    torch.save(ref, path, _use_new_zipfile_serialization=zipfile_format)
    _unimport(root)  # the loader must not need the package

    model = load_dalle_encoder(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.vocab_size == 512 and model.n_hid == 8 and model.group_count == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_logits, rtol=0, atol=0)
    tokens = model.get_codebook_indices(x)
    assert torch.equal(tokens, ref_logits.argmax(1).flatten(1))
    assert "dall_e" not in sys.modules

    tok = build_tokenizer("dalle", str(path))
    assert torch.equal(tok.get_codebook_indices(x), tokens)


def test_pickled_decoder_is_rejected(fake_dall_e, tmp_path):
    _, dec_mod, root = fake_dall_e
    path = tmp_path / "decoder.pkl"
    torch.save(dec_mod.Decoder(), path)
    _unimport(root)
    with pytest.raises(ValueError, match="dall_e.decoder.Decoder"):
        load_dalle_encoder(path)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_globals_are_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        dalle_state_dict_from_file(path)


def test_plain_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = DalleEncoder(**SMALL)
    _randomise_biases(a)
    x = _images(2, side=64, seed=3)
    tokens = a.get_codebook_indices(x)

    p = tmp_path / "encoder_sd.pth"
    torch.save(a.state_dict(), p)
    b = build_tokenizer("dalle", p)
    assert isinstance(b, DalleEncoder)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert torch.equal(b.get_codebook_indices(x), tokens)

    # wrapped / prefixed / half-precision variants of the same layout
    p2 = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"encoder.{k}": v.half() for k, v in a.state_dict().items()}}, p2)
    c = load_dalle_encoder(p2)
    assert all(v.dtype == torch.float32 for v in c.state_dict().values())
    torch.testing.assert_close(c.state_dict()["blocks.input.w"], a.state_dict()["blocks.input.w"].half().float())

    # strict round trip into a fresh module
    fresh = DalleEncoder(**SMALL)
    fresh.load_state_dict(torch.load(p, weights_only=True), strict=True)
    assert torch.equal(fresh.get_codebook_indices(x), tokens)


def test_token_shape_range_dtype():
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=8, vocab_size=8192)
    t = enc.get_codebook_indices(_images(2, 112))
    assert t.shape == (2, 196) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 8192
    assert enc.get_codebook_indices(_images(1, 224)).shape == (1, 784)
    assert enc.get_codebook_indices(_images(1, 64)[:, :, :, :48]).shape == (1, 8 * 6)  # non-square, row-major
    with pytest.raises(ValueError, match="multiple"):
        enc.get_codebook_indices(_images(1, 100))
    with pytest.raises(ValueError, match="shape"):
        enc.get_codebook_indices(torch.rand(1, 1, 112, 112))


def test_row_major_flattening():
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=8, vocab_size=512)
    x = _images(1, 112)
    logits = enc(x)  # [1, V, 14, 14]
    tok = enc.get_codebook_indices(x)
    assert int(tok[0, 3 * 14 + 5]) == int(logits[0, :, 3, 5].argmax())


def test_fp32_regardless_of_autocast_and_input_dtype():
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=8, vocab_size=512)
    x = _images(2).to(torch.bfloat16)
    ref = enc.get_codebook_indices(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc.get_codebook_indices(x)
    assert torch.equal(got, ref)
    enc.train()
    enc.get_codebook_indices(x)
    assert enc.training  # the caller's mode is restored


def test_errors(tmp_path):
    missing = tmp_path / "nope" / "encoder.pkl"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer("dalle", missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dalle_encoder(str(missing))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("vqgan", None)
    with pytest.raises(ValueError, match="needs a weights path"):
        build_tokenizer("dalle")
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="blocks.input.w"):
        build_tokenizer("dalle", bad)
    sd = DalleEncoder(n_hid=8, vocab_size=512).state_dict()
    del sd["blocks.group_2.block_1.id_path.w"]
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="id_path"):
        build_tokenizer("dalle", bad)


def test_random_init_tokenizer():
    tok = build_tokenizer("dalle", random_init=True, n_hid=8, vocab_size=1024)
    assert isinstance(tok, DalleEncoder) and tok.vocab_size == 1024
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


class _OpensMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))



class _Latin1Bytes:
    """Unpickles to ``bytearray(payload)`` through ``bytearray(str, "latin-1")``: no ``_codecs`` global."""

    def __init__(self, payload):
        self.text = bytes(payload).decode("latin-1")

    def __reduce__(self):
        return (bytearray, (self.text, "latin-1"))


class _ViaLoadFromBytes:
    """``torch.storage._load_from_bytes(b)`` is ``torch.load(BytesIO(b), weights_only=False)``: allowing it
    hands the rest of the file to Python's normal unpickler."""

    def __init__(self, marker):
        import io

        buf = io.BytesIO()
        torch.save(_OpensMarker(marker), buf)
        self.payload = buf.getvalue()

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (_Latin1Bytes(self.payload),))


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_load_from_bytes_bypass_is_refused(tmp_path, zipfile_format):
    marker = tmp_path / "MARKER"
    path = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": _ViaLoadFromBytes(marker)}, path, _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        dalle_state_dict_from_file(path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        build_tokenizer("dalle", str(path))
    assert not marker.exists()
