"""What every run configuration shares: built from argparse, defaults given once, problems as messages."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

from ..utils.options import DEFAULT_MAX_IMAGE_PIXELS, JPEG_DECODERS

__all__ = ["ClassificationData", "from_args", "defaults_of", "exit_on_problems", "adamw_first_step", "FLOAT32_MAX", "lr_overflow_problems",
           "positive_problems", "finite_problems", "jpeg_decoder_error", "seed_problems", "MAX_SEED"]

T = TypeVar("T")

#: Largest finite float32 (``torch.finfo(torch.float32).max``), without importing torch.
FLOAT32_MAX = 3.4028234663852886e38


def defaults_of(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass (for ``parser.set_defaults``: the flags' defaults are the config's)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config ``cls`` from parsed flags: each field from the flag with its name (dest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def exit_on_problems(problems: Iterable[str]) -> None:
    """``SystemExit("error: ...")`` listing every problem, one per line; nothing when there is none."""
    problems = list(problems)
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def adamw_first_step(lr: float, beta1: float) -> float:
    """The largest step AdamW takes at a learning rate ``lr``: its first, ``lr / (1 - beta1)`` (the bias
    correction divides by ``1 - beta1**t``). torch passes it to float32 kernels, so it must stay below
    float32's maximum (else: "value cannot be converted to type float without overflow")."""
    return lr / (1 - beta1)


def lr_overflow_problems(rates: dict[str, float | None], betas: tuple[float, float], prefix: str = "--") -> list[str]:
    """Learning rates whose first AdamW step does not fit in float32 (torch then fails deep in the optimizer)."""
    beta1 = betas[0]
    betas_ok = all(math.isfinite(b) and 0 <= b < 1 for b in betas)
    problems = []
    for name, value in rates.items():
        if value is None or not math.isfinite(value) or value < 0:
            continue  # reported elsewhere
        step = adamw_first_step(value, beta1) if betas_ok else value
        if step > FLOAT32_MAX:
            problems.append(f"{prefix}{name} {value:g} is too large: AdamW's first step size {name} / (1 - beta1) = "
                            f"{step:.3g} overflows float32 (max {FLOAT32_MAX:.3g})")
    return problems


def positive_problems(cfg: Any, names: Iterable[str], prefix: str = "--", strict: bool = True) -> list[str]:
    """``--name must be positive`` (``strict``) or ``must be >= 0`` for each of ``names`` that is not; None
    values pass (unset)."""
    problems = []
    for name in names:
        value = getattr(cfg, name)
        if value is not None and (value <= 0 if strict else value < 0):
            problems.append(f"{prefix}{name} must be {'positive' if strict else '>= 0'}, got {value}")
    return problems


def finite_problems(cfg: Any, names: Iterable[str], prefix: str = "--", nonnegative: Iterable[str] = ()) -> list[str]:
    """``--name must be a finite number`` for each of ``names`` that is not (None passes), and ``must be >= 0``
    for those in ``nonnegative`` that are negative."""
    nonnegative = set(nonnegative)
    problems = []
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not math.isfinite(value):
            problems.append(f"{prefix}{name} must be a finite number, got {value}")
        elif name in nonnegative and value < 0:
            problems.append(f"{prefix}{name} must be >= 0, got {value}")
    return problems


#: Largest --seed: torch's generators take a 64-bit seed, and runs derive per-epoch / per-rank seeds from it.
MAX_SEED = 2**63 - 1


def seed_problems(seed: int | None, prefix: str = "--") -> list[str]:
    """``--seed`` out of ``[0, MAX_SEED]``."""
    if seed is not None and seed < 0:
        return [f"{prefix}seed must be >= 0, got {seed}"]
    if seed is not None and seed > MAX_SEED:
        return [f"{prefix}seed must be at most 2**63 - 1 = {MAX_SEED}, got {seed}"]
    return []


def jpeg_decoder_error(value: str) -> str | None:
    """What is wrong with a ``jpeg_decoder`` setting (worded without the flag's dashes), or None."""
    if value not in JPEG_DECODERS:
        return f"jpeg_decoder must be {', '.join(JPEG_DECODERS[:-1])} or {JPEG_DECODERS[-1]}, got {value!r}"
    if value == "simplejpeg" and importlib.util.find_spec("simplejpeg") is None:
        return ("jpeg_decoder simplejpeg needs the simplejpeg package, which is not installed (pip install "
                "simplejpeg); auto or pil decodes with Pillow")
    return None


@dataclass
class ClassificationData:
    """The labelled data of fine-tuning and linear probing (their flags: ``options.add_classification_data_args``):
    ``data_path`` (``train/<class>/*``, ``val/<class>/*``; None: the embedded digits), the class count to
    expect, the model's input size, the eval crop, the normalisation, the digits' few-label setting, loader
    workers (``num_workers``; None: :func:`beit_fast.train.feed.default_num_workers` for the device), the pixel
    limit of image files and who decodes JPEGs (``jpeg_decoder``: auto, pil, simplejpeg)."""

    data_path: str | None = None
    nb_classes: int | None = None
    input_size: int | None = None
    crop_pct: float | None = None
    imagenet_default_mean_and_std: bool = False
    labels_per_class: int | None = None
    num_workers: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_decoder: str = "auto"
