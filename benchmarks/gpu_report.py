"""One call on a lent GPU: every number of issue 11 in one run, written after every stage.

    python benchmarks/gpu_report.py --out $OUT                  # the whole plan, ~9 minutes on an H200
    python benchmarks/gpu_report.py --only attention,kernels    # some stages (names below)
    python benchmarks/gpu_report.py --cpu-smoke --budget 900    # the same stages at tiny sizes on CPU

Each stage is its own process (``benchmarks/gpu_stages.py``), killed at its time limit (cut to what is
left of ``--budget``); the rows it wrote before a crash or a kill are kept, and the report
(``benchmarks/results/<date>-<card>.{md,json,log,profile.txt}`` + LATEST.md, copied to ``--out``) is
rewritten after every stage. Nothing is installed from a network: wheels the device image lacks are
carried in ``.whl/`` (``benchmarks/fetch_gpu_wheels.sh``) and installed with ``pip --target`` into a
folder put on PYTHONPATH; beit_fast runs from this source tree (``beit_fast/kernels`` is linked to
``kernels/`` when the package is not installed).

Plan (the device image: torch 2.11, triton 3.6; a whole-step compile costs 30-60 s; planned seconds
assume the warm phase filled inductor's caches):

  stage          planned  limit  what
  setup               10      -  wheels, source shim, environment (versions, card, clocks)
  warm               170    170  compile 6 step variants, 3 processes in parallel (fills the caches)
  fast                60    150  beit_fast step (headline) + sync-free variant + profile + bf16 loss curve
  eager               50    110  eager reference, HF eager (SDPA), HF patched: one process
  attention           50    150  math, sdpa, triton (incl. its autotuning), cudnn, xformers @ B256/N197, B64/N577
  timm                30    100  timm Beit body + our head, compiled
  hf_compiled         30    100  HF BeitForMaskedImageModeling under torch.compile
  ref_compiled        30    100  the eager reference under torch.compile
  kernels             20     60  fused CE chunk sweep; patch embedding vs permute + cuBLAS GEMM
  fp8                 40    120  --fp8 step + its loss curve against the bf16 one
  cudagraphs          25     90  sync-free step with mode="reduce-overhead"
  attention_flex      45    120  FlexAttention with Hopper-sized tiles (a ladder if they fail)
                   -----
                     555  (default --budget 560: the device command limit is 600 s)
  finetune           200    300  BEiT-B/16 fine-tuning step, 1000 classes: eager vs beit_fast compiled
                                 (auto, triton) vs timm beit_base_patch16_224 compiled (issue 13's
                                 targets; three whole-step compiles do not fit the budget above)
  gpu_tests          200    270  kernel (incl. Triton attention) + fast-step + fast fine-tuning + nvJPEG tests
                                 on CUDA (after the budget unless stages run short)
  end_to_end         300    420  the real pretraining loop on JPEGs: --data_pipeline pil vs gpu (issue 14)
  tokenizer          120    180  DALL-E-sized tokenizer, fp32 vs bf16/fp16 channels-last, compiled (issue 14)
  hf_patched_compiled 55    100
  autotune           150    240  mode="max-autotune-no-cudagraphs"

What did not fit is listed as skipped in the report; run it in a second call right after (the machine
stays warm for 30 s, and inductor's caches with it): ``--only finetune --budget 400``, then
``--only gpu_tests,end_to_end --budget 560``, then ``--only tokenizer,autotune --budget 400`` (a session
has 15 minutes of device time: the first call is the session; the others belong to later sessions)
(cudagraphs, fp8 and autotune run without "fast" get a baseline beit_fast row first, so their ratios
stay within one call).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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


def build_plan(args) -> tuple[list[Stage], list[Stage]]:
    """(warm stages, run in parallel first; measuring stages, in order)."""
    py = [sys.executable, str(HERE / "gpu_stages.py")]
    import torch

    cuda = torch.cuda.is_available()  # the stages that are plain scripts get CPU sizes in a --cpu-smoke run
    common = ["--rows", "{rows}"] + (["--batch", str(args.batch)] if args.batch else []) + \
        ["--repeats", str(args.repeats)]

    def step(name, variants, limit, expect, what, extras=""):
        cmd = py + ["step", "--variants", variants] + common
        if extras:
            cmd += ["--extras", extras, "--curve-steps", str(args.curve_steps),
                    "--profile-out", "{results}/profile.txt"]
        return Stage(name, cmd, limit, expect, what)

    warm = [Stage(f"warm{i}", py + ["warm", "--variants", v] + common, args.warm_limit, args.warm_limit,
                  f"compile {v} (parallel warm-up)", min_s=30)
            for i, v in enumerate(["beit_fast,beit_fast_fp8", "timm_compiled,beit_fast_cudagraphs",
                                   "hf_compiled,reference_compiled"])]
    stages = [
        Stage("env", py + ["env", "--rows", "{rows}"], 60, 8, "versions, card, clocks", min_s=5),
        step("fast", "beit_fast", 150, 60, "beit_fast step (headline), sync-free, profile, bf16 loss curve",
             extras="sync_free,profile,curve"),
        step("eager", "reference_eager,hf_eager,hf_patched,hf_patched_fused", 110, 50,
             "eager reference, HF eager (SDPA), HF patched (default, and with the opt-in fused loss)"),
        Stage("attention", py + ["attention", "--candidates", "math,sdpa,triton,cudnn,xformers"] + common, 150, 50,
              "attention candidates fwd+bwd with bias gradient, B256/N197 and B64/N577"),
        step("timm", "timm_compiled", 100, 30, "timm Beit body + beit_fast head, compiled"),
        step("hf_compiled", "hf_compiled", 100, 30, "HF BeitForMaskedImageModeling, compiled"),
        step("ref_compiled", "reference_compiled", 100, 30, "eager reference under torch.compile"),
        Stage("kernels", py + ["kernels"] + common, 60, 20, "fused CE chunk sweep; patch embedding vs permute+GEMM"),
        Stage("fp8", py + ["fp8", "--curve-steps", str(args.curve_steps)] + common, 120, 40,
              "--fp8 step and its loss curve vs bf16"),
        step("cudagraphs", "beit_fast_cudagraphs", 90, 25, "sync-free step, compile mode reduce-overhead"),
        Stage("attention_flex", py + ["attention", "--candidates", "flex,flex_ladder"] + common, 120, 45,
              "FlexAttention with Hopper-sized kernel_options (ladder if they fail)"),
        Stage("finetune", py + ["finetune", "--variants", "ft_eager,ft_beit_fast,ft_beit_fast_triton,ft_timm_compiled"]
              + common, 300, 200, "BEiT-B/16 fine-tuning step: eager vs beit_fast compiled (auto, triton) vs timm "
              "compiled"),
        Stage("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            "tests/test_ops_attention.py", "tests/test_ops_cross_entropy.py",
                            "tests/test_ops_patch_embed.py", "tests/test_ops_attention_triton.py",
                            "tests/test_fast_step.py", "tests/test_finetune_fast.py",
                            "tests/test_pipeline.py::test_nvjpeg_views_within_tolerance_and_tokens"], 270, 200,
              "the kernels' (incl. the Triton attention), the fast step's, the fast fine-tuning step's and the "
              "nvJPEG pipeline's tests on the card (BEIT_FAST_REAL_GPU=1)"),
        Stage("end_to_end", [sys.executable, str(HERE / "bench_end_to_end.py"), "--rows", "{rows}"] + (
                  ["--device", "cuda", "--images", "2048", "--batch", "256", "--steps", "15", "--warmup", "5"]
                  if cuda else ["--device", "cpu"]), 420, 300,
              "the real pretraining loop on 2,048 JPEGs, BEiT-B, batch 256, DALL-E-sized tokenizer: "
              "--data_pipeline pil vs gpu (images/s, share of time waiting for data, CPU cores)"),
        Stage("tokenizer", [sys.executable, str(HERE / "bench_tokenizer.py"), "--device", "cuda" if cuda else "cpu",
                            "--rows", "{rows}"],
              180, 120, "DALL-E-sized tokenizer at batch 256: fp32 vs bf16/fp16 channels-last, compiled; agreement"),
        step("hf_patched_compiled", "hf_patched_compiled", 100, 55, "HF patched, compiled"),
        step("autotune", "beit_fast_autotune", 240, 150, "GEMM/epilogue autotuning (max-autotune-no-cudagraphs)"),
    ]
    names = [s.name for s in stages]
    only = [x for x in args.only.split(",") if x]
    skip = set(x for x in args.skip.split(",") if x)
    unknown = [x for x in only + sorted(skip) if x not in names and x != "warm"]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(unknown)}; stages: warm, {', '.join(names)}")
    if only:
        wanted = set(only) | {"env"}
        # an option stage compares with the beit_fast row of the same call
        if wanted & {"cudagraphs", "fp8", "autotune"} and "fast" not in wanted:
            wanted.add("fast")
        stages = [s for s in stages if s.name in wanted]
        if "fast" in wanted and "fast" not in only:  # the baseline row alone
            for s in stages:
                if s.name == "fast":
                    s.cmd = py + ["step", "--variants", "beit_fast"] + common
                    s.what, s.expect_s = "beit_fast step (baseline of the option stages)", 30
    stages = [s for s in stages if s.name not in skip]
    if args.no_warm or "warm" in skip or (only and "warm" not in only):
        warm = []
    else:  # warm only what will be measured
        measured = {v for s in stages if "step" in s.cmd for v in s.cmd[s.cmd.index("--variants") + 1].split(",")}
        measured |= {"beit_fast_fp8"} if any(s.name == "fp8" for s in stages) else set()
        for s in warm:
            i = s.cmd.index("--variants") + 1
            keep = [v for v in s.cmd[i].split(",") if v in measured]
            s.cmd[i] = ",".join(keep)
        warm = [s for s in warm if s.cmd[s.cmd.index("--variants") + 1]]
    return warm, stages


def install_wheels(env: dict, log) -> str:
    """pip-install the carried wheels (``.whl/``) into a folder on PYTHONPATH; returns a note."""
    wheels = sorted(WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
    if not wheels:
        return "no .whl/ folder: xformers, torchao and nvidia-cudnn-frontend only if the image has them"
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
    """Make ``import beit_fast`` (with ``beit_fast.kernels``) work from this tree in the stage processes and
    in pytest, without installing: the lent machine has no network for pip's build dependencies. When the
    package is not installed from this tree, ``beit_fast/kernels`` becomes a link to ``kernels/`` (a path
    git ignores) and the tree goes on PYTHONPATH."""
    probe = [sys.executable, "-c", "import beit_fast.kernels.cross_entropy, beit_fast; print(beit_fast.__file__)"]
    # from benchmarks/, as the stage scripts run: only an installed beit_fast (or PYTHONPATH) is found
    r = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=HERE, timeout=120)
    if r.returncode == 0 and str(ROOT) in r.stdout:
        return f"beit_fast from {r.stdout.strip()}"
    link = ROOT / "beit_fast" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return f"beit_fast from this tree on PYTHONPATH ({link} -> kernels/)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="also copy the report files here (default: $OUT)")
    p.add_argument("--budget", type=float, default=560, help="seconds for everything (default 560)")
    p.add_argument("--batch", type=int, default=None, help="batch of the step stages (CUDA default 256)")
    p.add_argument("--only", default="", help="comma-separated stages to run (see the plan)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out")
    p.add_argument("--no-warm", action="store_true", help="no parallel warm-up compile phase")
    p.add_argument("--warm-limit", type=float, default=170, help="seconds of the parallel warm-up phase")
    p.add_argument("--curve-steps", type=int, default=120, help="steps of the bf16/fp8 loss curves")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median, min-max)")
    p.add_argument("--cpu-smoke", action="store_true", help="run on CPU at tiny sizes (checks the code paths)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where the report files go")
    args = p.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: this script is for a lent GPU (--cpu-smoke runs it on CPU at tiny sizes)")
        return 2
    card = torch.cuda.get_device_name() if cuda else "cpu-smoke"
    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "batch": args.batch or (256 if cuda else 4),
            "budget_s": args.budget}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}"
    n = 1
    while (results / f"{stem}.json").exists():
        n += 1
        stem = f"{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}-run{n}"
    rows_dir = Path(tempfile.mkdtemp(prefix="beit_report_rows_"))
    log = (results / f"{stem}.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BEIT_FAST_REAL_GPU": "1" if cuda else "0",
           "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "beit_fast_inductor_cache"),
           "TRITON_CACHE_DIR": str(Path(tempfile.gettempdir()) / "beit_fast_triton_cache")}
    env["TRITON_INTERPRET"] = "0" if cuda else "1"
    if args.cpu_smoke:
        env.setdefault("BEIT_FAST_SMOKE_NO_COMPILE", "1")
    meta["wheels"] = install_wheels(env, log) if cuda else "not installed (CPU smoke run; the wheels are for the device)"
    meta["source"] = source_shim(env)
    print(f"[setup] {meta['wheels']}\n[setup] {meta['source']}", flush=True)
    warm, plan = build_plan(args)
    results_done: list[StageResult] = []
    profile_txt = rows_dir / "profile.txt"

    def write() -> None:
        rows = [r for f in sorted(rows_dir.glob("*.jsonl")) for r in read_rows(f)]
        write_report(results, stem, meta, results_done, rows, warm + plan)
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

    # the warm phase: compiles in parallel (each stage under a share of the card's memory)
    if warm:
        warm_deadline = min(deadline, time.time() + args.warm_limit)
        logs = {s.name: open(rows_dir / f"{s.name}.log", "w") for s in warm}
        threads = [threading.Thread(target=lambda s=s: results_done.append(
            run_stage(s, rows_dir / f"{s.name}.jsonl", warm_deadline, ROOT, env, logs[s.name]))) for s in warm]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, f in logs.items():
            f.close()
            log.write((rows_dir / f"{name}.log").read_text())
        write()
    for stage in plan:
        results_done.append(run_stage(stage, rows_dir / f"{stage.name}.jsonl", deadline, ROOT, env, log))
        write()
    rows = [r for f in sorted(rows_dir.glob("*.jsonl")) for r in read_rows(f)]
    md = write_report(results, stem, meta, results_done, rows, warm + plan)
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
