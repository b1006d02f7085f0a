"""uint8 views to the device, normalised there (beit_fast.train.device_feed): the step's inputs equal the
float views of the PIL pipeline bit for bit, a quarter of the bytes travel, batches arrive in order."""
import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast.data.pretraining import PretrainDataset, build_pretrain_loader
from beit_fast.data.masking import MaskingGenerator
from beit_fast.train.device_feed import DeviceFeed
from beit_fast.data.transforms import TwoViewConfig, TwoViewTransform


class Photos(torch.utils.data.Dataset):
    """Small random RGB images of varied sizes (noise: every rounding difference shows)."""

    def __init__(self, n=6):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 52 - 3 * i, 3), dtype=np.uint8))
                       for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _dataset(uint8, **cfg):
    transform = TwoViewTransform(TwoViewConfig(input_size=32, second_input_size=16, uint8_views=uint8, **cfg))
    return PretrainDataset(Photos(), transform, MaskingGenerator((4, 4), 6, min_num_patches=2), seed=3)


@pytest.mark.parametrize("cfg", [{}, {"imagenet_default_mean_and_std": True, "tokenizer_view": "customized"},
                                 {"interpolation": "bilinear", "color_jitter": 0.0}])
def test_uint8_views_normalised_equal_the_float_views_bit_for_bit(cfg):
    floats, pixels = _dataset(False, **cfg), _dataset(True, **cfg)
    for i in range(len(floats)):
        ref, raw = floats.get(i, epoch=1), pixels.get(i, epoch=1)
        assert raw[0].dtype == raw[1].dtype == torch.uint8 and raw[0].is_contiguous()
        patch, tok = pixels.transform.normalize(raw[0], raw[1])
        assert patch.dtype == tok.dtype == torch.float32
        assert torch.equal(patch, ref[0]) and torch.equal(tok, ref[1]), i
        assert torch.equal(raw[2], ref[2])


def test_device_feed_gives_the_float_batches_with_a_quarter_of_the_bytes():
    floats, pixels = _dataset(False), _dataset(True)
    ref = list(build_pretrain_loader(floats, 2))
    loader = build_pretrain_loader(pixels, 2)
    feed = DeviceFeed("cpu", pixels.transform.normalize)
    loader.device_feed = feed
    got = list(loader)
    assert len(got) == len(ref) == 3 and feed.batches == 3
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)
    float_bytes = sum(t.nbytes for batch in ref for t in batch)
    mask_bytes = sum(batch[2].nbytes for batch in ref)
    assert feed.bytes_copied - mask_bytes == (float_bytes - mask_bytes) // 4


def test_device_feed_is_one_batch_ahead():
    """Batch t+1 is sent before batch t is handed to the step (its copy overlaps step t on a GPU)."""
    events = []

    def normalize(patch, tok):
        events.append(("sent", int(patch[0, 0, 0, 0])))
        return patch.float(), tok.float()

    def host_batches():
        from beit_fast.data.pretraining import PretrainBatch

        for k in range(3):
            yield PretrainBatch(torch.full((1, 3, 2, 2), k, dtype=torch.uint8), torch.zeros(1, 3, 1, 1, dtype=torch.uint8),
                                torch.zeros(1, 4, dtype=torch.bool))

    for batch in DeviceFeed("cpu", normalize)(host_batches()):
        events.append(("step", int(batch[0][0, 0, 0, 0])))
    assert events == [("sent", 0), ("sent", 1), ("step", 0), ("sent", 2), ("step", 1), ("step", 2)]
