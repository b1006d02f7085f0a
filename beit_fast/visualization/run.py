"""The pictures of a whole pretraining output folder: its checkpoint, tokenizer, data views and log."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config.base import MAX_SEED
from ..utils.options import DEFAULT_DPI, PICTURE_PARTS
from .curves import plot_curves
from .figures import _check_dpi
from .pictures import plot_mask, plot_predictions, plot_reconstruction

log = logging.getLogger("beit_fast.visualization")

#: The pictures :func:`visualize_run` can make, in order, and their file names.
PARTS = PICTURE_PARTS
FILENAMES = {"mask": "mask.png", "reconstruction": "tokenizer_reconstruction.png",
             "predictions": "predictions.png", "curves": "curves.png"}
#: Smallest crop (fraction of the image area) of the pictured views; training uses 0.08.
VIEW_MIN_SCALE = 0.35
#: Demo photographs in the order they are pictured (colourful, recognisable ones first).
DEMO_ORDER = ("astronaut", "chelsea", "coffee", "motorcycle", "rocket", "immunohistochemistry", "retina",
              "camera", "coins", "moon", "clock", "cell", "brick", "grass", "gravel", "hubble_deep_field")


#: Most images one picture shows.
MAX_IMAGES = 64


def _find_checkpoint(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path:
    from ..train.checkpoint_folder import list_checkpoints

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
    """The checkpoint's state, its model_config checked (:func:`beit_fast.utils.limits.check_beit_config`)
    before anything is built from it."""
    from ..utils.checkpoint import CheckpointError, extract_model_state, load_checkpoint
    from ..utils.limits import check_beit_config

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
    if not isinstance(state["model_config"], dict) or not isinstance(extract_model_state(state), dict):
        raise ValueError(f"{path} is not a beit_fast pretraining checkpoint (model_config and model are not dicts)")
    check_beit_config(state["model_config"], extract_model_state(state).values(), str(path))
    state["_path"] = str(path)
    return state


def _build_run_model(state: dict, device: torch.device):
    from ..utils.checkpoint import extract_model_state
    from ..model.beit import BeitConfig, VisionTransformerForMaskedImageModeling

    try:
        cfg = BeitConfig(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{state['_path']}: model_config: {e}") from None
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
        from ..data.samples import sample_photographs

        photos = dict(sample_photographs(with_names=True, max_side=512))
        names = [n for n in DEMO_ORDER if n in photos] + [n for n in photos if n not in DEMO_ORDER]
        names = [names[k % len(names)] for k in range(num_images)]
        return [photos[n] for n in names], names
    from ..data.image_folder import ImageFolderDataset

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
    from ..data.masking import MaskingGenerator
    from ..data.transforms import TwoViewConfig, TwoViewTransform

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
        raise ValueError(f"only: unknown picture(s) {unknown or items}; choose from {', '.join(PARTS)}")
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
    The checkpoint is read safely (:func:`beit_fast.utils.checkpoint.load_checkpoint`); ``trust_pickle=True``
    also reads one that pickles other objects, which can run code from the file: only for files you trust.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if not isinstance(num_images, int) or num_images > MAX_IMAGES:
        raise ValueError(f"num_images must be at most {MAX_IMAGES} (one picture holds them all), got {num_images!r}")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device ({e})") from None
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
            from ..tokenizer import build_tokenizer

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
