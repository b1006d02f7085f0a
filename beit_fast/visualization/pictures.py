"""The pictures of images: (a) blockwise masks, (b) the tokenizer's reconstruction, (c) the model's
masked-token predictions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..utils.options import DEFAULT_DPI, PANEL_INCHES
from .figures import (
    _MASK_GREY,
    _TITLE_SIZE,
    _as_list,
    _cell,
    _check_dpi,
    _figure,
    _grey_out,
    _grid_lines,
    _mask_grid,
    _mask_list,
    _outline,
    _save,
    _show,
    _to_hwc,
)

# --------------------------------------------------------------------------------------------------------
# (a) masks
# --------------------------------------------------------------------------------------------------------
def plot_mask(image: Any, mask: Any, out: str | os.PathLike, *, patch_size: int | None = None,
              title: str | Sequence[str] | None = None, dpi: int = DEFAULT_DPI, palette: bool = False) -> Path:
    """Images with their blockwise masks: one column per image, the image with its patch grid on top and the
    image with the masked patches greyed out (outlined) below; the mask count in the title.

    ``image``: a PIL image, a ``[3, H, W]`` tensor in [0, 1], an ``[H, W, 3]`` array (float in [0, 1] or
    uint8), or a list of them (or a ``[B, 3, H, W]`` batch). ``mask``: bool ``[h, w]`` or ``[h * w]``
    (row-major, as :class:`~beit_fast.data.pretraining.PretrainDataset` yields), or a list / batch of them.
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

    from ..tokenizer.base import map_pixels

    items = _as_list(images)
    views = []
    for im in items:
        if isinstance(im, Image.Image):
            import torchvision.transforms.functional as TF

            from ..data.transforms import to_rgb

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
    from ..tokenizer.base import unmap_pixels

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
    from ..tokenizer.base import unmap_pixels

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
