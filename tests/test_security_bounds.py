"""Sizes a file claims are checked before anything is allocated, and hostile values give clear errors.

Each test is one attack of the hostile-environment review (issue 22): a few bytes that describe gigabytes
(numpy callables in a checkpoint, stride-0 DALL-E tensors, configs of huge models), and values that used to
end in tracebacks (a seed past 64 bits, more labels than the data has, deeply nested JSON, a DALL-E file
with a reference cycle or a negative size). The claims here are kept small enough that the old code
survived them; the checks refuse them by what they claim, not by how much memory is free.
"""
import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from beit_fast.utils import checkpoint as ck
from beit_fast.utils.checkpoint import load_checkpoint
from test_pretrain import make_toy_images, make_toy_tokenizer
from test_security import clean_exit, pretrain_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    make_toy_images(root / "images", n=8, size=40)
    make_toy_tokenizer(root / "tok.pt")
    return root


# ---------------------------------------------------------------------------------------------------------
# 1. The safe loader's allow-list holds no callable that allocates a size the file chooses
# ---------------------------------------------------------------------------------------------------------
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_numpy_ndarray_call_is_refused_before_allocating(tmp_path):
    """``numpy.ndarray((n,), dtype('O'))`` in a checkpoint: loaded (n pointers allocated) before; refused now."""
    torch.save({"step": 1, "x": _Reduce(np.ndarray, ((2**16,), np.dtype("O")))}, tmp_path / "a.pt")
    torch.save({"x": _Reduce(np.ndarray, ((2**16,), np.dtype("u4")))}, tmp_path / "b.pt")
    torch.save({"x": np.zeros(2**16, dtype=np.float64)}, tmp_path / "c.pt")
    for name in ("a.pt", "b.pt", "c.pt"):
        with pytest.raises(ck.UnsafeCheckpointError, match="numpy"):
            load_checkpoint(tmp_path / name)


def test_previous_format_rng_key_cannot_claim_more_words(tmp_path):
    """The previous format's RNG key is read, but a key that claims more words than it carries is not."""
    key = np.random.get_state()[1]
    good, bad = io.BytesIO(), io.BytesIO()
    torch.save({"key": key}, good)
    raw = good.getvalue()
    assert np.array_equal(torch.load(io.BytesIO(raw), weights_only=False)["key"], key)
    # the same array, its shape claiming 2**20 words (its bytes still 624 words)
    (tmp_path / "good.pt").write_bytes(raw)
    assert np.array_equal(load_checkpoint(tmp_path / "good.pt")["key"], key)

    class Big:
        def __reduce__(self):
            return np.ndarray, ((2**20,), np.dtype("u4"))
    torch.save({"key": Big()}, bad)
    (tmp_path / "bad.pt").write_bytes(bad.getvalue())
    with pytest.raises(ck.UnsafeCheckpointError):
        load_checkpoint(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------------------
# DALL-E files: no stride-0 / overlapping tensors, no more bytes than the file, no cycles, no negative sizes
# ---------------------------------------------------------------------------------------------------------
def _small_dalle_state():
    from beit_fast.tokenizer.dalle import DalleEncoder

    torch.manual_seed(0)
    return DalleEncoder(group_count=1, n_hid=8, n_blk_per_group=1, vocab_size=16).state_dict()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dalle_stride0_tensors_are_refused(tmp_path, legacy):
    """2.8 KB of stride-0 tensors described a 5.9 GB encoder, which was built; now refused by layout."""
    from beit_fast.tokenizer import dalle_state_dict_from_file
    from beit_fast.tokenizer.dalle import load_dalle_encoder

    sd = {k: torch.zeros(1).expand(v.shape) if v.dim() else v for k, v in _small_dalle_state().items()}
    path = tmp_path / "encoder.pkl"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match="stride 0"):
        dalle_state_dict_from_file(path)
    with pytest.raises(ValueError, match="stride 0"):
        load_dalle_encoder(path)


