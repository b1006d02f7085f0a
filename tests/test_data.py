"""Tests of beit_fast.data (image folder, pretraining dataset, sampler, loader) and beit_fast.data.samples."""
import io
import os
import pickle
import random
import re
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, DistributedSampler

from beit_fast.data import samples as sample_data
from beit_fast.data.image_folder import ImageFolderDataset, SkippedImageWarning
from beit_fast.data.pretraining import (
    PretrainBatch, PretrainDataset, PretrainSample, ResumableSampler, build_pretrain_loader, collate_pretrain,
    sample_seed,
)
from beit_fast.data.transforms import TwoViewConfig, TwoViewTransform


# --------------------------------------------------------------------------------------------------------
# helpers (module level: picklable for DataLoader workers)
# --------------------------------------------------------------------------------------------------------
class StandInMask:
    """Stand-in for beit_fast.data.masking.MaskingGenerator: gen(rng) -> bool [h, w] with k True."""

    def __init__(self, h=14, w=14, k=75):
        self.h, self.w, self.k = h, w, k

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        m = np.zeros(self.h * self.w, dtype=bool)
        m[rng.choice(self.h * self.w, self.k, replace=False)] = True
        return m.reshape(self.h, self.w)


class NoArgMask:
    """Official-style generator: no argument, draws from numpy's global RNG."""

    def __call__(self):
        return np.random.rand(14, 14) < 0.4


class NoiseImages(Dataset):
    def __init__(self, n=12):
        rng = np.random.default_rng(0)
        self.images = [
            Image.fromarray(rng.integers(0, 256, size=(int(rng.integers(60, 160)), 96, 3), dtype=np.uint8))
            for _ in range(n)
        ]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def small_transform():
    # real BEiT transform, smaller outputs to keep the tests fast
    return TwoViewTransform(TwoViewConfig(input_size=32, second_input_size=16))


def make_dataset(n=12, seed=7, mask=None, images=None):
    return PretrainDataset(images if images is not None else NoiseImages(n), small_transform(),
                           mask if mask is not None else StandInMask(), seed=seed)


