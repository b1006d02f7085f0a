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

from importlib import import_module
from typing import Any

from ..options import PANEL_INCHES
from .curves import CURVE_PANEL_INCHES, plot_curves, read_log
from .pictures import mim_predictions, plot_mask, plot_predictions, plot_reconstruction
from .run import FILENAMES, PARTS, visualize_run

__all__ = [
    "PARTS", "FILENAMES", "PANEL_INCHES", "CURVE_PANEL_INCHES", "plot_mask", "plot_reconstruction",
    "plot_predictions", "plot_curves", "mim_predictions", "read_log", "visualize_run",
]

# The other names this module defined before it became a package (helpers and constants), still importable
# from here, resolved on first use (PEP 562).
_MOVED = {
    "figures": ("_MASK_GREY", "_TITLE_SIZE", "_figure", "_save", "_check_dpi", "_to_hwc", "_mask_grid", "_cell",
                "_grey_out", "_outline", "_grid_lines", "_show", "_as_list", "_mask_list"),
    "pictures": ("_titles", "_require_decoder", "_tokenizer_views", "_as_batch"),
    "curves": ("_X_KEYS", "_SKIP_KEYS", "_numeric", "_series", "_kind"),
    "run": ("log", "VIEW_MIN_SCALE", "DEMO_ORDER", "_find_checkpoint", "_load_run_state", "_build_run_model",
            "_find_tokenizer", "_run_images", "_run_views", "_parse_only"),
}


def __getattr__(name: str) -> Any:
    for module, names in _MOVED.items():
        if name in names:
            return getattr(import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