def test_dalle_tensors_sharing_storage_cannot_claim_more_than_the_file(tmp_path):
    from beit_fast.tokenizer import dalle_state_dict_from_file

    big = torch.zeros(4096)
    sd = {**_small_dalle_state(), **{f"extra.{i}": big for i in range(64)}}
    torch.save(sd, tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match="claim .* bytes but the file holds"):
        dalle_state_dict_from_file(tmp_path / "encoder.pt")


def test_dalle_state_dict_describing_a_huge_encoder_is_refused_before_building(tmp_path):
    """A vocabulary beyond the limit, or an encoder much larger than the weights given: refused, not built."""
    from beit_fast.tokenizer.dalle import DalleEncoder

    sd = _small_dalle_state()
    with pytest.raises(ValueError, match="vocab_size 2097152 is beyond the limit"):
        DalleEncoder.from_state_dict({**sd, "blocks.output.conv.w": torch.zeros(1).expand(2**21, 8, 1, 1)})
    sd = {**sd, "blocks.input.w": torch.zeros(1).expand(4096, 3, 7, 7)}  # n_hid 4096: ~60M parameters
    with pytest.raises(ValueError, match="parameters but the file holds"):
        DalleEncoder.from_state_dict(sd)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dalle_file_with_a_reference_cycle_gives_a_clear_error(tmp_path, legacy):
    from beit_fast.tokenizer import dalle_state_dict_from_file

    seq = nn.Sequential(nn.ReLU())
    seq._modules["loop"] = seq
    torch.save(seq, tmp_path / "cycle.pkl", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match="reference cycle"):
        dalle_state_dict_from_file(tmp_path / "cycle.pkl")


def test_dalle_file_with_a_negative_size_gives_a_clear_error(tmp_path):
    from beit_fast.tokenizer import dalle_state_dict_from_file

    storage = torch.storage.TypedStorage(8, dtype=torch.float32, _internal=True)
    neg = _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, (-4, 2), (2, 1), False, OrderedDict()))
    torch.save({"blocks.input.w": neg}, tmp_path / "neg.pkl", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="malformed shape"):
        dalle_state_dict_from_file(tmp_path / "neg.pkl")


# ---------------------------------------------------------------------------------------------------------
# Model configs read from files: limits and a parameter budget, errors naming the file and the field
# ---------------------------------------------------------------------------------------------------------
def test_dvae_config_claiming_a_huge_vocabulary_is_refused(toy, tmp_path):
    from beit_fast.tokenizer.dvae import DiscreteVAE

    ckpt = torch.load(toy / "tok.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "vocab_size": 2**26}}, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match=r"huge.pt: config: vocab_size 67108864 is beyond the limit"):
        DiscreteVAE.from_checkpoint(tmp_path / "huge.pt")
    # within the limit, but a model far larger than the weights in the file (2**19 x 64 codebook)
    torch.save({**ckpt, "config": {**ckpt["config"], "vocab_size": 2**19}}, tmp_path / "large.pt")
    with pytest.raises(ValueError, match=r"large.pt: its config describes a model of .* parameters"):
        DiscreteVAE.from_checkpoint(tmp_path / "large.pt")
    message = clean_exit(__import__("beit_fast.pretrain").pretrain.main,
                         pretrain_args(toy, tmp_path / "out", tok=tmp_path / "huge.pt"))
    assert "vocab_size 67108864" in message


def _checkpoint_with_config(path, **config):
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_config": {**model.cfg.to_dict(), **config}, "optimizer": {},
                "step": 1, "epoch": 1, "args": {"input_size": 16, "patch_size": 8}}, path)
    return path


@pytest.mark.parametrize("config,field", [({"embed_dim": 2**16, "num_heads": 4}, "embed_dim 65536"),
                                          ({"depth": 100000}, "depth 100000"),
                                          ({"embed_dim": 512, "depth": 12, "num_heads": 8}, "parameters")])