def assert_samples_equal(a, b):
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def save_png(path, color=(10, 20, 30), size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def save_jpeg_bytes(size=(64, 48)):
    arr = np.random.default_rng(3).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_bad_folder(root):
    """a.png good, b.jpg random bytes, c.png zero bytes, d.jpg truncated JPEG, e.png good."""
    save_png(os.path.join(root, "a.png"), (255, 0, 0))
    with open(os.path.join(root, "b.jpg"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    open(os.path.join(root, "c.png"), "wb").close()
    data = save_jpeg_bytes()
    with open(os.path.join(root, "d.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    save_png(os.path.join(root, "e.png"), (0, 0, 255))


# --------------------------------------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------------------------------------
def test_image_folder_flat_recursive_sorted(tmp_path):
    save_png(tmp_path / "b.png")
    save_png(tmp_path / "a.JPG".lower())  # written as PNG data: the extension only selects files
    os.rename(tmp_path / "a.jpg", tmp_path / "a.JPG")
    save_png(tmp_path / "sub" / "deeper" / "c.webp")
    save_png(tmp_path / "sub" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    save_png(tmp_path / ".hidden.png")
    save_png(tmp_path / ".cache" / "e.png")
    ds = ImageFolderDataset(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in ds.files] == [
        "a.JPG", "b.png", os.path.join("sub", "d.png"), os.path.join("sub", "deeper", "c.webp")]
    assert ds.targets is None and ds.classes == []
    img = ds[1]
    assert img.mode == "RGB" and img.size == (40, 30)
    only_png = ImageFolderDataset(tmp_path, extensions=("png",))
    assert len(only_png) == 2


def test_image_folder_class_layout_keeps_targets(tmp_path):
    for cls, names in {"dog": ["x.png", "y.png"], "cat": ["z.png"], "bird": ["deep/w.png"]}.items():
        for n in names:
            save_png(tmp_path / cls / n)
    os.makedirs(tmp_path / "empty_class")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["bird", "cat", "dog"]
    assert [os.path.relpath(p, tmp_path) for p in ds.files] == [
        os.path.join("bird", "deep", "w.png"), os.path.join("cat", "z.png"),
        os.path.join("dog", "x.png"), os.path.join("dog", "y.png")]
    assert ds.targets == [0, 1, 2, 2]


def test_missing_and_empty_folders_give_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty"
    os.makedirs(empty / "sub")
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(empty)
    assert str(empty) in str(e.value) and ".jpg" in str(e.value) and ".png" in str(e.value)


def test_bad_images_are_skipped_warned_once_and_counted(tmp_path):
    make_bad_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 5 and ds.num_skipped == 0
    with pytest.warns(SkippedImageWarning) as rec:
        img1 = ds[1]  # b.jpg (random bytes) -> c.png (empty) -> d.jpg (truncated) -> e.png
    assert img1.getpixel((0, 0)) == (0, 0, 255)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 3
    for name in ("b.jpg", "c.png", "d.jpg"):
        assert sum(name in m for m in msgs) == 1
    assert any("truncated" in m for m in msgs)
    assert ds.num_skipped == 3
    assert sorted(os.path.basename(p) for p in ds.skipped_files) == ["b.jpg", "c.png", "d.jpg"]
    # once per file: hitting them again does not warn again, and the count stays
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImageWarning)
        img, skipped = ds.get_with_skips(2)
        assert img.getpixel((0, 0)) == (0, 0, 255)
        assert [os.path.basename(p) for p, _ in skipped] == ["c.png", "d.jpg"]
        assert ds[3].getpixel((0, 0)) == (0, 0, 255)
        assert ds[0].getpixel((0, 0)) == (255, 0, 0)
    assert ds.num_skipped == 3
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never enabled globally


def test_fallback_wraps_around_and_is_capped(tmp_path):
    save_png(tmp_path / "a.png", (1, 2, 3))
    for name in ("b.png", "c.png", "d.png"):
        open(tmp_path / name, "wb").close()
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(SkippedImageWarning):
        assert ds[3].getpixel((0, 0)) == (1, 2, 3)  # d -> (wrap) a
    capped = ImageFolderDataset(tmp_path, max_consecutive_bad=2)
    with pytest.warns(SkippedImageWarning), pytest.raises(RuntimeError, match="2 consecutive images"):
        capped[1]


def test_folder_of_only_bad_files_raises(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"garbage" * 10)
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(SkippedImageWarning), pytest.raises(RuntimeError, match=re.escape(str(tmp_path))):
        ds[0]


def _in_child(fn, *args, timeout=60):
    """``fn(*args)`` in a forked process, its result sent back through a queue; a hang (e.g. in ``open`` of a
    FIFO) fails the test after ``timeout`` seconds instead of blocking the suite."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def target():
        try:
            q.put(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            q.put(("error", f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=target, daemon=True)
    p.start()
    try:
        status, value = q.get(timeout=timeout)
    except queue.Empty:
        p.kill()
        p.join()
        pytest.fail(f"{fn.__name__} did not finish within {timeout} s (hung)")
    p.join(10)
    assert status == "ok", value
    return value


def _scan(root, **kwargs):
    ds = ImageFolderDataset(root, **kwargs)
    return [ds.relpath(i) for i in range(len(ds))]


def test_symlink_loops_and_linked_folders_are_visited_once(tmp_path):
    root = tmp_path / "images"
    for i in range(8):
        save_png(str(root / "sub" / f"{i}.png"))
    os.symlink(".", root / "loop")  # root/loop -> root
    os.symlink("..", root / "sub" / "up")  # root/sub/up -> root
    os.symlink(root / "sub", root / "again")  # a second name for root/sub
    assert _in_child(_scan, root) == [f"sub/{i}.png" for i in range(8)]
    # Two loop links under each other: the scan ends (it used to hang), each real folder read once.
    os.symlink("../..", root / "sub" / "upup")
    outside = tmp_path / "outside"
    save_png(str(outside / "x.png"))
    os.symlink(outside, root / "linked")  # a linked folder outside root is read (once)
    assert _in_child(_scan, root) == ["linked/x.png"] + [f"sub/{i}.png" for i in range(8)]


def _fifo_dataset(root):
    ds = ImageFolderDataset(root)
    names = [ds.relpath(i) for i in range(len(ds))]
    # a FIFO that appears after the scan (renamed over an image) is skipped when read, not waited on
    os.unlink(os.path.join(root, "b.png"))
    os.mkfifo(os.path.join(root, "b.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, skipped = ds.get_with_skips(names.index("b.png"))
    return names, img.size, [(os.path.basename(p), r) for p, r in skipped]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_never_blocks(tmp_path):
    save_png(str(tmp_path / "a.png"))
    save_png(str(tmp_path / "b.png"))
    save_png(str(tmp_path / "c.png"), size=(20, 10))
    os.mkfifo(tmp_path / "x.png")  # only regular files are images
    names, size, skipped = _in_child(_fifo_dataset, str(tmp_path))
    assert names == ["a.png", "b.png", "c.png"]
    assert size == (20, 10) and [name for name, _ in skipped] == ["b.png"] and "regular file" in skipped[0][1]


def _huge_png(path, side):
    """A valid, fully decodable 1-bit PNG of side x side pixels (tiny on disk: all zeros compress well)."""
    Image.new("1", (side, side)).save(path, optimize=False)


def test_pixel_bomb_is_refused_and_counted(tmp_path):
    save_png(str(tmp_path / "a.png"))
    _huge_png(tmp_path / "bomb.png", 9000)  # 81 Mpx: under Pillow's own 89 Mpx warning limit
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(SkippedImageWarning, match=r"bomb\.png.*81000000 pixels.*max_image_pixels"):
        img, skipped = ds.get_with_skips(1)
    assert img.size == (40, 30) and ds.num_skipped == 1
    # the limit is a parameter (the CLI flag --max_image_pixels): a small limit skips the small image as well
    tight = ImageFolderDataset(tmp_path, max_image_pixels=1000)
    with pytest.warns(SkippedImageWarning), pytest.raises(RuntimeError, match="could not be read"):
        tight[0]
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImageFolderDataset(tmp_path, max_image_pixels=0)


# --------------------------------------------------------------------------------------------------------
# PretrainDataset determinism
# --------------------------------------------------------------------------------------------------------
def test_sample_shapes_and_mask():
    ds = make_dataset()
    s = ds[3]
    assert isinstance(s, PretrainSample) and s.skipped == ()
    patch, tok, mask = s
    assert patch.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
    assert mask.shape == (196,) and mask.dtype == torch.bool and int(mask.sum()) == 75
    expected = StandInMask()(np.random.default_rng([7, 0, 3])).reshape(-1)
    assert np.array_equal(mask.numpy(), expected)


def test_same_seed_epoch_index_gives_identical_samples():
    ds = make_dataset()
    ds.set_epoch(2)
    first = [ds[i] for i in range(len(ds))]
    torch.manual_seed(123)  # global state must not matter
    np.random.seed(4)
    random.seed(9)
    again = [ds[i] for i in reversed(range(len(ds)))][::-1]  # other order
    for a, b in zip(first, again):
        assert_samples_equal(a, b)
    fresh = make_dataset()  # a new object with the same seed
    fresh.set_epoch(2)
    for i in range(len(ds)):
        assert_samples_equal(first[i], fresh[i])
        assert_samples_equal(first[i], fresh.get(i, epoch=2))
    # different epoch / seed -> different views and masks
    ds.set_epoch(3)
    other_epoch = [ds[i] for i in range(len(ds))]
    other_seed = make_dataset(seed=8)
    other_seed.set_epoch(2)
    for i in range(len(ds)):
        assert not torch.equal(first[i][0], other_epoch[i][0])
        assert not torch.equal(first[i][2], other_epoch[i][2])
        assert not torch.equal(first[i][0], other_seed[i][0])
    # different index on the same image -> different crops
    single = make_dataset(images=RepeatImage())
    assert not torch.equal(single[0][0], single[1][0])


class RepeatImage(Dataset):
    def __init__(self):
        self.img = NoiseImages(1)[0]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.img


def test_global_rng_states_are_untouched():
    ds = make_dataset()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    ds[0]
    make_dataset(mask=NoArgMask())[0]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_zero_argument_mask_generator_is_made_deterministic():
    a = make_dataset(mask=NoArgMask())
    b = make_dataset(mask=NoArgMask())
    np.random.seed(1)
    m1 = a[5][2]
    np.random.seed(2)
    assert torch.equal(m1, b[5][2])
    a.set_epoch(1)
    assert not torch.equal(m1, a[5][2])


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, 0, 0) == sample_seed(0, 0, 0)
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= x < 2**64 for x in seeds)


# --------------------------------------------------------------------------------------------------------
# Loader with and without workers
# --------------------------------------------------------------------------------------------------------
def collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_loader_identical_with_0_and_2_workers_and_persistent_epochs():
    n, bs = 12, 4
    results = {}
    for workers, persistent in ((0, False), (2, False), (2, True)):
        ds = make_dataset(n)
        sampler = ResumableSampler(n, seed=1)
        loader = build_pretrain_loader(ds, bs, workers, sampler, pin_memory=False,
                                       persistent_workers=persistent)
        epochs = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)  # must reach (persistent) workers too
            sampler.set_epoch(epoch)
            batches = collect(loader)
            assert len(batches) == n // bs and all(isinstance(b, tuple) for b in batches)
            epochs.append(batches)
        results[(workers, persistent)] = epochs
    ref = results[(0, False)]
    assert not torch.equal(ref[0][0][0], ref[1][0][0])
    for key, epochs in results.items():
        for e in range(2):
            for b_ref, b in zip(ref[e], epochs[e]):
                for x, y in zip(b_ref, b):
                    assert torch.equal(x, y), key
    # and a batch equals the individually computed samples in sampler order
    ds = make_dataset(n)
    ds.set_epoch(1)
    sampler = ResumableSampler(n, seed=1)
    sampler.set_epoch(1)
    order = list(sampler)[:bs]
    assert torch.equal(ref[1][0][0], torch.stack([ds[i][0] for i in order]))
    assert torch.equal(ref[1][0][2], torch.stack([ds[i][2] for i in order]))


def test_resumed_loader_skips_consumed_batches():
    n, bs = 12, 4
    ds = make_dataset(n)
    sampler = ResumableSampler(n, seed=3)
    full = collect(build_pretrain_loader(ds, bs, 0, sampler))
    sampler.set_start(bs)  # one step done
    loader = build_pretrain_loader(ds, bs, 0, sampler)
    assert len(loader) == 2
    resumed = collect(loader)
    assert len(resumed) == 2
    for a, b in zip(full[1:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_skipped_images_reach_the_main_process_with_workers(tmp_path):
    make_bad_folder(tmp_path)
    images = ImageFolderDataset(tmp_path)
    ds = PretrainDataset(images, small_transform(), StandInMask(), seed=0)
    sampler = ResumableSampler(len(ds), seed=0, shuffle=False)
    loader = build_pretrain_loader(ds, 5, num_workers=2, sampler=sampler, drop_last=False)
    with pytest.warns(SkippedImageWarning) as rec:
        batches = list(loader)
    assert len(batches) == 1 and isinstance(batches[0], PretrainBatch)
    # index 1 skips b, c, d; 2 skips c, d; 3 skips d: 6 events, 3 distinct files
    assert batches[0].num_skipped == 6
    assert loader.skipped.num_skipped == 3 and loader.skipped.events == 6
    assert sorted(os.path.basename(p) for p in loader.skipped.files) == ["b.jpg", "c.png", "d.jpg"]
    assert len([w for w in rec if issubclass(w.category, SkippedImageWarning)]) == 3
    assert images.num_skipped == 0  # the main-process copy never loaded anything: counts come via batches
    # samples from bad indices use the fallback image with their own randomness
    patches = batches[0][0]
    assert not torch.equal(patches[1], patches[4])


def test_batch_pickles_with_its_skip_report():
    s = [PretrainSample(torch.zeros(3, 2, 2), torch.ones(3, 1, 1), torch.zeros(4, dtype=torch.bool),
                        skipped=(("x.jpg", "bad"),)) for _ in range(2)]
    b = collate_pretrain(s)
    assert b[0].shape == (2, 3, 2, 2) and b.skipped == (("x.jpg", "bad"),) * 2
    b2 = pickle.loads(pickle.dumps(b))
    assert isinstance(b2, PretrainBatch) and b2.skipped == b.skipped and torch.equal(b2[1], b[1])
    patch, tok, mask = b2  # unpacks like a 3-tuple
    assert mask.dtype == torch.bool


# --------------------------------------------------------------------------------------------------------
# ResumableSampler
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 10, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_matches_distributed_sampler(n, world, drop_last, shuffle):
    if drop_last and n < world:
        with pytest.raises(ValueError):
            ResumableSampler(n, seed=5, rank=0, world_size=world, drop_last=True)
        return
    data = list(range(n))
    for epoch in (0, 3):
        for rank in range(world):
            ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=5,
                                     drop_last=drop_last)
            ref.set_epoch(epoch)
            ours = ResumableSampler(n, seed=5, shuffle=shuffle, rank=rank, world_size=world,
                                    drop_last=drop_last)
            ours.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref) == ours.num_samples


def test_sampler_partition_covers_every_index():
    n, world = 103, 4
    per_rank = []
    for rank in range(world):
        s = ResumableSampler(n, seed=0, rank=rank, world_size=world)
        s.set_epoch(2)
        per_rank.append(list(s))
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == 26
    union = [i for p in per_rank for i in p]
    assert set(union) == set(range(n)) and len(union) == 104  # one index padded
    dl = []
    for rank in range(world):
        s = ResumableSampler(n, seed=0, rank=rank, world_size=world, drop_last=True)
        s.set_epoch(2)
        dl.append(list(s))
    flat = [i for p in dl for i in p]
    assert len(flat) == len(set(flat)) == 100  # disjoint, tail dropped


def test_sampler_determinism_epochs_and_start():
    a, b = ResumableSampler(50, seed=9), ResumableSampler(50, seed=9)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != list(b) and sorted(e1) == list(range(50))
    assert list(ResumableSampler(50, seed=10)) != list(b)
    assert list(ResumableSampler(50, seed=9, shuffle=False)) == list(range(50))
    a.set_start(20)
    assert list(a) == e1[20:] and len(a) == 30 and a.num_samples == 50
    a.set_epoch(2)  # the offset belonged to epoch 1
    assert len(a) == 50 and a.start == 0
    a.set_start(5, epoch=3)  # may be set before set_epoch
    a.set_epoch(3)
    assert list(a) == a.indices(3)[5:]
    a.set_start(50)
    assert list(a) == [] and len(a) == 0
    with pytest.raises(ValueError):
        a.set_start(51)


# --------------------------------------------------------------------------------------------------------
# sample_data
# --------------------------------------------------------------------------------------------------------
def test_sample_photographs_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    sample_data._load_photographs.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no photograph of the list may be missing in this install
            photos = sample_data.sample_photographs(with_names=True)
    finally:
        sample_data._load_photographs.cache_clear()
    assert len(photos) >= 5 and len(photos) == len(sample_data.PHOTOGRAPHS)
    data_dir = sample_data.skimage_data_dir()
    for (name, img), (name2, fname) in zip(photos, sample_data.PHOTOGRAPHS):
        assert name == name2 and img.mode == "RGB"
        path = os.path.join(data_dir, fname)
        assert os.path.isfile(path) and os.path.commonpath([path, data_dir]) == data_dir
        assert min(img.size) >= 256  # big enough for many distinct 224 crops
        # the documented size is right
        row = re.search(rf"^{re.escape(name)}\s+{re.escape(fname)}\s+(\d+)x(\d+)", sample_data.__doc__, re.M)
        assert row and (int(row.group(1)), int(row.group(2))) == img.size, name
    # real photographs, not flat images
    assert all(np.asarray(img).std() > 10 for _, img in photos)


def test_sample_images_dataset_cycles_photographs():
    ds = sample_data.SampleImages(40)
    photos = sample_data.sample_photographs()
    n = len(photos)
    assert len(ds) == 40
    assert ds[0] is photos[0] and ds[n] is photos[0] and ds[n + 3] is photos[3]
    assert sample_data.sample_photographs()[0] is photos[0]  # cached
    with pytest.raises(IndexError):
        ds[40]
    pre = PretrainDataset(ds, small_transform(), StandInMask(), seed=0)
    a, b = pre[0], pre[n]  # same photograph, different crops
    assert not torch.equal(a[0], b[0])


def test_sample_photographs_subset_and_size_cap():
    full = dict(sample_data.sample_photographs(with_names=True))
    picked = sample_data.sample_photographs(with_names=True, names=["clock", "retina", "coffee"])
    assert [n for n, _ in picked] == ["coffee", "retina", "clock"]  # PHOTOGRAPHS order
    assert all(img is full[n] for n, img in picked)  # no cap: the shared cached images
    capped = dict(sample_data.sample_photographs(with_names=True, names=["retina", "coffee"], max_side=500))
    assert capped["retina"].size == (500, 500) and capped["coffee"].size == (500, 333)  # aspect kept
    assert full["retina"].size == (1411, 1411)  # the cached original is untouched
    small = sample_data.SampleImages(6, names=("coins", "chelsea"), max_side=400)
    assert small.names == ["chelsea", "coins"] and len(small.photos) == 2 and max(small[0].size) <= 400
    assert small[2] is small[0]
    wheel = sample_data.sample_photographs(with_names=True, names=["colorwheel", "moon"])  # an extra image
    assert [n for n, _ in wheel] == ["moon", "colorwheel"] and wheel[1][1].size == (371, 370)
    assert "colorwheel" not in dict(sample_data.sample_photographs(with_names=True))  # only when named
    with pytest.raises(ValueError, match="unknown sample photograph"):
        sample_data.sample_photographs(names=["horse"])
    with pytest.raises(ValueError, match="max_side"):
        sample_data.sample_photographs(max_side=0)
