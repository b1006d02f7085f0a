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
the run's :class:`~beit_fast.data.masking.MaskingGenerator` settings) but without colour jitter or flips and
with crops of at least 35% of the image, so that the pictures show recognisable content; they are drawn
from the run's ``--data_path`` (or ``--data_path`` given here) or, for the embedded demo, from the
scikit-image photographs. Everything is seeded (``--seed``): the same command draws the same pictures.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (no ``pyplot``, no global
backend switch) at a fixed size: every panel is :data:`PANEL_INCHES` square (curves:
:data:`CURVE_PANEL_INCHES`), so a PNG is exactly ``columns x panel x dpi`` by ``rows x panel x dpi``
pixels. ``palette=True`` (``--palette``) stores 256-colour PNGs, about a third of the size, for READMEs.
"""
from __future__ import annotations


from ..utils.options import PANEL_INCHES
from .curves import CURVE_PANEL_INCHES, plot_curves, read_log
from .pictures import mim_predictions, plot_mask, plot_predictions, plot_reconstruction
from .run import FILENAMES, PARTS, visualize_run

__all__ = [
    "PARTS", "FILENAMES", "PANEL_INCHES", "CURVE_PANEL_INCHES", "plot_mask", "plot_reconstruction",
    "plot_predictions", "plot_curves", "mim_predictions", "read_log", "visualize_run",
]