def test_finetune_refuses_a_model_config_beyond_limits(tmp_path, config, field):
    from beit_fast import finetune

    path = _checkpoint_with_config(tmp_path / "ckpt.pt", **config)
    common = ["--input_size", "16", "--labels_per_class", "2", "--no_progress", "--epochs", "1", "--batch_size", "10",
              "--output_dir", str(tmp_path / "ft")]
    message = clean_exit(finetune.main, ["--finetune", str(path), *common])
    assert field in message and str(path) in message, message


def test_visualize_refuses_a_model_config_beyond_limits(tmp_path):
    from beit_fast import visualize

    run = tmp_path / "run"
    run.mkdir()
    _checkpoint_with_config(run / "checkpoint-last.pt", embed_dim=2**16, num_heads=4)
    message = clean_exit(visualize.main, [str(run), "--only", "mask", "--out_dir", str(tmp_path / "pics")])
    assert "model_config: embed_dim 65536 is beyond the limit" in message and "checkpoint-last.pt" in message


# ---------------------------------------------------------------------------------------------------------
# Values that ended in tracebacks
# ---------------------------------------------------------------------------------------------------------
def test_seed_beyond_64_bits_is_a_flag_error(toy, tmp_path):
    from beit_fast import finetune, linear_probe, train_tokenizer

    seed = str(2**64 + 1)
    assert "--seed must be at most" in clean_exit(__import__("beit_fast.pretrain").pretrain.main,
                                                   pretrain_args(toy, tmp_path / "o", "--seed", seed))
    assert "--seed must be at most" in clean_exit(finetune.main, ["--seed", seed, "--output_dir", str(tmp_path / "f")])
    assert "--seed must be at most" in clean_exit(linear_probe.main, ["--seed", seed])
    assert "--seed must be at most" in clean_exit(train_tokenizer.main, ["--seed", seed, "--output",
                                                                         str(tmp_path / "t.pt")])


def test_more_labels_per_class_than_the_digits_have_is_a_clear_error(tmp_path):
    from beit_fast import finetune

    message = clean_exit(finetune.main, ["--labels_per_class", "100000", "--input_size", "16", "--epochs", "1",
                                         "--no_progress", "--output_dir", str(tmp_path / "f")])
    assert "--labels_per_class 100000" in message and "fewer than" in message


def test_deeply_nested_json_line_in_a_log_is_skipped(tmp_path):
    from beit_fast.visualization.curves import read_log

    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + "[" * 200000 + "]" * 200000 + "\n"
                   + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    assert [r["step"] for r in read_log(log)] == [1, 2]
    from beit_fast.train.checkpoint_folder import trim_jsonl

    trim_jsonl(log, "step", 5)
    assert [r["step"] for r in read_log(log)] == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# The GPU pipeline (here on the CPU) bounds each chunk's padded buffer by its own images' pixels
