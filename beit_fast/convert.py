"""Convert a BEiT checkpoint between the official (= beit_fast), HuggingFace and timm layouts.

    python -m beit_fast.convert SRC DST [--to official|hf|timm] [--format pt|safetensors]

The source format is detected from the key names (``beit_fast.interop.detect_format``). See
``--help`` and INTEROP.md.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/convert.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.convert as _cli
    sys.exit(_cli.main())

import argparse
import json
import math
import sys
from pathlib import Path

from .utils.options import ArgumentParser

EPILOG = """\
formats:
  official   microsoft/unilm key names (= beit_fast's model): pretraining (lm_head, shared relative
             position bias) or fine-tuned classification (head, fc_norm, per-block tables). Torch files
             are written as {"model": state_dict}, like the official checkpoints.
  hf         HuggingFace transformers BEiT. A DST without a file suffix (or an existing directory) becomes
             a from_pretrained() directory: model.safetensors (or pytorch_model.bin) + config.json.
  timm       timm's Beit (beit_* models): classification/backbone only (no mask token, no MIM head).

  Segmentation checkpoints (backbone.* / decode_head.*: official mmseg = beit_fast.segment; or HF
  BeitForSemanticSegmentation) convert between official and hf as files; official torch files are written
  as {"state_dict": ...}, like mmseg's.

examples:
  python -m beit_fast.convert checkpoint-799.pth beit_hf/ --to hf
  python -m beit_fast.convert beit_hf/ beit_official.pth --to official
  python -m beit_fast.convert beit_ft.pth beit_timm.safetensors --to timm
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m beit_fast.convert",
        description="Convert a BEiT checkpoint (official/beit_fast, HuggingFace or timm; .pt/.pth/.bin, "
                    ".safetensors or an HF model directory) to another layout. The source format is detected "
                    "from its key names.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC",
                   help="source checkpoint: a torch file (.pt/.pth/.bin/.ckpt), a .safetensors file or an HF "
                        "model directory (model.safetensors / pytorch_model.bin, sharded or not)")
    p.add_argument("dst", metavar="DST",
                   help="output file (.pt/.pth/.bin or .safetensors), or with --to hf a directory for "
                        "from_pretrained() (no file suffix, or an existing directory)")
    p.add_argument("--to", choices=("official", "hf", "timm"), default="official",
                   help="target layout (default: official)")
    p.add_argument("--format", choices=("pt", "safetensors"), default=None,
                   help="output file format (default: from DST's suffix, .safetensors -> safetensors, else pt; "
                        "an HF directory defaults to safetensors)")
    p.add_argument("--from", dest="src_format", choices=("auto", "official", "hf", "hf_legacy", "timm"),
                   default="auto",
                   help="source format; 'auto' (default) detects it from the key names; a given one is "
                        "checked against the detection (hf and hf_legacy both mean HuggingFace, official and "
                        "timm share key names)")
    p.add_argument("--hf-naming", choices=("legacy", "modern"), default="legacy",
                   help="HF key names to write: 'legacy' (default) = the Hub / save_pretrained names "
                        "(beit.encoder.layer.N.attention.attention.query...), read by from_pretrained of "
                        "every transformers version; 'modern' = transformers >= 5 in-memory names "
                        "(beit.layers.N.attention.q_proj...) for model.load_state_dict")
    p.add_argument("--drop-mim-head", action="store_true",
                   help="with --to timm: drop mask_token and lm_head of a pretraining checkpoint (timm's Beit "
                        "has neither); without it such a conversion is refused")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for the HF config.json when they cannot be read off the "
                        "checkpoint (no relative position bias table)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image size, for the HF config.json when it cannot be read off the checkpoint")
    p.add_argument("--layer-norm-eps", type=float, default=None,
                   help="LayerNorm eps written to an HF config.json (state dicts do not store it). Default: "
                        "the source HF directory's config.json value when there is one, else 1e-6 (the "
                        "official value; HF's own default 1e-12 would change the outputs)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow torch files that pickle Python objects besides tensors (e.g. official training "
                        "checkpoints with their argparse args): they are read with Python's full unpickler, "
                        "which can run arbitrary code stored in the file; only for files you trust")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _is_dir_target(dst: Path) -> bool:
    return dst.is_dir() or dst.suffix == ""


