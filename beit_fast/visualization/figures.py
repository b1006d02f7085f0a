"""Figure helpers of the pictures: a fixed-size Agg figure, PNG writing, images and masks as arrays, panels."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MASK_GREY = 0.5
_TITLE_SIZE = 8


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
        from ..data.transforms import to_rgb

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