# ---------------------------------------------------------------------------------------------------------
def test_device_pipeline_never_pads_a_tall_image_to_a_wide_one(tmp_path, monkeypatch):
    """A 1500x1 and a 1x1500 PNG in one batch: the padded buffers were 1500x1500 per image (43 GB at 60000);
    now they are chunked apart, and the views (jittered and resized in bands here) equal the PIL pipeline's
    bit for bit."""
    from PIL import Image

    from beit_fast.data.image_folder import ImageFolderDataset
    from beit_fast.data.masking import MaskingGenerator
    from beit_fast.data.pipeline import build_device_pretrain_loader
    from beit_fast.data.pretraining import PretrainDataset, ResumableSampler, build_pretrain_loader
    from beit_fast.data.transforms import TwoViewConfig, TwoViewTransform

    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"tall": (1500, 1), "wide": (1, 1500), "a": (40, 30), "b": (30, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    cfg = TwoViewConfig(input_size=32, second_input_size=16)
    ds = PretrainDataset(ImageFolderDataset(folder), TwoViewTransform(cfg), MaskingGenerator(4, 4), seed=1)
    pil = list(build_pretrain_loader(ds, 4, 0, ResumableSampler(len(ds), seed=ds.seed)))
    biggest = []
    zeros = torch.zeros

    def recording_zeros(*shape, **kw):
        out = zeros(*shape, **kw)
        if out.dim() == 4:
            biggest.append(out.numel())
        return out
    monkeypatch.setattr(torch, "zeros", recording_zeros)
    from beit_fast.data.pipeline import ops, render

    monkeypatch.setattr(ops, "BAND_ELEMENTS", 300)  # jitter and first resize pass in bands of a few rows
    monkeypatch.setattr(render, "BAND_ELEMENTS", 300)
    dev = list(build_device_pretrain_loader(ds, 4, "cpu", sampler=ResumableSampler(len(ds), seed=ds.seed)))
    monkeypatch.undo()
    assert biggest and max(biggest) <= 4 * 3 * (1500 + 2 * 1200), max(biggest)
    for (p_patch, p_tok, p_mask), (d_patch, d_tok, d_mask) in zip(pil, dev):
        assert torch.equal(p_patch, d_patch) and torch.equal(p_tok, d_tok) and torch.equal(p_mask, d_mask)


def test_bounded_chunks_respect_the_padding_bound():
    from beit_fast.data.pipeline.render import CHUNK_PIXELS, PAD_FACTOR, bounded_chunks

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 3000, (200, 2), generator=g)
    sizes[::7, 0] = 1  # very wide and very tall ones among them
    sizes[::11, 1] = 1
    crops = (sizes * torch.rand(200, 2, generator=g)).clamp(min=1).long()
    chunks = bounded_chunks(sizes, crops, 64)
    assert sorted(r for c in chunks for r in c) == list(range(200))
    for rows in chunks:
        assert len(rows) <= 64
        for t in (sizes[rows], crops[rows]):
            pixels = int((t[:, 0] * t[:, 1]).sum())
            padded = len(rows) * int(t[:, 0].max()) * int(t[:, 1].max())
            assert len(rows) == 1 or (padded <= PAD_FACTOR * pixels and pixels <= CHUNK_PIXELS)


@pytest.mark.parametrize("vertical_first", [False, True])
def test_resize_in_bands_equals_the_whole_image(monkeypatch, vertical_first):
    """The first resampling pass converts a band of the image at a time (bounded float copies of a large
    image): the same uint8 result as converting it whole."""
    from beit_fast.data.pipeline import ops

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 61, 47), dtype=torch.uint8, generator=g)
    length = torch.tensor([61, 40]), torch.tensor([47, 30])
    zero, no = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
    wy = ops.resample_weights(length[0], zero, no, 16, 61, "bicubic")
    wx = ops.resample_weights(length[1], zero, no, 12, 47, "lanczos")
    first = torch.full((2,), vertical_first)
    whole = ops.resize_crops(images, wy, wx, first)
    monkeypatch.setattr(ops, "BAND_ELEMENTS", 500)  # bands of a few rows / columns
    assert torch.equal(ops.resize_crops(images, wy, wx, first), whole)


def test_finetune_refuses_stride0_weights_whose_shapes_would_size_the_model(tmp_path):
    """Without a model_config the architecture is read off the weights' shapes: a stride-0 tensor claiming
    a huge one is refused before the classifier is built."""
    from beit_fast import finetune

    sd = dict(tiny_model().state_dict())
    sd["pos_embed"] = torch.zeros(1).expand(1, 4097, 128)  # a 64x64 grid claimed on 4 bytes
    torch.save({"model": sd}, tmp_path / "official.pth")
    common = ["--input_size", "16", "--labels_per_class", "2", "--no_progress", "--epochs", "1", "--batch_size", "10",
              "--output_dir", str(tmp_path / "ft")]
    message = clean_exit(finetune.main, ["--finetune", str(tmp_path / "official.pth"), *common])
    assert "pos_embed" in message and "stride 0" in message, message
