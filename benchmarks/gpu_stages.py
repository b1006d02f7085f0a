"""Run one stage of ``gpu_report.py`` in this process; it appends rows (JSON lines) to ``--rows``.

    python benchmarks/gpu_stages.py step --variants beit_fast_triton,beit_fast_sdpa,reference_eager --rows FILE
    python benchmarks/gpu_stages.py attention_table --candidates math,sdpa,triton --rows FILE
    python benchmarks/gpu_stages.py attention --candidates math,sdpa,triton,cudnn --rows FILE   # dense bias
    python benchmarks/gpu_stages.py kernels --rows FILE          # CE chunk sweep, patch embedding
    python benchmarks/gpu_stages.py fp8 --rows FILE              # FP8 step + its loss curve
    python benchmarks/gpu_stages.py finetune --variants ft_eager,ft_beit_fast --rows FILE   # fine-tuning step

Each stage is a module of ``benchmarks/stages/`` (``stage_<name>(args, writer) -> exit code``); the step
variants are listed in ``stages/variants.py``. On CUDA: BEiT-B/16 sizes, bf16 autocast; on CPU (the tests,
``gpu_report.py --cpu-smoke``): tiny sizes, inductor compiles on the CPU (``BEIT_FAST_SMOKE_NO_COMPILE=1``
replaces every torch.compile by the eager module).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_lib import RowWriter  # noqa: E402

STAGES = ("env", "step", "attention", "attention_table", "kernels", "fp8", "finetune")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--rows", default=None, help="append result rows (JSON lines) to this file")
    p.add_argument("--batch", type=int, default=None, help="batch of the step stages (CUDA default 256)")
    p.add_argument("--variants", default="beit_fast", help="step (or fine-tuning step) variants (stages/variants.py)")
    p.add_argument("--extras", default="", help="on the beit_fast rows: sync_free,profile,curve (stages/step.py)")
    p.add_argument("--profile-out", default=None, help="write the profiler's tables here")
    p.add_argument("--curve-steps", type=int, default=150, help="steps of the bf16/fp8 loss curves")
    p.add_argument("--candidates", default="math,sdpa,triton,cudnn", help="attention candidates")
    p.add_argument("--shapes", default=None, help="attention shapes BxHxNxDh,... (CUDA: 256x12x197x64,64x12x577x64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median and spread)")
    args = p.parse_args(argv)
    module = importlib.import_module(f"stages.{args.stage}")
    return getattr(module, f"stage_{args.stage}")(args, RowWriter(args.rows))


if __name__ == "__main__":
    sys.exit(main())
