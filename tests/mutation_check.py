"""Mutation check: plant plausible bugs one at a time and make sure the tests catch every one.

Each mutation replaces one exact snippet of source text (it must occur exactly once, else the list is stale
and the check fails) in a temporary copy of the tree (beit_fast/, kernels/, tests/, the root conftest and
pytest.ini), runs the tests named for it there, and counts it caught when they fail (pytest exit 1). A
mutation that breaks collection or import (any other non-zero exit) is an error of the list, not a catch.
The unmutated copy is run first on the union of the selected tests: they must pass, or a "catch" would
prove nothing.

    python tests/mutation_check.py            # the whole list (several minutes on 2 cores)
    python tests/mutation_check.py --fast     # the CI subset (tests/test_mutation_check.py runs it)
    python tests/mutation_check.py --list     # names only
    python tests/mutation_check.py --only triton-fwd-scale-x0 model-scale-x1.01

Exit status 0 only when every selected mutation is caught. Run the whole list before each change that
touches the kernels, the fused ops or the model's fast path; add a mutation when adding such code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("beit_fast", "kernels", "tests", "conftest.py", "pytest.ini")

# the model-level tests the mutations are checked against (not only the kernel tests)
STEP_MATH = "tests/test_fast_step.py::test_fast_eager_matches_reference[2-math-False]"
STEP_TRITON_ATTN = "tests/test_fast_step.py::test_fast_triton_attention_matches_reference"
STEP_TRITON_OPS = "tests/test_fast_step.py::test_fast_triton_kernels_match_reference"
FT_MATH = "tests/test_finetune_fast.py::test_fast_matches_eager_step[math-nockpt-mixup]"
FT_TRITON = "tests/test_finetune_fast.py::test_fast_matches_eager_step[triton-nockpt-mixup]"
TABLES = "tests/test_ops_attention_triton.py::test_classifier_tables_match_reference"
TIMM = "tests/test_interop_timm.py::test_logits_and_gradients_match_unpatched[per_block-sdpa]"
HF = "tests/test_interop_hf.py::test_classification_logits_loss_and_gradients_match[True]"
SPEC = "tests/test_model.py::test_eager_models_are_the_spec_in_fp64"
BF16_RULE = ("tests/test_finetune_fast.py::test_fast_step_bf16_flash_attention_rule",
             "tests/test_fast_step.py::test_fast_step_bf16_close_to_fp32_reference")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids, run in the mutated copy
    fast: bool = False  # in the CI subset


MUTATIONS: tuple[Mutation, ...] = (
    # --- the Triton attention kernels -------------------------------------------------------------------
    Mutation("triton-fwd-scale-x0", "kernels/attention_forward.py",
             "qk_scale = sm_scale * LOG2E", "qk_scale = sm_scale * 0.0", (STEP_TRITON_ATTN,)),
    Mutation("triton-fwd-table-bias-dropped", "kernels/attention_forward.py",
             "        if BIAS_MODE != 0:\n            s += _bias_tile(",
             "        if BIAS_MODE == 99:\n            s += _bias_tile(", (STEP_TRITON_ATTN, TABLES)),
    Mutation("triton-bwd-dq-scale-dropped", "kernels/attention_backward.py",
             "_cast(dq * sm_scale,", "_cast(dq,", (STEP_TRITON_ATTN,)),
    Mutation("triton-bwd-dk-scale-x1.01", "kernels/attention_backward.py",
             "_cast(dk * sm_scale,", "_cast(dk * sm_scale * 1.01,", (STEP_TRITON_ATTN,)),
    Mutation("triton-table-grad-group-dropped", "kernels/attention_backward.py",
             "for g in range(0, G):", "for g in range(0, G - 1):", (TABLES,)),
    Mutation("triton-dkdv-index-not-transposed", "kernels/attention_backward.py",
             "_bias_tile(bias_base, table_base, INDEX_T, offs_n, offs_m,",
             "_bias_tile(bias_base, table_base, INDEX, offs_n, offs_m,", (TABLES,)),
    # --- the fused patch embedding and loss kernels ----------------------------------------------------
    Mutation("triton-embed-mask-token-skipped", "kernels/patch_embed_forward.py",
             "acc = tl.where(masked[:, None], tok[None, :], acc)", "acc = acc", (STEP_TRITON_OPS,)),
    Mutation("triton-ce-ignored-rows-counted", "kernels/cross_entropy.py",
             "loss = tl.where(valid, lse - x_label, 0.0)", "loss = lse - x_label", (STEP_TRITON_OPS,)),
    Mutation("triton-ce-ignored-rows-gradient", "kernels/cross_entropy.py",
             "scale = tl.where(valid, scale, 0.0)", "scale = scale + 0.0", (STEP_TRITON_OPS,)),
    # --- the model and its fast path -------------------------------------------------------------------
    Mutation("model-scale-x1.01", "beit_fast/model/beit.py",
             "self.scale = head_dim**-0.5", "self.scale = head_dim**-0.5 * 1.01", (SPEC, FT_MATH, TABLES),
             fast=True),
    Mutation("model-scale-x1.01-bf16", "beit_fast/model/beit.py",  # the bf16 rule alone sees it too
             "self.scale = head_dim**-0.5", "self.scale = head_dim**-0.5 * 1.01", BF16_RULE),
    Mutation("model-q-bias-dropped", "beit_fast/model/beit.py",
             "bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))",
             "bias = torch.cat((0 * self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))", (STEP_MATH,)),
    Mutation("model-mask-token-skipped", "beit_fast/model/beit.py",
             "x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w", "x = x + 0 * w", (SPEC, STEP_MATH),
             fast=True),
    Mutation("ops-embed-reference-mask-token-skipped", "beit_fast/ops/patch_embed.py",
             "return (x * (1 - w) + mask_token * w).to(x.dtype)", "return x", (STEP_MATH,)),
    Mutation("model-layerscale-dropped", "beit_fast/model/beit.py",
             "return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))",
             "return x + self.drop_path(self.mlp(self.norm2(x)))", (SPEC, STEP_MATH, FT_MATH)),
    Mutation("rel-pos-cls-key-index", "beit_fast/ops/rel_pos.py",
             "index[:, 0] = num_table - 2", "index[:, 0] = num_table - 3", (SPEC, STEP_MATH, FT_MATH)),
    Mutation("mim-loss-padded-rows-counted", "beit_fast/train/loss.py",
             "labels = tokens.gather(1, index).masked_fill(~real, IGNORE_INDEX).reshape(-1)",
             "labels = tokens.gather(1, index).reshape(-1)", (STEP_MATH,), fast=True),
    Mutation("ops-ce-reference-accuracy-over-all-rows", "beit_fast/ops/cross_entropy.py",
             "        accuracy = correct / denom\n", "        accuracy = correct / y.numel()\n", (STEP_MATH,)),
    # --- the HF / timm patches -------------------------------------------------------------------------
    Mutation("timm-patch-scale-x1.01", "beit_fast/interop/timm.py",
             "scale=self.scale, backend=self._beit_fast_attention", "scale=self.scale * 1.01, "
             "backend=self._beit_fast_attention", (TIMM,)),
    Mutation("hf-patch-scale-x1.01", "beit_fast/interop/hf.py",
             "scale=self.scaling, backend=self._beit_fast_attention",
             "scale=self.scaling * 1.01, backend=self._beit_fast_attention", (HF,)),
)


def copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".hypothesis"))
        else:
            shutil.copy2(src, dest / name)


def run_pytest(tree: Path, tests, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    lines = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode, lines[-1] if lines else ""


def check(mutations, timeout: float = 600.0, baseline: bool = True, out=sys.stdout) -> dict[str, str]:
    """Run each mutation; returns {name: "caught" | "SURVIVED" | "STALE" | "ERROR ..."}."""
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="beit_fast_mutation_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        probe = subprocess.run([sys.executable, "-c", "import beit_fast; print(beit_fast.__file__)"], cwd=tree,
                               capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(tree)):
            raise RuntimeError(f"the copy imports another beit_fast: {probe.stdout.strip() or probe.stderr}")
        if baseline:
            tests = sorted({t for m in mutations for t in m.tests})
            rc, last = run_pytest(tree, tests, timeout)
            print(f"baseline (unmutated, {len(tests)} tests): rc {rc}, {last}", file=out, flush=True)
            if rc != 0:
                raise RuntimeError("the selected tests fail without any mutation: fix them first")
        for m in mutations:
            target = tree / m.path
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                results[m.name] = f"STALE (snippet found {count} times in {m.path})"
            else:
                target.write_text(original.replace(m.old, m.new))
                t0 = time.perf_counter()
                try:
                    rc, last = run_pytest(tree, m.tests, timeout)
                finally:
                    target.write_text(original)
                results[m.name] = ("caught" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR rc {rc}")
                results[m.name] += f" ({time.perf_counter() - t0:.0f} s: {last})"
            print(f"{m.name:40s} {results[m.name]}", file=out, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the CI subset")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these mutations")
    parser.add_argument("--list", action="store_true", help="print the mutation names and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.fast or m.fast]
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s) {sorted(unknown)}; --list shows the names")
        chosen = [m for m in chosen if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.path}  ->  {', '.join(m.tests)}")
        return 0
    results = check(chosen, args.timeout, baseline=not args.no_baseline)
    missed = [n for n, r in results.items() if not r.startswith("caught")]
    print(f"{len(results) - len(missed)}/{len(results)} mutations caught"
          + (f"; not caught: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
