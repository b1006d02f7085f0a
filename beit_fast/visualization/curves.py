"""(d) Training curves: loss, accuracy and learning rate against the step, from a JSON-lines log."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..utils.options import DEFAULT_DPI
from .figures import _TITLE_SIZE, _check_dpi, _figure, _save

#: (width, height) of one panel of the curves figure (loss | accuracy | learning rate), inches.
CURVE_PANEL_INCHES = (3.0, 2.5)


_X_KEYS = ("step", "global_step", "iteration", "epoch")
_SKIP_KEYS = {"loss_scale", "min_lr", "weight_decay", "grad_norm", "images_per_s", "step_time_s",
              "skipped_images", "rss_mb"}


def read_log(log_path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (lines that are not JSON objects, e.g. one cut off by a kill or one
    nested too deeply to parse, are skipped). A missing file raises ``FileNotFoundError``."""
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
            except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
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
