"""The embedded segmentation demo: a small set of scenes composed from scikit-image's texture photographs
(brick, grass, gravel, the moon's surface), with per-pixel labels, written as an images + masks folder pair
and used like any other data set by ``python -m beit_fast.segment`` (no download).

Each scene is a Voronoi partition of the image around 2-5 random sites, every cell filled with a random
crop of one texture (random scale, random grey level), labelled with that texture's class. Telling the cells
apart needs texture, not colour: all four photographs are grey.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["TEXTURES", "make_scene", "write_scene_folders", "run_demo"]

TEXTURES = ("brick", "grass", "gravel", "moon")


def _textures() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in TEXTURES:
        img = getattr(skimage.data, name)()
        img = img if img.ndim == 2 else img[..., :3].mean(-1)
        out.append(img.astype(np.float32))
    return out


def _texture_crop(tex: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(0.5, 1.0)
    side = int(min(tex.shape) * scale)
    top = rng.integers(0, tex.shape[0] - side + 1)
    left = rng.integers(0, tex.shape[1] - side + 1)
    crop = Image.fromarray(tex[top:top + side, left:left + side].astype(np.uint8)).resize((size, size), Image.BILINEAR)
    crop = np.asarray(crop, dtype=np.float32)
    return np.clip((crop - crop.mean()) * rng.uniform(0.8, 1.2) + rng.uniform(90, 160), 0, 255)


def make_scene(size: int, rng: np.random.Generator, textures: list[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [size, size, 3], label uint8 [size, size])``: a Voronoi scene of textures."""
    textures = textures if textures is not None else _textures()
    k = int(rng.integers(2, 6))
    sites = rng.uniform(0, size, (k, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = (yy[None] - sites[:, 0, None, None]) ** 2 + (xx[None] - sites[:, 1, None, None]) ** 2
    cell = d.argmin(0)
    classes = rng.integers(0, len(textures), k)
    image = np.zeros((size, size), np.float32)
    label = np.zeros((size, size), np.uint8)
    for c in range(k):
        where = cell == c
        image[where] = _texture_crop(textures[classes[c]], size, rng)[where]
        label[where] = classes[c]
    rgb = np.repeat(image.round().astype(np.uint8)[..., None], 3, axis=-1)
    return rgb, label


def write_scene_folders(root: str | Path, n_train: int = 96, n_val: int = 24, size: int = 160, seed: int = 0
                        ) -> dict[str, Path]:
    """Write ``root/{train,val}/{images,masks}`` (JPEG-free: PNG images, greyscale PNG masks); returns the four
    folders. Deterministic in ``seed``; existing files are rewritten."""
    root = Path(root)
    textures = _textures()
    rng = np.random.default_rng(seed)
    dirs = {}
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, mask_dir = root / split / "images", root / split / "masks"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = make_scene(size, rng, textures)
            Image.fromarray(image).save(img_dir / f"{split}_{i:04d}.png")
            Image.fromarray(label, mode="L").save(mask_dir / f"{split}_{i:04d}.png")
        dirs[f"{split}_images"], dirs[f"{split}_masks"] = img_dir, mask_dir
    return dirs


def _most_frequent_class(dataset) -> int:
    counts = np.zeros(dataset.num_classes, np.int64)
    for i in range(len(dataset)):
        _, label = dataset.load(i)
        lab = label.numpy()
        counts += np.bincount(lab[lab != 255], minlength=dataset.num_classes)[: dataset.num_classes]
    return int(counts.argmax())


def _baseline(val, cls: int) -> dict:
    import torch

    from .segmentation_metrics import SegmentationMetric

    metric = SegmentationMetric(val.num_classes)
    for i in range(len(val)):
        _, label = val.load(i)
        metric.update(torch.full(label.shape, cls, dtype=torch.long), label)
    return metric.compute()


def _picture(path: Path, val, models: dict, cfg, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..model.segmentation_inference import model_logits, predict

    cols = ["image", "ground truth"] + [f"prediction ({name})" for name in models]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    kw = dict(cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    for r in range(n):
        raw, label = val.load(r)
        image, _ = val[r]
        axes[r][0].imshow(raw.permute(1, 2, 0).numpy())
        axes[r][1].imshow(label.numpy(), **kw)
        for c, model in enumerate(models.values(), start=2):
            model.eval()
            with torch.no_grad():
                pred = predict(lambda x, m=model: model_logits(m, x), image, val.num_classes, mode=cfg.test_mode,
                               crop=model.img_size, stride=cfg.stride, img_scale=cfg.img_scale)
            axes[r][c].imshow(pred.numpy(), **kw)
    for c, title in enumerate(cols):
        axes[0][c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


DEMO_HEAD_CHANNELS = 64
DEMO_PRETRAINED = Path("runs/beit_pretrain_demo/checkpoint-last.pt")


def run_demo(cfg, *, output_dir: str | Path = "runs/beit_segment_demo", device="cpu", finetune: str | None = None,
             progress: bool = True, overwrite_output_dir: bool = False, n_train: int = 96, n_val: int = 24) -> dict:
    """Write the scenes, fine-tune the pretraining demo's checkpoint (``finetune``, default
    ``runs/beit_pretrain_demo/checkpoint-last.pt`` when it exists) and a randomly initialised backbone of the
    same size with the same recipe ``cfg``, print mIoU / mAcc / aAcc beside the trivial baseline (every pixel
    the most frequent training class), save ``segmentation_demo.png``; returns the numbers."""
    import torch

    from ..model.beit import get_config
    from ..interop.pretrained import classifier_config_from_checkpoint
    from ..data.segmentation import SegEvalTransform, SegmentationFolder, SegTrainTransform
    from ..model.segmentation import SegmentationHeadConfig, build_segmenter
    from .segmentation import load_backbone_pretrained, train_segmentation

    out = Path(output_dir)
    dirs = write_scene_folders(out / "data", n_train=n_train, n_val=n_val, seed=0)
    classes = len(TEXTURES)
    train = SegmentationFolder.from_folders(dirs["train_images"], dirs["train_masks"], classes, transform=SegTrainTransform(
        crop_size=cfg.crop_size, img_scale=tuple(cfg.img_scale), ratio_range=tuple(cfg.ratio_range),
        cat_max_ratio=cfg.cat_max_ratio, photometric=cfg.photometric))
    val = SegmentationFolder.from_folders(dirs["val_images"], dirs["val_masks"], classes, transform=SegEvalTransform())
    results = {"baseline": _baseline(val, _most_frequent_class(train))}
    # Narrower heads than the official (as wide as the trunk, 256 for the auxiliary one): CPU minutes.
    head = SegmentationHeadConfig(num_classes=classes, channels=DEMO_HEAD_CHANNELS, aux_channels=DEMO_HEAD_CHANNELS // 2)
    source = Path(finetune) if finetune else (DEMO_PRETRAINED if DEMO_PRETRAINED.is_file() else None)
    runs = {}
    if source is not None:
        arch = classifier_config_from_checkpoint(source)
        torch.manual_seed(cfg.seed)
        model = build_segmenter(arch, classes, img_size=cfg.crop_size, head=head, drop_path_rate=cfg.drop_path)
        load_backbone_pretrained(model, source)
        runs["pretrained"] = model
    else:
        print(f"no pretrained checkpoint ({DEMO_PRETRAINED} not found: run python -m beit_fast.pretrain first); "
              "training from scratch only")
        arch = get_config("tiny", img_size=128)
    torch.manual_seed(cfg.seed)
    runs["scratch"] = build_segmenter(arch, classes, img_size=cfg.crop_size, head=head, drop_path_rate=cfg.drop_path)
    for name, model in runs.items():
        r = train_segmentation(model, train, val, cfg, device=device, output_dir=out / f"from_{name}",
                               progress=progress, overwrite_output_dir=overwrite_output_dir)
        results[name] = r["final"] or {}
    _picture(out / "segmentation_demo.png", val, {k: m.cpu() for k, m in runs.items()}, cfg)
    print(f"{'':12s} {'mIoU':>6s} {'mAcc':>6s} {'aAcc':>6s}   ({len(val)} validation scenes, {classes} textures)")
    for name in ("baseline", *runs):
        r = results[name]
        if "mIoU" in r:
            print(f"{name:12s} {100 * r['mIoU']:6.2f} {100 * r['mAcc']:6.2f} {100 * r['aAcc']:6.2f}")
    print(f"picture: {out / 'segmentation_demo.png'}")
    return results
