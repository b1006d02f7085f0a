"""Pictures of a BEiT run (the library; the command line is ``python -m beit_fast.visualize RUN_DIR``).

From a pretraining output folder (``python -m beit_fast.pretrain --output_dir RUN_DIR``: its newest
checkpoint, its ``log.jsonl`` and the tokenizer it was trained with) it writes four PNGs:

* ``mask.png`` - a few images with their blockwise masks (:func:`plot_mask`);
* ``tokenizer_reconstruction.png`` - tokenizer view vs the tokenizer's reconstruction from its own
  tokens (:func:`plot_reconstruction`; needs a tokenizer with a decoder: our dVAE, not DALL-E's
  encoder-only release);
* ``predictions.png`` - per image: the input, its mask, the true tokens decoded, the tokens with the
  masked ones replaced by the model's argmax predictions decoded, and which predictions are right
  (:func:`plot_predictions`; MIM accuracy on the masked positions in the titles);
* ``curves.png`` - loss, accuracy and learning rate against the step, from the run's JSON-lines log
  (:func:`plot_curves`; also reads other logs of this package: any numeric ``*loss*``, ``*acc*`` /
  ``top1``/``top5`` and ``lr`` keys).

The views are those of the run's data pipeline (same sizes, resize filters and normalisation, masks from
the run's :class:`~beit_fast.masking.MaskingGenerator` settings) but without colour jitter or flips and
with crops of at least 35% of the image, so that the pictures show recognisable content; they are drawn
from the run's ``--data_path`` (or ``--data_path`` given here) or, for the embedded demo, from the
scikit-image photographs. Everything is seeded (``--seed``): the same command draws the same pictures.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (no ``pyplot``, no global
backend switch) at a fixed size: every panel is :data:`PANEL_INCHES` square (curves:
:data:`CURVE_PANEL_INCHES`), so a PNG is exactly ``columns x panel x dpi`` by ``rows x panel x dpi``
pixels. ``palette=True`` (``--palette``) stores 256-colour PNGs, about a third of the size, for READMEs.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .options import DEFAULT_DPI, PANEL_INCHES, PICTURE_PARTS

log = logging.getLogger("beit_fast.visualization")

__all__ = [
    "PARTS", "FILENAMES", "PANEL_INCHES", "CURVE_PANEL_INCHES", "plot_mask", "plot_reconstruction",
    "plot_predictions", "plot_curves", "mim_predictions", "read_log", "visualize_run",
]

#: The pictures :func:`visualize_run` can make, in order, and their file names.
PARTS = PICTURE_PARTS
FILENAMES = {"mask": "mask.png", "reconstruction": "tokenizer_reconstruction.png",
             "predictions": "predictions.png", "curves": "curves.png"}
#: (width, height) of one panel of the curves figure (loss | accuracy | learning rate), inches.
CURVE_PANEL_INCHES = (3.0, 2.5)
#: Smallest crop (fraction of the image area) of the pictured views; training uses 0.08.
VIEW_MIN_SCALE = 0.35
#: Demo photographs in the order they are pictured (colourful, recognisable ones first).
DEMO_ORDER = ("astronaut", "chelsea", "coffee", "motorcycle", "rocket", "immunohistochemistry", "retina",
              "camera", "coins", "moon", "clock", "cell", "brick", "grass", "gravel", "hubble_deep_field")

_MASK_GREY = 0.5
_TITLE_SIZE = 8


# --------------------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float, dpi: int):
    """A matplotlib Figure on its own Agg canvas (no pyplot: no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    return fig


def _save(fig, out: str | os.PathLike, dpi: int, palette: bool) -> Path:
    """Render ``fig`` at ``dpi`` (its fixed size, no tight bounding box) and write an RGB (or 256-colour)
    PNG to ``out``; returns the path."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as img:
        rgb = img.convert("RGB")
    if palette:
        rgb = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = out.with_name(f".{out.name}.tmp")
    rgb.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)
    return out


def _check_dpi(dpi: int) -> int:
    if not isinstance(dpi, (int, np.integer)) or isinstance(dpi, bool) or dpi < 10:
        raise ValueError(f"dpi must be an integer >= 10, got {dpi!r}")
    return int(dpi)


def _to_hwc(image: Any) -> np.ndarray:
    """PIL image, ``[3, H, W]`` / ``[H, W, 3]`` tensor or array (float in [0, 1] or uint8) -> float
    ``[H, W, 3]`` in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from .transforms import to_rgb

        return np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"an image must be [3, H, W] or [H, W, 3], got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"an image must have 1 or 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _mask_grid(mask: Any, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A mask ``[h, w]`` or ``[N]`` (bool or 0/1; tensor or array) -> bool ``[h, w]`` (``[N]``: square, or
    ``grid``)."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    arr = arr != 0 if arr.dtype != np.bool_ else arr
    if arr.ndim == 1:
        if grid is None:
            side = math.isqrt(arr.size)
            if side * side != arr.size:
                raise ValueError(f"a flat mask of {arr.size} patches is not a square grid: pass it as [h, w]")
            grid = (side, side)
        if grid[0] * grid[1] != arr.size:
            raise ValueError(f"a flat mask of {arr.size} patches does not fit the {grid[0]}x{grid[1]} patch grid")
        arr = arr.reshape(grid)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be [h, w] or [h * w], got shape {arr.shape}")
    return arr


def _cell(image_hw: tuple[int, int], grid: tuple[int, int], patch_size: int | None) -> tuple[float, float]:
    h, w = image_hw
    if patch_size is not None:
        if grid[0] * patch_size != h or grid[1] * patch_size != w:
            raise ValueError(f"a {grid[0]}x{grid[1]} mask of {patch_size}px patches does not cover a {h}x{w} image")
        return float(patch_size), float(patch_size)
    if h % grid[0] or w % grid[1]:
        raise ValueError(f"a {h}x{w} image is not divisible into the mask's {grid[0]}x{grid[1]} patch grid")
    return h / grid[0], w / grid[1]


def _grey_out(img: np.ndarray, mask: np.ndarray, cell: tuple[float, float]) -> np.ndarray:
    """The image with masked patches blended towards grey."""
    up = np.kron(mask, np.ones((int(cell[0]), int(cell[1])), dtype=bool))[..., None]
    return np.where(up, 0.25 * img + 0.75 * _MASK_GREY, img)


def _outline(ax, mask: np.ndarray, cell: tuple[float, float], color: str = "#ffcc00", lw: float = 1.0) -> None:
    """Draw the border between masked and visible patches (and the image edge around masked ones)."""
    from matplotlib.collections import LineCollection

    ch, cw = cell
    h, w = mask.shape
    segs = []
    for r, c in zip(*np.nonzero(mask)):
        y0, y1, x0, x1 = r * ch - 0.5, (r + 1) * ch - 0.5, c * cw - 0.5, (c + 1) * cw - 0.5
        if r == 0 or not mask[r - 1, c]:
            segs.append([(x0, y0), (x1, y0)])
        if r == h - 1 or not mask[r + 1, c]:
            segs.append([(x0, y1), (x1, y1)])
        if c == 0 or not mask[r, c - 1]:
            segs.append([(x0, y0), (x0, y1)])
        if c == w - 1 or not mask[r, c + 1]:
            segs.append([(x1, y0), (x1, y1)])
    if segs:
        ax.add_collection(LineCollection(segs, colors=color, linewidths=lw))


def _grid_lines(ax, grid: tuple[int, int], cell: tuple[float, float], image_hw: tuple[int, int]) -> None:
    from matplotlib.collections import LineCollection

    h, w = image_hw
    segs = [[(-0.5, r * cell[0] - 0.5), (w - 0.5, r * cell[0] - 0.5)] for r in range(1, grid[0])]
    segs += [[(c * cell[1] - 0.5, -0.5), (c * cell[1] - 0.5, h - 0.5)] for c in range(1, grid[1])]
    ax.add_collection(LineCollection(segs, colors="white", linewidths=0.3, alpha=0.6))


def _show(ax, img: np.ndarray, title: str | None = None) -> None:
    ax.imshow(img, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=_TITLE_SIZE, pad=2)


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x)
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _mask_list(masks: Any, n: int) -> list:
    if isinstance(masks, (list, tuple)):
        out = list(masks)
    else:
        arr = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if arr.ndim == 1 or (arr.ndim == 2 and n == 1 and arr.shape[0] != 1):
            out = [arr]  # one mask, [N] or [h, w]
        else:
            out = list(arr)  # a batch [B, N] or [B, h, w]
    if len(out) != n:
        raise ValueError(f"{n} image(s) but {len(out)} mask(s)")
    return out


# --------------------------------------------------------------------------------------------------------
# (a) masks
# --------------------------------------------------------------------------------------------------------
def plot_mask(image: Any, mask: Any, out: str | os.PathLike, *, patch_size: int | None = None,
              title: str | Sequence[str] | None = None, dpi: int = DEFAULT_DPI, palette: bool = False) -> Path:
    """Images with their blockwise masks: one column per image, the image with its patch grid on top and the
    image with the masked patches greyed out (outlined) below; the mask count in the title.

    ``image``: a PIL image, a ``[3, H, W]`` tensor in [0, 1], an ``[H, W, 3]`` array (float in [0, 1] or
    uint8), or a list of them (or a ``[B, 3, H, W]`` batch). ``mask``: bool ``[h, w]`` or ``[h * w]``
    (row-major, as :class:`~beit_fast.data.PretrainDataset` yields), or a list / batch of them.
    ``patch_size``: pixels per patch (default: image side / mask side). ``title``: a title per image.
    Writes a PNG of ``n * PANEL_INCHES * dpi`` by ``2 * PANEL_INCHES * dpi`` pixels; returns its path.
    """
    dpi = _check_dpi(dpi)
    images = [_to_hwc(im) for im in _as_list(image)]
    masks = [_mask_grid(m) for m in _mask_list(mask, len(images))]
    titles = _titles(title, len(images))
    fig = _figure(len(images) * PANEL_INCHES, 2 * PANEL_INCHES, dpi)
    axes = fig.subplots(2, len(images), squeeze=False)
    for k, (img, m) in enumerate(zip(images, masks)):
        cell = _cell(img.shape[:2], m.shape, patch_size)
        n, total = int(m.sum()), m.size
        _show(axes[0, k], img, titles[k] or f"{m.shape[0]}x{m.shape[1]} patches")
        _grid_lines(axes[0, k], m.shape, cell, img.shape[:2])
        _show(axes[1, k], _grey_out(img, m, cell), f"{n}/{total} masked ({100 * n / total:.0f}%)")
        _grid_lines(axes[1, k], m.shape, cell, img.shape[:2])
        _outline(axes[1, k], m, cell)
    return _save(fig, out, dpi, palette)


def _titles(title: str | Sequence[str] | None, n: int) -> list[str | None]:
    if title is None:
        return [None] * n
    if isinstance(title, str):
        return [title] + [None] * (n - 1)
    titles = list(title)
    if len(titles) != n:
        raise ValueError(f"{n} image(s) but {len(titles)} title(s)")
    return titles


# --------------------------------------------------------------------------------------------------------
# (b) tokenizer reconstruction
# --------------------------------------------------------------------------------------------------------
def _require_decoder(tokenizer) -> None:
    if not callable(getattr(tokenizer, "decode_indices", None)):
        raise ValueError(
            f"the {type(tokenizer).__name__} tokenizer has no decoder, so its tokens cannot be turned back into "
            "pixels (DALL-E's released tokenizer is encoder-only); use a beit_fast dVAE (--tokenizer dvae, "
            "python -m beit_fast.train_tokenizer) to picture reconstructions")


def _tokenizer_views(tokenizer, images: Any) -> torch.Tensor:
    """``[B, 3, s, s]`` in the map_pixels range: a tensor batch / list of views as the data pipeline yields
    them (already map_pixels'd), or PIL images (resized to the tokenizer's input size and map_pixels'd)."""
    from PIL import Image

    from .tokenizer.base import map_pixels

    items = _as_list(images)
    views = []
    for im in items:
        if isinstance(im, Image.Image):
            import torchvision.transforms.functional as TF

            from .transforms import to_rgb

            s = tokenizer.input_size
            im = map_pixels(TF.to_tensor(TF.resize(to_rgb(im), [s, s], interpolation=TF.InterpolationMode.LANCZOS)))
        elif not isinstance(im, torch.Tensor):
            im = torch.as_tensor(np.asarray(im))
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"a tokenizer view must be [3, H, W] (map_pixels range), got {tuple(im.shape)}")
        views.append(im.float())
    return torch.stack(views)


