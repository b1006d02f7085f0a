"""Names, defaults and argparse pieces shared by the command-line programs and the library.

Plain Python only (no torch, numpy or PIL): a CLI builds its parser from these and answers ``--help``
without importing torch; the library modules take the same values from here, so each is defined once.
"""
from __future__ import annotations

import argparse

__all__ = [
    "HelpFormatter", "MODEL_NAMES", "DVAE_PRESET_NAMES", "DVAE_RECOMMENDED_LR", "RESIZE_FILTERS",
    "PICTURE_PARTS", "PANEL_INCHES", "DEFAULT_DPI",
    "add_classification_data_args", "DEFAULT_MAX_IMAGE_PIXELS", "JPEG_DECODERS", "JPEG_DECODER_HELP",
    "ArgumentParser", "TORCH_ZIP_MAGIC", "torch_file_problem",
]

#: The first bytes of torch's zip format (what ``torch.save`` writes since torch 1.6).
TORCH_ZIP_MAGIC = b"PK\x03\x04"


def torch_file_problem(flag: str, path: str, what: str = "checkpoint") -> str | None:
    """Why the file ``path`` given as ``flag`` cannot be a torch file (a checkpoint, a tokenizer's weights), told
    from its first bytes before any work is done; None when it may be one (or is not a file: the caller says
    "not found"). torch writes a zip archive (``PK\\x03\\x04``) or, in its legacy format and for DALL-E's
    ``encoder.pkl``, a pickle (protocol >= 2 starts with ``\\x80``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except IsADirectoryError:
        return f"{flag} {path} is a folder, not a {what} file"
    except OSError as e:
        return None if isinstance(e, FileNotFoundError) else f"{flag} {path}: cannot be read ({e.strerror or e})"
    if head.startswith(TORCH_ZIP_MAGIC) or head[:1] == b"\x80":
        return None
    if not head:
        return f"{flag} {path} is empty: not a {what}"
    return (f"{flag} {path} is not a {what}: no zip archive (torch.save's format) and no pickle header "
            f"(its first bytes are {head!r})")

#: Named model sizes: the keys of :data:`beit_fast.model.beit.MODEL_CONFIGS` (a test checks they agree).
MODEL_NAMES: tuple[str, ...] = ("base", "large", "small", "tiny")

#: Images with more pixels than this are skipped (read off the header, before decoding): 64 Mpx, 8192 x 8192,
#: far above photographs of ImageNet-like data sets, below what exhausts a data worker's memory once decoded
#: to RGB (a 12000 x 12000 PNG of a few KB would take 432 MB). Pillow's own limit only warns up to 179 Mpx.
#: (beit_fast.data.image_folder's limit; pretrain's --max_image_pixels default.)
DEFAULT_MAX_IMAGE_PIXELS = 2**26

#: JPEG decoders of the image folders (--jpeg_decoder; beit_fast.data.image_folder.ImageFolderDataset's ``jpeg_decoder``).
JPEG_DECODERS: tuple[str, ...] = ("auto", "pil", "simplejpeg")
JPEG_DECODER_HELP = ("who decodes JPEG files. simplejpeg: the faster libjpeg-turbo binding, for baseline/progressive "
                     "YCbCr and greyscale JPEGs (Pillow's pixels bit for bit), Pillow for all other files and for "
                     "any file simplejpeg finds a problem in; pil: Pillow only; auto: simplejpeg where installed "
                     "(pip install simplejpeg), else pil")

#: Named dVAE presets: the keys of :data:`beit_fast.tokenizer.dvae.PRESETS` (a test checks they agree).
DVAE_PRESET_NAMES: tuple[str, ...] = ("default", "tiny")
#: Peak AdamW learning rates used when ``--lr`` is not given. tiny: tuned (1e-2 collapsed to 4 codes for
#: one of three seeds, 2e-2 to one code); default: a conservative untuned value.
DVAE_RECOMMENDED_LR: dict[str, float] = {"default": 1e-3, "tiny": 5e-3}

#: Resize filters of the fine-tuning transforms: flag value -> torchvision ``InterpolationMode`` name.
RESIZE_FILTERS: dict[str, str] = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST",
                                  "lanczos": "LANCZOS", "box": "BOX", "hamming": "HAMMING"}

#: The pictures ``beit_fast.visualization.visualize_run`` can make, in order.
PICTURE_PARTS: tuple[str, ...] = ("mask", "reconstruction", "predictions", "curves")
#: Side of one image panel of those pictures, inches (x dpi = pixels).
PANEL_INCHES = 2.0
DEFAULT_DPI = 100

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a short error: the message and one line pointing to ``--help``, not the whole
    usage (which is about 50 lines for ``beit_fast.pretrain`` and buries the one line that matters)."""

    def error(self, message: str):  # argparse's contract: prints and exits with status 2
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for every flag and its default.\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus its repetitions: it appends ``(default: X)`` only to flags
    whose help does not already say what the default is, and not for a default of ``None`` or ``False``
    (an unset value the help explains, or a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_classification_data_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data flags of ``beit_fast.finetune`` and ``beit_fast.linear_probe``."""
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="folder with train/<class>/* and val/<class>/* images (torchvision ImageFolder's layout, read "
                   "like pretraining's image folders); omit for the embedded default, scikit-learn's handwritten "
                   "digits")
    g.add_argument("--nb_classes", type=int, default=None,
                   help="number of classes (default: from the data); must match the data's")
    g.add_argument("--input_size", type=int, default=None, help="image size fed to the model (demo 32 / real 224)")
    g.add_argument("--crop_pct", type=float, default=None,
                   help="eval: resize to input_size / crop_pct, then center-crop input_size (demo 1.0 / real "
                   "224/256 below 384 px, 1.0 from 384 px)")
    g.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise with ImageNet mean/std instead of the official 0.5/0.5")
    g.add_argument("--labels_per_class", type=int, default=None,
                   help="digits only: keep this many labelled training images per class (few-label setting)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes, persistent across epochs (default: on CUDA the cores available "
                   "to the process, shared among the node's processes, less one; 0 on CPU, where the step's threads "
                   "use the cores)")
    g.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images with more pixels (read from the file header before decoding) are skipped, like "
                   "unreadable ones: a guard against decompression bombs")
    g.add_argument("--jpeg_decoder", choices=JPEG_DECODERS, default="auto", help=JPEG_DECODER_HELP)
    return g
