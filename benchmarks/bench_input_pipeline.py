"""The input pipeline on CPU, stage by stage, per core: the PIL pipeline and the tensor (device) pipeline.

    python benchmarks/bench_input_pipeline.py [--images 64] [--json out.json]   # a markdown table
    pytest benchmarks/bench_input_pipeline.py --benchmark-only                 # the same stages, pytest-benchmark

One thread (``torch.set_num_threads(1)``), so images/s is per core; times are this process's CPU time
(``time.process_time``: on a shared, loaded machine wall time also counts the waits for a core), the best of
``--repeats`` rounds, the stages measured in turn within each round, in a new order each round (so slow
drifts of the machine's load, and what the previous stage left in the caches, hit every stage alike).
Images: JPEGs made from the scikit-image photographs (random crops and rescales to 300-500 px, quality 90;
ImageNet-like sizes), one random RandomResizedCrop box + jitter draw per image, the same for both pipelines. Stages:

decode           PIL ``Image.open`` + ``load`` + RGB | ``torchvision.io.decode_jpeg`` (CPU) | simplejpeg
                 (when installed) | PIL draft mode at 1/2 scale (opt-in only: fewer, other pixels)
jitter           ColorJitter(0.4, 0.4, 0.4) + flip on the whole image (PIL) | ``color_jitter`` on the crop
                 + the whole image's contrast mean (tensor)
crop+resize      the 224 bicubic patch view, ToTensor, Normalize
tokenizer view   the 112 Lanczos view, ToTensor, map_pixels
masking          the blockwise mask (75 of 196), numpy
load             the loader's read of one file to an RGB image (``ImageFolderDataset.load_image``: open, pixel
                 limit, decode, RGB) with ``--jpeg_decoder pil`` | ``simplejpeg`` (when installed)
sample           the whole PIL sample as a DataLoader worker makes it, from the file to both views (load, then
                 jitter, flip, the 224 and 112 views), with each ``--jpeg_decoder``: the per-core gain a user gets
The faster decoders are checked for pixel equality with Pillow's decode ("same pixels" column; for the sample
rows: both views equal), and each load / sample row's speed-up is against its ``--jpeg_decoder pil`` row.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_end_to_end import make_jpeg_folder  # noqa: E402

from beit_fast.data.image_folder import ImageFolderDataset  # noqa: E402
from beit_fast.data.masking import MaskingGenerator  # noqa: E402
from beit_fast.data.pipeline.ops import (
    color_jitter, contrast_means, resample_weights, resize_crops, vertical_pass_first,
)  # noqa: E402
from beit_fast.data.transforms import TwoViewTransform, map_pixels, to_rgb  # noqa: E402


def _pil_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        img = to_rgb(im)
        return img if img is not im else im.copy()


def _tv_decode(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _simplejpeg_decode(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def _draft_decode(data: bytes, scale: int = 2) -> Image.Image:
    """PIL draft mode: libjpeg's DCT scaling decodes at 1/``scale`` size (fewer pixels, other pixels)."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        im.draft("RGB", (w // scale, h // scale))
        im.load()
        return to_rgb(im).copy()


class _Case:
    """One image and its draws, in both forms."""

    def __init__(self, path: str, tf: TwoViewTransform, seed: int) -> None:
        self.path = path
        self.data = Path(path).read_bytes()
        data = self.data
        self.pil = _pil_decode(data)
        self.tensor = _tv_decode(data)
        torch.manual_seed(seed)
        h, w = self.tensor.shape[1:]
        self.params = tf.draw_params(h, w)
        p = self.params
        self.ops = torch.tensor([[op for op, _ in p.jitter]], dtype=torch.int64)
        self.factors = torch.tensor([[f for _, f in p.jitter]], dtype=torch.float32)
        i, j, bh, bw = p.box
        x0 = w - j - bw if p.flip else j
        self.crop = self.tensor[None, :, i: i + bh, x0: x0 + bw].contiguous()


def _pil_jitter(tf, case):
    img = case.pil
    for op, f in case.params.jitter:
        img = {0: tf_f.adjust_brightness, 1: tf_f.adjust_contrast, 2: tf_f.adjust_saturation}[op](img, f)
    return tf_f.hflip(img) if case.params.flip else img


