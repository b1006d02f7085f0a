"""A lent GPU's quarter-hour, in plans ordered by value: every number that matters, written as it is measured.

    python benchmarks/gpu_report.py --dry-plan                   # the plans, planned seconds per card (no GPU)
    python benchmarks/gpu_report.py --plan 1 --out $OUT          # call 1: <= 540 s on an H100
    python benchmarks/gpu_report.py --plan 2 --budget 400        # call 2, in what is left of the session
    python benchmarks/gpu_report.py --only attention_table,steps # some stages (names: --dry-plan)
    python benchmarks/gpu_report.py --cpu-smoke --plan 1         # the same stages at tiny sizes on CPU, compiling

Each stage is its own process (``benchmarks/gpu_stages.py`` and ``benchmarks/stages/``, or a test/bench
script), killed at its limit (cut to what is left of ``--budget``); a stage that would start with less than its
minimum left is skipped and named in the report. The rows it wrote before a crash or a kill are kept, and the
report (``benchmarks/results/<date>-<card>-plan<N>.{md,json,log,profile.txt}`` + LATEST.md, copied to
``--out``) is rewritten after every stage. Nothing is installed from a network: wheels the device image
lacks are carried in ``.whl/`` (``benchmarks/fetch_gpu_wheels.sh``) and installed with ``pip --target``
into a folder put on PYTHONPATH. beit_fast runs from this source tree through a folder holding only a link
to ``beit_fast/`` (``beit_fast/kernels`` is itself a link to ``kernels/``): the repository root is never on
PYTHONPATH, so the top-level ``kernels/`` folder cannot shadow PyPI's ``kernels`` package.

Plans (``--dry-plan`` prints them with each stage's planned seconds on an H100 and an H200 and its limit).
Compile time is the cost that cannot be measured away: every whole-step compile costs 30-60 s of CPU time
(the same on both cards); the stages compile each variant once in one process (mode "default" except the
autotune row), time it there, and report what the compile cost (``setup_s`` of each row). No warm-up stage:
a stage that only fills inductor's caches pays for itself only if the same variant is compiled again in the
same call, and none is. Stages run one at a time, so none is capped to a share of the card's memory (the
eager reference peaks at 28.8 GiB at batch 256; an H100 has 80 GB).

  1  the numbers that decide (H100 <= 540 s): environment; the CUDA correctness tests of our Triton attention
     (table and dense bias, bf16/fp16, BEiT-B shapes at N 197 and 577); attention candidates on the model's
     table path, forward + backward incl. the table gradient, each checked against an fp32 reference (so the
     autotuner's choices are checked at the real shapes), and each of our kernels alone with the autotuner's
     choice (B256/N197, B64/N577); the headline step table in one process (beit_fast with
     attention triton and sdpa, the eager reference, HF eager SDPA, HF patched, timm compiled + our head,
     HF compiled) and the profile of the fastest of our steps.
  2  fine-tuning step vs eager and timm compiled; end to end (--data_pipeline pil vs gpu).
  3  tokenizer; HF patched compiled vs HF compiled; the step's options (sync-free, CUDA graphs) and FP8 with
     its loss curve.
  4  GEMM autotuning (max-autotune-no-cudagraphs); the remaining GPU tests; the dense-bias attention
     candidates (cuDNN, FlexAttention and its tile ladder); CE chunk sweep and patch embedding.

A session has 15 minutes of device time, start-up (about 1.5 min) included: call 1, then call 2 with
``--budget`` set to what is left (its stages run in order until the budget ends); plans 3 and 4 belong to
later sessions. With the device tool, after ``bash benchmarks/fetch_gpu_wheels.sh`` here:
``run(command="python3 benchmarks/gpu_report.py --plan 1 --out $OUT", carry=[".whl"], timeout_s=600)``;
then commit the files that come back into ``benchmarks/results/`` (card, versions and date are in them). Option rows (sync-free, CUDA graphs, autotune, FP8) are compared with a beit_fast row of the
same call: their stages measure it first.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from report_lib import (  # noqa: E402
    Stage,
    StageResult,
    attention_backends,
    propose_auto_priority,
    read_rows,
    run_stage,
    summary_lines,
    write_report,
)

WHEEL_DIR = ROOT / ".whl"
# what benchmarks/fetch_gpu_wheels.sh downloads (not xformers: no wheel loads with torch 2.11 + CUDA 13)
CARRIED_WHEELS = ("torchao", "nvidia-cudnn-frontend")
COMMAND_LIMIT_S = 540  # a plan's planned seconds on an H100 fit this (the device's command limit is 600 s)
SETUP_S = {"H100": 15, "H200": 15}  # wheels, source link, imports: before the first stage
SESSION_S, START_S = 900, 90  # a session's device time; a machine's start-up, out of it
CPU_LIMIT_FACTOR = 4  # --cpu-smoke: stage limits x this
STEP_VARIANTS_CALL1 = "beit_fast_triton,beit_fast_sdpa,reference_eager,hf_eager,hf_patched,timm_compiled,hf_compiled"
GPU_TESTS_REST = ["tests/test_ops_attention.py", "tests/test_ops_cross_entropy.py", "tests/test_ops_patch_embed.py",
                  "tests/test_fast_step.py", "tests/test_finetune_fast.py",
                  "tests/test_pipeline.py::test_nvjpeg_views_within_tolerance_and_tokens",
                  "tests/test_ops_attention_triton.py::test_cuda_autotuned_beit_shape"]


def build_plans(args, cuda: bool = True) -> dict[int, list[Stage]]:
    """The plans of the module docstring: {plan number: stages in order}. Planned seconds: ``expect_s`` on an
    H100, ``expect_h200_s`` on an H200 (from the 2026-11-27 H200 run's compile and step times; an H100's
    slower memory makes its steps about 10% slower, compiles cost the same)."""
    py = [sys.executable, str(HERE / "gpu_stages.py")]
    common = ["--rows", "{rows}"] + (["--batch", str(args.batch)] if args.batch else []) + \
        ["--repeats", str(args.repeats)]
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]

    def st(name, cmd, h100, h200, limit, what, min_s=20.0):
        return Stage(name, cmd, limit, h100, what, min_s=min_s, expect_h200_s=h200)

    def step(name, variants, h100, h200, limit, what, extras=""):
        cmd = py + ["step", "--variants", variants] + common
        if extras:
            cmd += ["--extras", extras, "--curve-steps", str(args.curve_steps), "--profile-out", "{results}/profile.txt"]
        return st(name, cmd, h100, h200, limit, what)

    env = st("env", py + ["env", "--rows", "{rows}"], 10, 10, 30, "versions, card, clocks", min_s=5)
    return {
        1: [
            env,
            # the autotuned configurations are checked against the fp32 reference by attention_table, at the
            # real shapes: their test (which tunes again at its own shape) waits for plan 4
            st("attention_tests", pytest_cmd + ["tests/test_ops_attention_triton.py", "-k", "not autotuned"], 70, 65,
               110, "CUDA correctness tests of our Triton attention (table and dense bias, bf16/fp16, BEiT-B shapes "
               "at N 197 and 577), BEIT_FAST_REAL_GPU=1"),
            st("attention_table", py + ["attention_table", "--candidates", "math,sdpa,triton"] + common, 60, 55, 110,
               "attention on the table path (the model's): fwd+bwd incl. the table gradient, B256/N197 and B64/N577; "
               "each Triton kernel alone with the autotuner's choice"),
            step("steps", STEP_VARIANTS_CALL1, 235, 225, 270,
                 "the headline step table in one process: beit_fast (attention triton, sdpa), eager reference, HF "
                 "eager (SDPA), HF patched, timm compiled + our head, HF compiled; profile of the fastest of ours",
                 extras="profile"),
        ],
        2: [
            env,
            st("finetune", py + ["finetune", "--variants", "ft_beit_fast_triton,ft_beit_fast,ft_eager,ft_timm_compiled"]
               + common, 200, 190, 260, "BEiT-B/16 fine-tuning step: beit_fast compiled (attention triton, auto) vs "
               "the eager step vs timm beit_base_patch16_224 compiled"),
            st("end_to_end", [sys.executable, str(HERE / "bench_end_to_end.py"), "--rows", "{rows}"] + (
                ["--device", "cuda", "--images", "2048", "--batch", "256", "--steps", "15", "--warmup", "5"]
                if cuda else ["--device", "cpu"]), 300, 280, 330,
               "the real pretraining loop on 2,048 JPEGs, BEiT-B, batch 256, DALL-E-sized tokenizer: --data_pipeline "
               "pil vs gpu (images/s, share of time waiting for data, CPU cores)"),
        ],
        3: [
            env,
            st("tokenizer", [sys.executable, str(HERE / "bench_tokenizer.py"), "--device", "cuda" if cuda else "cpu",
                             "--rows", "{rows}"], 120, 110, 180,
               "DALL-E-sized tokenizer at batch 256: fp32 vs bf16/fp16 channels-last, compiled; agreement"),
            step("hf_patched_compiled", "hf_compiled,hf_patched_compiled", 110, 105, 160,
                 "HF compiled and HF patched compiled, one process"),
            step("options", "beit_fast,beit_fast_cudagraphs", 110, 100, 160,
                 "beit_fast (attention auto) with its sync-free row and bf16 loss curve; CUDA graphs "
                 "(mode reduce-overhead)", extras="sync_free,curve"),
            st("fp8", py + ["fp8", "--curve-steps", str(args.curve_steps)] + common, 45, 40, 100,
               "--fp8 step and its loss curve vs the bf16 one"),
            st("end_to_end_finetune", [sys.executable, str(HERE / "bench_end_to_end.py"), "--rows", "{rows}",
                                       "--pipelines", "pil", "--finetune"] + (
                ["--device", "cuda", "--images", "2048", "--batch", "256", "--steps", "15", "--warmup", "5"]
                if cuda else ["--device", "cpu"]), 110, 105, 160,
               "end to end with the defaults: python -m beit_fast.finetune's loop beside a pil pretraining row"),
        ],
        4: [
            env,
            step("autotune", "beit_fast,beit_fast_autotune", 200, 190, 260,
                 "beit_fast and GEMM/epilogue autotuning (max-autotune-no-cudagraphs), one process"),
            st("gpu_tests", pytest_cmd + GPU_TESTS_REST, 200, 180, 240,
               "the other kernels', the fast step's, the fast fine-tuning step's and the nvJPEG pipeline's tests on "
               "the card (BEIT_FAST_REAL_GPU=1)"),
            st("attention_dense", py + ["attention", "--candidates", "math,sdpa,triton,cudnn,flex,flex_ladder"]
               + common, 80, 75, 120,
               "dense-bias attention candidates (the HF / timm patches' path): cuDNN, FlexAttention (its tile "
               "ladder if the default tiles fail)"),
            st("kernels", py + ["kernels"] + common, 25, 25, 60, "fused CE chunk sweep; patch embedding vs permute+GEMM"),
        ],
    }


def select_stages(args, plans: dict[int, list[Stage]]) -> list[Stage]:
    """The stages to run: ``--only`` (names from any plan, in the plans' order, env first) or ``--plan``,
    less ``--skip``. fp8 compares with the options stage's bf16 curve: it brings that stage along."""
    all_stages = [s for n in sorted(plans) for s in plans[n]]
    names = list(dict.fromkeys(s.name for s in all_stages))
    only = [x for x in args.only.split(",") if x]
    skip = set(x for x in args.skip.split(",") if x)
    unknown = [x for x in only + sorted(skip) if x not in names]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    if args.plan not in plans:
        raise SystemExit(f"error: --plan {args.plan}: plans are {', '.join(map(str, sorted(plans)))}")
    if only:
        wanted = set(only) | {"env"}
        if "fp8" in wanted:
            wanted.add("options")
        by_name = {s.name: s for s in all_stages}
        stages = [by_name[n] for n in names if n in wanted]
    else:
        stages = list(plans[args.plan])
    return [s for s in stages if s.name not in skip]


def planned_total(stages: list[Stage], card: str = "H100") -> float:
    return SETUP_S[card] + sum(s.planned(card) for s in stages)


def plan_text(plans: dict[int, list[Stage]], which: list[int] | None = None) -> str:
    """The plans as a table: planned seconds per card, limits, cumulative H100 seconds."""
    lines = []
    for n in which or sorted(plans):
        stages = plans[n]
        when = {0: "the stages asked for", 1: "call 1", 2: "call 2, in what is left of the session"}.get(n, "a later session")
        lines += [f"plan {n} ({when}; planned on an H100 <= {COMMAND_LIMIT_S} s)",
                  f"  {'stage':<20} {'H100 s':>7} {'H200 s':>7} {'limit':>6} {'cum. H100':>9}  what",
                  f"  {'setup':<20} {SETUP_S['H100']:>7} {SETUP_S['H200']:>7} {'-':>6} {SETUP_S['H100']:>9}  "
                  "carried wheels, link to this tree's beit_fast, imports"]
        cum = SETUP_S["H100"]
        for s in stages:
            cum += s.planned("H100")
            lines.append(f"  {s.name:<20} {s.planned('H100'):>7.0f} {s.planned('H200'):>7.0f} {s.limit_s:>6.0f} "
                         f"{cum:>9.0f}  {s.what}")
        limits = SETUP_S["H100"] + sum(s.limit_s for s in stages)
        lines += [f"  {'total':<20} {planned_total(stages, 'H100'):>7.0f} {planned_total(stages, 'H200'):>7.0f} "
                  f"{limits:>6.0f}", ""]
    if 1 in plans and (which is None or 1 in which):
        left = SESSION_S - START_S - planned_total(plans[1])
        lines.append(f"a session: {SESSION_S} s of device time - {START_S} s start-up - call 1 "
                     f"({planned_total(plans[1]):.0f} s planned on an H100) leaves about {left:.0f} s: "
                     f"`--plan 2 --budget {max(0, int(left) - 30)}` (30 s for the transfers)")
    return "\n".join(lines)


def install_wheels(env: dict, log) -> str:
    """pip-install the carried wheels (``.whl/``) into a folder on PYTHONPATH; returns a note."""
    wheels = sorted(WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
    if not wheels:
        return f"no .whl/ folder: {' and '.join(CARRIED_WHEELS)} only if the image has them"
    target = Path(tempfile.gettempdir()) / "beit_fast_site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *map(str, wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log.write(f"\n===== wheels\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
    if r.returncode != 0:
        return f"installing the carried wheels failed (rc {r.returncode}): {(r.stderr or r.stdout)[-300:]}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return "installed " + ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels)


def source_shim(env: dict) -> str:
    """Make ``import beit_fast`` (with ``beit_fast.kernels``) work from this tree in the stage processes and in
    pytest, without installing (the lent machine has no network for pip's build dependencies) and without the
    repository root on PYTHONPATH (its ``kernels/`` folder would be importable as the top-level ``kernels``,
    the name of PyPI's package that transformers loads): a temporary folder holding only a link named
    ``beit_fast`` to this tree's package goes on PYTHONPATH."""
    probe = [sys.executable, "-c", "import beit_fast.kernels.cross_entropy, beit_fast; print(beit_fast.__file__)"]
    # from benchmarks/, as the stage scripts run: only an installed beit_fast (or PYTHONPATH) is found
    r = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=HERE, timeout=120)
    if r.returncode == 0 and str(ROOT) in r.stdout:
        return f"beit_fast from {r.stdout.strip()}"
    site = Path(tempfile.mkdtemp(prefix="beit_fast_src_"))
    (site / "beit_fast").symlink_to(ROOT / "beit_fast", target_is_directory=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return f"beit_fast from this tree through {site}/beit_fast (a link; the repository root is not on PYTHONPATH)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=int, default=1, help="which plan (1-4, see --dry-plan; default 1)")
    p.add_argument("--dry-plan", action="store_true", help="print the plans (planned seconds per card) and exit")
    p.add_argument("--out", default=os.environ.get("OUT"), help="also copy the report files here (default: $OUT)")
    p.add_argument("--budget", type=float, default=COMMAND_LIMIT_S,
                   help=f"seconds for everything (default {COMMAND_LIMIT_S})")
    p.add_argument("--batch", type=int, default=None, help="batch of the step stages (CUDA default 256)")
    p.add_argument("--only", default="", help="comma-separated stages to run, from any plan (see --dry-plan)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out")
    p.add_argument("--curve-steps", type=int, default=120, help="steps of the bf16/fp8 loss curves")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median, min-max)")
    p.add_argument("--cpu-smoke", action="store_true", help="run on CPU at tiny sizes (the code paths and compiles)")
    p.add_argument("--no-compile", action="store_true",
                   help="replace every torch.compile of the stages by the eager module (a quicker CPU smoke run)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where the report files go")
    args = p.parse_args(argv)
    if args.dry_plan:
        plans = build_plans(args)
        only = [x for x in args.only.split(",") if x]
        if only:
            stages = select_stages(args, plans)
            print(plan_text({0: stages}))
        else:
            print(plan_text(plans))
        return 0
    t_start = time.time()
    deadline = t_start + args.budget

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: this script is for a lent GPU (--cpu-smoke runs it on CPU at tiny sizes, "
              "--dry-plan prints the plans)")
        return 2
    plan = select_stages(args, build_plans(args, cuda))
    if not cuda:  # a CPU's compiles (2 loaded cores in CI) and the interpreted kernels take longer than the card's
        plan = [dataclasses.replace(s, limit_s=s.limit_s * CPU_LIMIT_FACTOR) for s in plan]
    card = torch.cuda.get_device_name() if cuda else "cpu-smoke"
    import triton

    meta = {"card": card, "date": datetime.date.today().isoformat(), "plan": args.only or args.plan,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "none",
            "python": sys.version.split()[0], "batch": args.batch or (256 if cuda else 4), "budget_s": args.budget}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    tag = f"plan{args.plan}" if not args.only else "stages"
    stem0 = f"{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}-{tag}"
    stem, n = stem0, 1
    while (results / f"{stem}.json").exists():
        n += 1
        stem = f"{stem0}-run{n}"
    rows_dir = Path(tempfile.mkdtemp(prefix="beit_report_rows_"))
    log = (results / f"{stem}.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BEIT_FAST_REAL_GPU": "1" if cuda else "0",
           "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "beit_fast_inductor_cache"),
           "TRITON_CACHE_DIR": str(Path(tempfile.gettempdir()) / "beit_fast_triton_cache")}
    env["TRITON_INTERPRET"] = "0" if cuda else "1"
    if args.no_compile:
        env["BEIT_FAST_SMOKE_NO_COMPILE"] = "1"
    meta["wheels"] = install_wheels(env, log) if cuda else "not installed (CPU smoke run; the wheels are for the device)"
    meta["source"] = source_shim(env)
    print(f"[setup] {meta['wheels']}\n[setup] {meta['source']}\n[setup] planned: "
          f"{planned_total(plan, 'H200' if 'H200' in card else 'H100'):.0f} s", flush=True)
    results_done: list[StageResult] = []
    profile_txt = rows_dir / "profile.txt"

    def write() -> None:
        rows = [r for f in sorted(rows_dir.glob("*.jsonl")) for r in read_rows(f)]
        write_report(results, stem, meta, results_done, rows, plan)
        if profile_txt.exists():
            shutil.copy(profile_txt, results / f"{stem}.profile.txt")
        shutil.copy(results / f"{stem}.md", results / "LATEST.md")
        log.flush()
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for f in list(results.glob(f"{stem}.*")) + [results / "LATEST.md"]:
                if f.name.startswith(f"{stem}.") and f.name[len(stem) + 1:] in ("md", "json", "log", "profile.txt") \
                        or f.name == "LATEST.md":
                    shutil.copy(f, out / f.name)

    for stage in plan:
        results_done.append(run_stage(stage, rows_dir / f"{stage.name}.jsonl", deadline, ROOT, env, log))
        write()
    rows = [r for f in sorted(rows_dir.glob("*.jsonl")) for r in read_rows(f)]
    md = write_report(results, stem, meta, results_done, rows, plan)
    write()
    print("\n" + md)
    print("\nSUMMARY\n" + "\n".join(summary_lines(rows)))
    proposal = propose_auto_priority(rows, attention_backends(rows))
    if any(r.get("table") == "attention" for r in rows):
        print(f"proposed AUTO_PRIORITY['cuda'] = {proposal['order']!r} (measurements in the report)")
    for s in results_done:
        if s.status != "ok":
            print(f"stage {s.stage}: {s.status} {s.note}")
    print(f"\nfiles: {results}/{stem}.{{md,json,log,profile.txt}}" + (f", copied to {args.out}" if args.out else "")
          + f"; {time.time() - t_start:.0f} s in all")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