@torch.no_grad()
def plot_reconstruction(tokenizer, images: Any, out: str | os.PathLike, *, titles: Sequence[str] | None = None,
                        dpi: int = DEFAULT_DPI, palette: bool = False) -> Path:
    """Each image (top) and the tokenizer's reconstruction from its own tokens (bottom: encode to token ids,
    decode), with the reconstruction's mean squared error on [0, 1] pixels and the number of distinct
    tokens in the titles.

    ``images``: tokenizer views ``[B, 3, s, s]`` in the map_pixels range (as the data pipeline yields them)
    or a list of such tensors or of PIL images. A tokenizer without a decoder (DALL-E's encoder) raises
    ``ValueError``. Writes ``B * PANEL_INCHES * dpi`` by ``2 * PANEL_INCHES * dpi`` pixels.
    """
    from .tokenizer.base import unmap_pixels

    dpi = _check_dpi(dpi)
    _require_decoder(tokenizer)
    x = _tokenizer_views(tokenizer, images)
    grid = tokenizer.token_grid(x.shape[-2], x.shape[-1])
    tokens = tokenizer.get_codebook_indices(x)
    recon = tokenizer.decode_indices(tokens, grid=grid).float().cpu()
    target = unmap_pixels(x.float()).cpu()
    names = _titles(titles, x.shape[0])
    fig = _figure(x.shape[0] * PANEL_INCHES, 2 * PANEL_INCHES, dpi)
    axes = fig.subplots(2, x.shape[0], squeeze=False)
    for k in range(x.shape[0]):
        mse = float(((recon[k] - target[k]) ** 2).mean())
        distinct = int(tokens[k].unique().numel())
        _show(axes[0, k], _to_hwc(target[k]), names[k] or "input")
        _show(axes[1, k], _to_hwc(recon[k]), f"decoded tokens: MSE {mse:.4f}\n{distinct} distinct codes")
    return _save(fig, out, dpi, palette)