def convert(args: argparse.Namespace) -> str:
    """Run one conversion; returns the summary line. Raises FileNotFoundError / FileExistsError /
    ValueError on bad input."""
    from .utils.checkpoint import CheckpointError, atomic_write_text
    from .interop.checkpoints import (
        convert_state_dict, detect_format, detect_layout, hf_config_from_state_dict, load_state_dict,
        save_state_dict,
    )
    from .interop.conversion import same_family

    for flag, value in (("--num-heads", args.num_heads), ("--img-size", args.img_size)):
        if value is not None and not 0 < value <= 1 << 16:
            raise ValueError(f"{flag} must be a positive integer (at most 65536), got {value}")
    eps = args.layer_norm_eps
    if eps is not None and not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"--layer-norm-eps must be a finite number in (0, 1), got {eps}")
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise FileNotFoundError(f"SRC not found: {src}")
    sd = load_state_dict(src, trust_pickle=args.trust_pickle)
    from .interop.segmentation_keys import is_segmentation_state_dict

    if is_segmentation_state_dict(sd):
        return _convert_segmentation(args, src, dst, sd)
    detected = detect_format(sd)
    if args.src_format != "auto" and not same_family(args.src_format, detected):
        raise ValueError(f"--from {args.src_format}: but {src} looks like {detected!r}")
    layout = detect_layout(sd, detected)

    target = args.to
    if target == "hf":
        target = "hf_legacy" if args.hf_naming == "legacy" else "hf"
    out = convert_state_dict(sd, target, drop_mim_head=args.drop_mim_head)

    hf_dir = args.to == "hf" and _is_dir_target(dst)
    if not hf_dir and _is_dir_target(dst):
        raise ValueError(f"DST {dst} is a directory (or has no file suffix): give a .pt/.pth/.bin/.safetensors file")
    if hf_dir:
        fmt = args.format or "safetensors"
        weights = dst / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
        targets = [weights, dst / "config.json"]
    else:
        fmt = args.format or ("safetensors" if dst.suffix == ".safetensors" else "pt")
        targets = [dst]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")

    if hf_dir:
        src_config = {}
        if src.is_dir() and (src / "config.json").is_file():
            src_config = json.loads((src / "config.json").read_text())
        eps = args.layer_norm_eps
        if eps is None:
            eps = src_config.get("layer_norm_eps", 1e-12) if src_config else 1e-6
        num_heads = args.num_heads or src_config.get("num_attention_heads")
        src_image = src_config.get("image_size")
        img_size = args.img_size or (src_image if isinstance(src_image, int) else None)
        config = hf_config_from_state_dict(out, num_heads=num_heads, img_size=img_size, layer_norm_eps=eps)
        arch = {"pretrain": "BeitForMaskedImageModeling", "classification": "BeitForImageClassification",
                "backbone": "BeitModel"}[layout]
        config.architectures = [arch]
        try:
            dst.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the folder {dst}: {e.strerror or e}") from None
        save_state_dict(out, weights, format=fmt)
        atomic_write_text(dst / "config.json", config.to_json_string())
    else:
        wrap = "model" if (args.to == "official" and fmt == "pt") else None
        save_state_dict(out, dst, format=fmt, wrap=wrap)
    naming = {"hf_legacy": "HF, Hub names", "hf": "HF, transformers>=5 names"}.get(target, target)
    return (f"{src} ({detected}, {layout} layout, {len(sd)} tensors) -> {dst} ({naming}, {fmt}, "
            f"{len(out)} tensors)")


def _convert_segmentation(args: argparse.Namespace, src: Path, dst: Path, sd: dict) -> str:
    """A segmentation state dict (official mmseg / ours, or HF ``BeitForSemanticSegmentation``) to a file."""
    from .interop.checkpoints import save_state_dict
    from .interop.segmentation_keys import convert_segmentation_state_dict, detect_segmentation_format

    detected = detect_segmentation_format(sd)
    if args.to == "timm":
        raise ValueError("timm has no segmentation model: use --to official or --to hf")
    if args.src_format not in ("auto", detected) and {args.src_format, detected} != {"hf", "hf_legacy"}:
        raise ValueError(f"--from {args.src_format}: but {src} looks like {detected!r}")
    if _is_dir_target(dst):
        raise ValueError(f"DST {dst}: a segmentation checkpoint converts to a file (.pt/.pth/.bin/.safetensors); an HF "
                         "config cannot be read off its weights (HF's out_indices differ from the official ones, "
                         "see beit_fast.interop.segmentation_keys.hf_config_for)")
    target = "official" if args.to == "official" else ("hf_legacy" if args.hf_naming == "legacy" else "hf")
    out = convert_segmentation_state_dict(sd, target)
    fmt = args.format or ("safetensors" if dst.suffix == ".safetensors" else "pt")
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    save_state_dict(out, dst, format=fmt, wrap="state_dict" if (target == "official" and fmt == "pt") else None)
    return f"{src} ({detected} segmentation, {len(sd)} tensors) -> {dst} ({target}, {fmt}, {len(out)} tensors)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .utils.checkpoint import CheckpointError

    try:
        summary = convert(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