import torchvision.transforms.functional as tf_f  # noqa: E402


def _tensor_jitter(case):
    npix = torch.tensor([case.tensor.shape[1] * case.tensor.shape[2]])
    means = contrast_means(case.tensor[None], case.ops, case.factors, npix)
    return color_jitter(case.crop, case.ops, case.factors, contrast_mean=means)


def _tensor_view(case, size: int, interp: str, exact: bool = True):
    _, _, bh, bw = case.params.box
    h, w = torch.tensor([bh]), torch.tensor([bw])
    flip = torch.tensor([case.params.flip])
    wy = resample_weights(h, torch.tensor([0]), torch.tensor([False]), size, bh, interp)
    wx = resample_weights(w, torch.tensor([bw - 1 if case.params.flip else 0]), flip, size, bw, interp)
    return resize_crops(case.crop, wy, wx, vertical_pass_first(h, w, size, size), exact)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


#: The --jpeg_decoder values measured: pil, and simplejpeg where installed.
JPEG_DECODERS_MEASURED = ("pil", "simplejpeg") if _installed("simplejpeg") else ("pil",)


def _load(case, decoder: str) -> Image.Image:
    """What a loader worker does to get the image: ``ImageFolderDataset.load_image`` of the file."""
    return ImageFolderDataset.load_image(case.path, None, decoder)


def _sample(tf: TwoViewTransform, case, decoder: str):
    """A worker's whole PIL sample: the file's image, then its two views with this case's draws."""
    return tf.apply_params(_load(case, decoder), case.params)


def stage_functions(tf: TwoViewTransform, masking: MaskingGenerator) -> dict[str, callable]:
    """name -> fn(case) for every measured stage (``pipeline/stage``)."""
    cfg = tf.cfg
    rng = np.random.default_rng(0)
    fns = {
        "pil/decode": lambda c: _pil_decode(c.data),
        "pil/jitter+flip": lambda c: _pil_jitter(tf, c),
        "pil/crop+resize 224": lambda c: tf_f.normalize(tf_f.to_tensor(tf_f.resized_crop(
            c.pil, *c.params.box, [224, 224], tf_f.InterpolationMode.BICUBIC)), list(cfg.mean), list(cfg.std)),
        "pil/tokenizer view 112": lambda c: map_pixels(tf_f.to_tensor(tf_f.resized_crop(
            c.pil, *c.params.box, [112, 112], tf_f.InterpolationMode.LANCZOS))),
        "pil/jitter+flip+both views (image given)": lambda c: tf.apply_params(c.pil, c.params),
        "tensor/decode (torchvision)": lambda c: _tv_decode(c.data),
        "tensor/jitter": _tensor_jitter,
        "tensor/crop+resize 224": lambda c: tf_f.normalize(
            _tensor_view(c, 224, "bicubic").float().div(255), list(cfg.mean), list(cfg.std)),
        "tensor/crop+resize 224 (float32)": lambda c: _tensor_view(c, 224, "bicubic", exact=False),
        "tensor/tokenizer view 112": lambda c: map_pixels(_tensor_view(c, 112, "lanczos").float().div(255)),
        "masking": lambda c: masking(rng),
        "decode/PIL draft 1/2 (opt-in, other pixels)": lambda c: _draft_decode(c.data),
    }
    for decoder in JPEG_DECODERS_MEASURED:
        fns[f"load/file -> RGB, --jpeg_decoder {decoder}"] = functools.partial(_load, decoder=decoder)
        fns[f"sample/file -> both views, --jpeg_decoder {decoder}"] = functools.partial(_sample, tf, decoder=decoder)
    if "simplejpeg" in JPEG_DECODERS_MEASURED:
        fns["decode/simplejpeg"] = lambda c: _simplejpeg_decode(c.data)
    return fns