# --------------------------------------------------------------------------------------------------------
# (c) masked-token predictions
# --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def mim_predictions(model, tokenizer, images_patch_view: torch.Tensor, images_tokenizer_view: torch.Tensor,
                    masks: Any) -> dict[str, torch.Tensor]:
    """What the model predicts at the masked positions.

    Returns CPU tensors: ``tokens`` (true tokens ``[B, N]``), ``predicted`` (argmax of the model at every
    masked position, the true token elsewhere, ``[B, N]``), ``mask`` (bool ``[B, N]``), ``correct`` (bool
    ``[B, N]``, True only at masked positions predicted right) and ``accuracy`` (``[B]``, over each image's
    masked positions; NaN for an image without masked patches).
    """
    device = next(model.parameters()).device
    patch = _as_batch(images_patch_view).to(device, torch.float32)
    views = _as_batch(images_tokenizer_view)
    mask_list = _mask_list(masks, patch.shape[0])
    mask = torch.stack([torch.as_tensor(_mask_grid(m).reshape(-1)) for m in mask_list]).to(device)
    vocab = model.lm_head.out_features if hasattr(model, "lm_head") else None
    if vocab is not None and vocab != tokenizer.vocab_size:
        raise ValueError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}")
    tokens = tokenizer.get_codebook_indices(views).to(device)
    if tokens.shape != mask.shape:
        raise ValueError(f"the tokenizer gives {tokens.shape[1]} tokens per image but the masks have {mask.shape[1]} "
                         "patches: the tokenizer view and the patch view do not match")
    was_training = model.training
    model.eval()
    try:
        logits = model(patch, mask)
    finally:
        model.train(was_training)
    predicted = tokens.clone()
    predicted[mask] = logits.argmax(dim=-1)
    correct = (predicted == tokens) & mask
    n_masked = mask.sum(dim=1)
    accuracy = torch.where(n_masked > 0, correct.sum(dim=1).float() / n_masked.clamp(min=1).float(),
                           torch.full_like(n_masked, float("nan"), dtype=torch.float32))
    return {"tokens": tokens.cpu(), "predicted": predicted.cpu(), "mask": mask.cpu(), "correct": correct.cpu(),
            "accuracy": accuracy.cpu()}


