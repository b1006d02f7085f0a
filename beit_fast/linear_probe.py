"""Linear probing of a frozen BEiT backbone (the paper's Table 9 protocol): ``python -m beit_fast.linear_probe``.

Average-pooled patch tokens of one block (``--layer``) or of every block (``--sweep``), a BatchNorm without
affine parameters and a linear classifier on cached features. Without ``--data_path``: scikit-learn's
handwritten digits. This module parses the flags into a :class:`beit_fast.config.ProbeConfig` and calls
:func:`beit_fast.train.probing.run_linear_probe` (torch is imported after parsing, so ``--help`` is instant).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file (python beit_fast/linear_probe.py): as with -m
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import beit_fast.linear_probe as _cli
    _cli.main()
    raise SystemExit(0)

import argparse

from .config import ProbeConfig, defaults_of, exit_on_problems, from_args
from .utils.logs import cli_logging
from .utils.options import ArgumentParser, MODEL_NAMES, HelpFormatter, add_classification_data_args

__all__ = ["get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        "python -m beit_fast.linear_probe",
        description="Linear probe of a frozen BEiT backbone on average-pooled patch tokens of one block (--layer) "
        "or of every block (--sweep). Without --data_path: scikit-learn's handwritten digits.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--finetune", 
                   help="pretrained checkpoint to probe (ours, official, HuggingFace/timm names); omitted = a randomly "
                   "initialised backbone (a baseline)")
    g.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="allow a --finetune checkpoint that pickles Python objects beyond tensors and plain values "
                   "(e.g. an official one with its argparse args): it is read with Python's full unpickler, which "
                   "can run arbitrary code stored in the file; only for files you trust")
    g.add_argument("--model", choices=MODEL_NAMES,
                   help="model size (default: the checkpoint's architecture, else demo tiny / real base)")
    g.add_argument("--patch_size", type=int, help="patch size (default: the checkpoint's)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--layer", type=int, 
                       help="block whose average-pooled output is probed, 1..depth (default: the last block)")
    which.add_argument("--sweep", action="store_true", help="probe every block and report the best")
    g.add_argument("--include_cls", action="store_true",
                   help="concatenate the [CLS] token to the average (the official run_linear_eval.py features)")
    add_classification_data_args(p)
    g = p.add_argument_group("probe")
    g.add_argument("--epochs", type=int, help="epochs of the linear classifier")
    g.add_argument("--lr", type=float, help="AdamW peak learning rate (cosine to 0)")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--batch_size", type=int, help="batch size of feature extraction and training")
    g.add_argument("--no_batchnorm", action="store_true", help="no BatchNorm (affine=False) before the linear layer")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", help="write linear_probe.json with the results here")
    g.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, help="seed of the classifier init, data order and data split")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(**defaults_of(ProbeConfig))  # the flags' defaults are the config's
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the linear probe with command-line flags ``argv``; returns the sweep result dict."""
    cfg = from_args(ProbeConfig, get_args_parser().parse_args(argv))
    exit_on_problems(cfg.problems())
    from .train.probing import run_linear_probe

    with cli_logging():
        return run_linear_probe(cfg)


if __name__ == "__main__":
    main()