def same_pixels(cases) -> dict[str, bool]:
    """Whether each faster decoder gives Pillow's pixels on every image."""
    ref = [np.asarray(c.pil) for c in cases]
    out = {"tensor/decode (torchvision)": all(np.array_equal(r, c.tensor.permute(1, 2, 0).numpy())
                                              for r, c in zip(ref, cases))}
    try:
        out["decode/simplejpeg"] = all(np.array_equal(r, _simplejpeg_decode(c.data)) for r, c in zip(ref, cases))
    except ImportError:
        pass
    if "simplejpeg" in JPEG_DECODERS_MEASURED:
        tf = TwoViewTransform()
        out["load/file -> RGB, --jpeg_decoder simplejpeg"] = all(
            np.array_equal(r, np.asarray(_load(c, "simplejpeg"))) for r, c in zip(ref, cases))
        out["sample/file -> both views, --jpeg_decoder simplejpeg"] = all(
            all(torch.equal(a, b) for a, b in zip(_sample(tf, c, "pil"), _sample(tf, c, "simplejpeg")))
            for c in cases)
    out["decode/PIL draft 1/2 (opt-in, other pixels)"] = all(
        np.asarray(_draft_decode(c.data)).shape == r.shape and np.array_equal(np.asarray(_draft_decode(c.data)), r)
        for r, c in zip(ref, cases))
    return out


def make_cases(n: int, folder: str | os.PathLike | None = None, seed: int = 0):
    import tempfile

    folder = folder or tempfile.mkdtemp(prefix="beit_input_bench_")
    files = make_jpeg_folder(folder, n, seed=seed)
    tf = TwoViewTransform()
    return [_Case(f, tf, seed + k) for k, f in enumerate(files)], tf


def measure(n_images: int = 32, repeats: int = 2, folder=None) -> dict:
    """Images/s on one core (CPU time) for every stage, plus pixel equality of the faster decoders."""
    torch.set_num_threads(1)
    cases, tf = make_cases(n_images, folder)
    fns = stage_functions(tf, MaskingGenerator(14, 75))
    for fn in fns.values():
        fn(cases[0])  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    order = list(fns)
    for round_ in range(repeats):
        np.random.default_rng(round_).shuffle(order)  # no stage always runs in another's wake (caches, allocator)
        for name in order:
            fn = fns[name]
            t0 = time.process_time()
            for c in cases:
                fn(c)
            best[name] = min(best[name], time.process_time() - t0)
    rows = {name: {"images_per_s": len(cases) / t, "ms_per_image": 1e3 * t / len(cases)} for name, t in best.items()}
    for name, same in same_pixels(cases).items():
        rows[name]["same_pixels"] = same
    sizes = [c.tensor.shape[1:] for c in cases]
    return {"images": len(cases), "mean_size": [float(np.mean([s[0] for s in sizes])),
                                                float(np.mean([s[1] for s in sizes]))],
            "torch_threads": torch.get_num_threads(), "stages": rows}


def _reference(name: str) -> str | None:
    """The row a row's speed-up is measured against: its ``--jpeg_decoder pil`` row, or Pillow's decode."""
    if name.startswith(("load/", "sample/")):
        return name.rsplit(" ", 1)[0] + " pil"
    return "pil/decode" if "decode" in name else None


def markdown(result: dict) -> str:
    stages = result["stages"]
    lines = [f"{result['images']} JPEGs, mean {result['mean_size'][0]:.0f}x{result['mean_size'][1]:.0f} px, "
             "1 thread", "", "| stage | ms / image | images/s per core | speed-up (vs PIL decode, or vs "
             "--jpeg_decoder pil) | same pixels as PIL |", "| --- | ---: | ---: | ---: | --- |"]
    for name, r in stages.items():
        ref = _reference(name)
        gain = f"{r['images_per_s'] / stages[ref]['images_per_s']:.2f}x" if ref in stages else ""
        same = {True: "yes", False: "no"}.get(r.get("same_pixels"), "")
        lines.append(f"| {name} | {r['ms_per_image']:.2f} | {r['images_per_s']:.0f} | {gain} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = measure(args.images, args.repeats)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


# -- pytest-benchmark ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_cases():
    torch.set_num_threads(1)
    return make_cases(8)


@pytest.mark.parametrize("stage", list(stage_functions(TwoViewTransform(), MaskingGenerator(14, 75))))
def test_input_stage(benchmark, bench_cases, stage):
    cases, tf = bench_cases
    fn = stage_functions(tf, MaskingGenerator(14, 75))[stage]
    benchmark.group = "input pipeline per image, 1 CPU thread"
    benchmark.pedantic(lambda: [fn(c) for c in cases], rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = round(len(cases) / benchmark.stats.stats.median, 1)


if __name__ == "__main__":
    main()