def _as_batch(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0) if x.dim() == 3 else x
    return torch.stack([t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in x])


@torch.no_grad()
def plot_predictions(model, tokenizer, images_patch_view: Any, images_tokenizer_view: Any, masks: Any,
                     out: str | os.PathLike, *, titles: Sequence[str] | None = None, title: str | None = None,
                     dpi: int = DEFAULT_DPI, palette: bool = False) -> Path:
    """One row per image: the tokenizer view, its mask (masked patches greyed), the true tokens decoded,
    the tokens with the masked ones replaced by the model's argmax predictions decoded (visible ones kept
    true; masked region outlined), and the masked positions coloured by whether the prediction is right
    (green) or wrong (red). The MIM accuracy on the masked positions is in the titles.

    ``images_patch_view``: ``[B, 3, S, S]`` as the model takes it (normalised); ``images_tokenizer_view``:
    ``[B, 3, s, s]`` in the map_pixels range; ``masks``: ``[B, N]`` bool (or a list of ``[h, w]``).
    ``titles``: one per image (first column); ``title``: above the figure, followed by the accuracy over
    all the images' masked positions. A tokenizer without a decoder (DALL-E's encoder) gets the three
    panels that need none (input, mask, right/wrong). Writes ``columns * PANEL_INCHES * dpi`` by
    ``B * PANEL_INCHES * dpi`` pixels (5 columns; 3 without a decoder).
    """
    from .tokenizer.base import unmap_pixels

    dpi = _check_dpi(dpi)
    views = _as_batch(images_tokenizer_view)
    res = mim_predictions(model, tokenizer, images_patch_view, views, masks)
    decoder = callable(getattr(tokenizer, "decode_indices", None))
    b = views.shape[0]
    grid = tokenizer.token_grid(views.shape[-2], views.shape[-1])
    if decoder:
        true_img = tokenizer.decode_indices(res["tokens"], grid=grid).float().cpu()
        pred_img = tokenizer.decode_indices(res["predicted"], grid=grid).float().cpu()
    names = _titles(titles, b)
    cols = 5 if decoder else 3
    fig = _figure(cols * PANEL_INCHES, b * PANEL_INCHES, dpi)
    axes = fig.subplots(b, cols, squeeze=False)
    for k in range(b):
        img = _to_hwc(unmap_pixels(views[k].float()))
        m = res["mask"][k].numpy().reshape(grid)
        ok = res["correct"][k].numpy().reshape(grid)
        cell = _cell(img.shape[:2], grid, None)
        n = int(m.sum())
        right = int(ok.sum())
        acc = f"{100 * right / n:.0f}%" if n else "n/a"
        _show(axes[k, 0], img, names[k] or "input")
        _show(axes[k, 1], _grey_out(img, m, cell), f"mask: {n}/{m.size} patches")
        _outline(axes[k, 1], m, cell)
        c = 2
        if decoder:
            _show(axes[k, 2], _to_hwc(true_img[k]), "true tokens, decoded")
            _show(axes[k, 3], _to_hwc(pred_img[k]), f"predicted at mask: acc {acc}")
            _outline(axes[k, 3], m, cell)
            c = 4
        colours = np.zeros(grid + (4,), dtype=np.float32)
        colours[m & ok] = (0.1, 0.8, 0.2, 0.75)
        colours[m & ~ok] = (0.9, 0.15, 0.1, 0.75)
        _show(axes[k, c], 0.6 * img + 0.4 * _MASK_GREY, f"right {right} / wrong {n - right}")
        axes[k, c].imshow(colours, interpolation="nearest", extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    total, right = int(res["mask"].sum()), int(res["correct"].sum())
    overall = (f"MIM accuracy {100 * right / total:.1f}% ({right}/{total} masked patches)" if total
               else "no masked patch")
    fig.suptitle(f"{title}: {overall}" if title else overall, fontsize=_TITLE_SIZE + 1)
    return _save(fig, out, dpi, palette)


# --------------------------------------------------------------------------------------------------------
# (d) curves
# --------------------------------------------------------------------------------------------------------
_X_KEYS = ("step", "global_step", "iteration", "epoch")
_SKIP_KEYS = {"loss_scale", "min_lr", "weight_decay", "grad_norm", "images_per_s", "step_time_s",
              "skipped_images", "rss_mb"}


def read_log(log_path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (lines that are not JSON objects, e.g. one cut off by a kill, are
    skipped). A missing file raises ``FileNotFoundError``."""
    log_path = Path(log_path)
    if not log_path.is_file():
        raise FileNotFoundError(f"log not found: {log_path}")
    records = []
    with open(log_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _series(records: list[dict]) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """The x key and ``{metric: (xs, ys)}`` of every numeric metric of the records."""
    x_key = next((k for k in _X_KEYS if any(_numeric(r.get(k)) is not None for r in records)), None)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        x = _numeric(rec.get(x_key)) if x_key else float(i)
        if x is None:
            x = float(i)
        for key, value in rec.items():
            y = _numeric(value)
            if key in _X_KEYS or key in _SKIP_KEYS or y is None or not math.isfinite(y):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(x)
            ys.append(y)
    return (x_key or "record"), series


def _kind(key: str) -> str | None:
    k = key.lower()
    if "loss" in k or k == "unigram_entropy":  # pretraining's unigram baseline: a loss a model can beat
        return "loss"
    if "acc" in k or k in ("top1", "top5") or k.endswith(("_top1", "_top5")) or k.startswith(("top1_", "top5_")):
        return "accuracy"
    if k == "lr" or k.endswith("_lr") and not k.startswith("min"):
        return "lr"
    return None


def plot_curves(log_path: str | os.PathLike, out: str | os.PathLike, *, title: str | None = None,
                dpi: int = DEFAULT_DPI, palette: bool = False) -> Path:
    """Loss, accuracy and learning rate against the step, from a JSON-lines log.

    Reads what ``beit_fast.pretrain`` writes (``step``, ``loss``, ``mlm_acc``, ``lr``, ...) and is tolerant
    of other logs: the x axis is the first of ``step``, ``global_step``, ``iteration``, ``epoch`` present
    (else the line number); every numeric key containing ``loss`` goes to the first panel, every one
    containing ``acc`` (or ``top1``/``top5``) to the second, ``lr`` to the third (log scale); the unigram
    baseline of pretraining (``unigram_entropy``, ``unigram_acc``) is drawn dashed grey in the first two; a
    panel with nothing to show says so. ``FileNotFoundError`` for a missing log, ``ValueError`` for one without any
    numeric record. Writes ``3 * 3.0 * dpi`` by ``2.5 * dpi`` pixels (:data:`CURVE_PANEL_INCHES`).
    """
    dpi = _check_dpi(dpi)
    records = read_log(log_path)
    x_key, series = _series(records)
    if not series:
        raise ValueError(f"the log {log_path} holds no numeric metrics ({len(records)} JSON records)")
    groups: dict[str, list[str]] = {"loss": [], "accuracy": [], "lr": []}
    for key in series:
        kind = _kind(key)
        if kind is not None:
            groups[kind].append(key)
    if not any(groups.values()):
        raise ValueError(f"the log {log_path} holds no loss, accuracy or learning-rate values "
                         f"(keys: {sorted(series)})")
    pw, ph = CURVE_PANEL_INCHES
    fig = _figure(3 * pw, ph, dpi)
    axes = fig.subplots(1, 3, squeeze=True)
    labels = {"loss": "loss", "accuracy": "accuracy", "lr": "learning rate"}
    for ax, (kind, keys) in zip(axes, groups.items()):
        ax.tick_params(labelsize=8)
        ax.set_xlabel(x_key, fontsize=8)
        ax.set_title(labels[kind], fontsize=_TITLE_SIZE + 1, pad=2)
        ax.grid(True, alpha=0.3, linewidth=0.5)
        if not keys:
            ax.text(0.5, 0.5, f"no {labels[kind]} in the log", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes, color="grey")
            continue
        for key in keys:
            xs, ys = series[key]
            style = dict(marker="o", markersize=2) if len(xs) < 30 else {}
            if key.startswith("unigram_"):  # the frequency-only baseline, beside what the model reaches
                style = dict(linestyle="--", color="grey")
            ax.plot(xs, ys, linewidth=1.2, label=key, **style)
        if kind == "lr" and all(y > 0 for key in keys for y in series[key][1]):
            ax.set_yscale("log")
        if kind == "accuracy" and max(y for key in keys for y in series[key][1]) <= 1.0:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        elif kind == "accuracy":
            ax.set_ylabel("%", fontsize=8)  # logged in percent (beit_fast.finetune's top1 / top5)
        ax.legend(fontsize=7, loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE + 1)
    return _save(fig, out, dpi, palette)


# --------------------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------------------
def _find_checkpoint(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path:
    from .checkpoint import list_checkpoints

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected checkpoint-last.pt or checkpoint-N.pt, "
                                "written by python -m beit_fast.pretrain --output_dir ...); pass --checkpoint PATH")
    return candidates[0]


def _load_run_state(path: Path, trust_pickle: bool = False) -> dict:
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path, trust_pickle=trust_pickle)
    except FileNotFoundError:
        raise
    except CheckpointError as e:  # corrupt, or pickled objects refused (the message names --trust-pickle)
        raise ValueError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - anything else a broken file can raise
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "model_config", "args") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a beit_fast pretraining checkpoint (missing {missing})")
    return state


def _build_run_model(state: dict, device: torch.device):
    from .checkpoint import extract_model_state
    from .model import BeitConfig, VisionTransformerForMaskedImageModeling

    cfg = BeitConfig(**state["model_config"])
    model = VisionTransformerForMaskedImageModeling(cfg)
    sd = extract_model_state(state)
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _find_tokenizer(state: dict, run_dir: Path, tokenizer: str | os.PathLike | None) -> tuple[str, Path]:
    """``(kind, path)`` of the run's tokenizer: ``tokenizer`` if given, else the path saved in the checkpoint
    (as given, relative to the run folder, or its file name inside the run folder: a run started from
    another working directory saves a path relative to that)."""
    info = state.get("tokenizer") or {}
    args = state.get("args") or {}
    kind = info.get("kind") or args.get("tokenizer") or "dvae"
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer weights not found: {path}")
        return kind, path
    saved = info.get("path") or args.get("discrete_vae_weight_path")
    candidates = []
    if saved:
        candidates += [Path(saved), run_dir / saved, run_dir / Path(saved).name]
    candidates.append(run_dir / "tokenizer.pt")
    for path in candidates:
        if path.is_file():
            return kind, path
    raise FileNotFoundError(f"the run's {kind} tokenizer was not found (checkpoint says {saved!r}; looked at "
                            f"{', '.join(str(c) for c in dict.fromkeys(candidates))}); pass --tokenizer PATH")


def _run_images(args: Mapping[str, Any], num_images: int, seed: int,
                data_path: str | os.PathLike | None = None) -> tuple[list, list[str]]:
    """``num_images`` PIL images of the run's data (and their names): the demo photographs in
    :data:`DEMO_ORDER` for a demo run, else a seeded choice from the image folder."""
    data_path = data_path if data_path is not None else args.get("data_path")
    if data_path is None:
        from .sample_data import sample_photographs

        photos = dict(sample_photographs(with_names=True, max_side=512))
        names = [n for n in DEMO_ORDER if n in photos] + [n for n in photos if n not in DEMO_ORDER]
        names = [names[k % len(names)] for k in range(num_images)]
        return [photos[n] for n in names], names
    from .data import ImageFolderDataset

    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"the run's data folder {data_path} is not here; pass --data_path DIR")
    folder = ImageFolderDataset(data_path)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(folder), size=num_images, replace=num_images > len(folder))
    images, names = [], []
    for i in picks:
        images.append(folder[int(i)])
        names.append(os.path.basename(folder.path(int(i))))
    return images, names


def _run_views(args: Mapping[str, Any], images: list,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """The run's two views of each image (no jitter or flip, crops of >= :data:`VIEW_MIN_SCALE` of the image)
    and a mask from the run's generator: ``(patch [B,3,S,S], tokenizer view [B,3,s,s], masks [B,N], means/stds)``."""
    from .masking import MaskingGenerator
    from .transforms import TwoViewConfig, TwoViewTransform

    input_size = int(args.get("input_size", 224))
    patch_size = int(args.get("patch_size", 16))
    grid = input_size // patch_size
    second = args.get("second_input_size") or grid * 8
    cfg = TwoViewConfig(input_size=input_size, second_input_size=int(second),
                        interpolation=args.get("train_interpolation", "bicubic"),
                        second_interpolation=args.get("second_interpolation", "lanczos"),
                        color_jitter=0.0, hflip_prob=0.0, scale=(VIEW_MIN_SCALE, 1.0),
                        imagenet_default_mean_and_std=bool(args.get("imagenet_default_mean_and_std", False)))
    transform = TwoViewTransform(cfg)
    masking = MaskingGenerator((grid, grid), int(args.get("num_mask_patches", 75)),
                               min_num_patches=int(args.get("min_mask_patches_per_block", 16)),
                               max_num_patches=args.get("max_mask_patches_per_block"),
                               fixed_count=bool(args.get("fixed_mask_count", False)))
    patches, views, masks = [], [], []
    for k, img in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            patch, view = transform(img)
        patches.append(patch)
        views.append(view)
        masks.append(torch.from_numpy(masking(np.random.default_rng([seed, k])).reshape(-1)))
    return torch.stack(patches), torch.stack(views), torch.stack(masks), [cfg.mean, cfg.std]


def _parse_only(only: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """(parts, explicit)"""
    if only is None or (isinstance(only, str) and only.strip() in ("", "all")):
        return list(PARTS), False
    items = [s.strip() for s in only.split(",")] if isinstance(only, str) else [str(s).strip() for s in only]
    items = [s for s in items if s]
    unknown = [s for s in items if s not in PARTS]
    if unknown or not items:
        raise ValueError(f"unknown picture(s) {unknown or items}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in items], True


def visualize_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, num_images: int = 4, seed: int = 0,
                  only: str | Sequence[str] | None = None, checkpoint: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None,
                  log_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dpi: int = DEFAULT_DPI, palette: bool = False, trust_pickle: bool = False) -> list[Path]:
    """Write the pictures of a pretraining output folder into ``out_dir``; returns the paths written.

    ``run_dir``: a ``python -m beit_fast.pretrain`` output folder. ``checkpoint``: default its newest
    (``checkpoint-last.pt``, else the highest ``checkpoint-N.pt``); the model, the run's flags and the
    tokenizer path come from it. ``tokenizer``: weights overriding the saved path. ``data_path``: an image
    folder overriding the run's (a demo run uses the scikit-image photographs). ``log_path``: default
    ``run_dir/log.jsonl``. ``only``: a subset of :data:`PARTS` (comma-separated or a list); by default all,
    skipping ``reconstruction`` with a warning when the tokenizer has no decoder (asked for explicitly, that
    is a ``ValueError``). Missing checkpoint / log / tokenizer: ``FileNotFoundError`` naming what is missing.
    The checkpoint is read safely (:func:`beit_fast.checkpoint.load_checkpoint`); ``trust_pickle=True``
    also reads one that pickles other objects, which can run code from the file: only for files you trust.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_dpi(dpi)
    parts, explicit = _parse_only(only)
    written: list[Path] = []
    log_file = Path(log_path) if log_path is not None else run_dir / "log.jsonl"
    if "curves" in parts and not log_file.is_file():
        raise FileNotFoundError(f"no log in {run_dir} (expected {log_file.name}, written by python -m "
                                "beit_fast.pretrain); use --only to skip the curves")
    image_parts = [p for p in parts if p != "curves"]
    if image_parts:
        device = torch.device(device)
        ckpt_path = _find_checkpoint(run_dir, checkpoint)
        state = _load_run_state(ckpt_path, trust_pickle)
        args = dict(state["args"])
        log.info("checkpoint %s (step %s)", ckpt_path, state.get("step"))
        images, names = _run_images(args, num_images, seed, data_path)
        patch, views, masks, (mean, std) = _run_views(args, images, seed)
        tok = model = None
        if "reconstruction" in image_parts or "predictions" in image_parts:
            from .tokenizer import build_tokenizer

            kind, tok_path = _find_tokenizer(state, run_dir, tokenizer)
            try:
                tok = build_tokenizer(kind, tok_path, device=device)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"cannot load the {kind} tokenizer from {tok_path}: {e}") from None
            log.info("tokenizer %s %s", kind, tok_path)
        if "mask" in image_parts:
            denorm = patch * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
            written.append(plot_mask(list(denorm.clamp(0, 1)), list(masks), out_dir / FILENAMES["mask"],
                                     patch_size=int(args.get("patch_size", 16)), title=names, dpi=dpi,
                                     palette=palette))
        if "reconstruction" in image_parts:
            if callable(getattr(tok, "decode_indices", None)) or explicit:
                written.append(plot_reconstruction(tok, views, out_dir / FILENAMES["reconstruction"], titles=names,
                                                   dpi=dpi, palette=palette))
            else:
                log.warning("skipping the reconstruction picture: the %s tokenizer has no decoder",
                            type(tok).__name__)
        if "predictions" in image_parts:
            model = _build_run_model(state, device)
            step = state.get("step")
            written.append(plot_predictions(model, tok, patch, views, masks, out_dir / FILENAMES["predictions"],
                                            titles=names, title=f"{ckpt_path.name} (step {step})", dpi=dpi,
                                            palette=palette))
    if "curves" in parts:
        written.append(plot_curves(log_file, out_dir / FILENAMES["curves"], title=f"{run_dir.name}: {log_file.name}",
                                   dpi=dpi, palette=palette))
    return written
