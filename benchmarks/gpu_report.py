"""One call on a lent GPU: GPU tests, benchmarks, a CLI smoke run, a profile, and a results table.

    python benchmarks/gpu_report.py [--out DIR] [--budget 470]

Installs nothing beyond this repository itself (``pip install --no-deps --no-build-isolation -e .``):
the device image has torch, triton, transformers, timm, pytest-benchmark. Runs in stages, most valuable
first, each with its own timeout cut to what is left of ``--budget`` seconds, so a slow stage never loses
the results of the others; the table is rewritten after every stage. Writes
``benchmarks/results/<date>-<card>.{md,json,profile.txt,log}`` (+ LATEST.md) and copies them to ``--out``
(e.g. ``$OUT``; at most 8 files come back from a lent machine, this writes 5).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_ops_patch_embed.py", "tests/test_ops_cross_entropy.py", "tests/test_ops_attention.py"]
# one pytest process per whole-step benchmark, most wanted first: a timeout loses one row, not all
STEP_BENCHES = ["test_train_step[fast]", "test_train_step[reference]", "test_train_step_hf_sdpa",
                "test_train_step[fast_ckpt_all]", "test_train_step_fast_with_tokenizer"]


class Report:
    def __init__(self, budget: float, log_path: Path) -> None:
        self.deadline = time.time() + budget
        self.log = log_path.open("w")
        self.stages: list[dict] = []

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        left = self.deadline - time.time() - 5
        if left < 15:
            self.stages.append({"stage": name, "rc": None, "seconds": 0, "note": "skipped: out of budget"})
            print(f"[{name}] skipped: out of budget", flush=True)
            return -1, ""
        timeout = min(timeout, left)
        t0 = time.time()
        print(f"[{name}] $ {' '.join(cmd)}  (timeout {timeout:.0f} s)", flush=True)
        # own process group: a timeout must also end torchrun's workers and compile subprocesses
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc, out = 124, (out or "") + f"\n[timed out after {timeout:.0f} s]"
        secs = time.time() - t0
        summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
        self.stages.append({"stage": name, "rc": rc, "seconds": round(secs, 1),
                            "note": summary[-1].strip("= ") if summary else ""})
        self.log.write(f"\n===== {name} rc={rc} {secs:.0f} s\n$ {' '.join(cmd)}\n{out}\n")
        self.log.flush()
        print(out[-2500:], f"[{name}] rc={rc} in {secs:.0f} s", sep="\n", flush=True)
        return rc, out


def benchmark_rows(bench_json: Path) -> list[dict]:
    if not bench_json.exists():
        return []
    data = json.loads(bench_json.read_text())
    return [{"group": b.get("group") or "", "name": b["name"], "median_ms": b["stats"]["median"] * 1e3,
             **b.get("extra_info", {})} for b in data["benchmarks"]]


def markdown(meta: dict, rows: list[dict], stages: list[dict]) -> str:
    lines = [f"### GPU results: {meta['card']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}", "",
             "| stage | exit | seconds | summary |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']} | {s['note']} |" for s in stages]
    lines.append("")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, items in groups.items():
        base = next((r["median_ms"] for key in ("reference", "math", "eager") for r in items if key in r["name"]), None)
        lines += [f"**{group}**", "", "| variant | median ms | vs reference | images/s | MFU % | peak mem |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(items, key=lambda r: r["median_ms"]):
            speed = f"{base / r['median_ms']:.2f}x" if base else ""
            mem = (f"{r['peak_mem_GiB']} GiB" if "peak_mem_GiB" in r
                   else f"{r['peak_mem_MiB']} MiB" if "peak_mem_MiB" in r else "")
            lines.append(f"| {r['name']} | {r['median_ms']:.3f} | {speed} | {r.get('images_per_s', '')} | "
                         f"{r.get('mfu_percent', '')} | {mem} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here (default: $OUT)")
    p.add_argument("--budget", type=float, default=470, help="seconds for all stages together")
    p.add_argument("--batch", type=int, default=256, help="batch of the whole-step benchmarks")
    p.add_argument("--steps", default=",".join(map(str, range(len(STEP_BENCHES)))),
                   help="indices of STEP_BENCHES to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (tests,step,kernels,fast_step_tests,"
                                              "cli,profile,hf_patch)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a lent GPU")
        return 2
    meta = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', meta['card']).strip('-')}"
    rep = Report(args.budget, results / f"{stem}.log")
    env = {"BEIT_FAST_REAL_GPU": "1", "TRITON_INTERPRET": "0", "BEIT_FAST_BENCH_BATCH": str(args.batch),
           "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    rows: list[dict] = []
    bench_dir = results / "_bench"
    bench_dir.mkdir(exist_ok=True)

    def write() -> None:
        md = markdown(meta, rows, rep.stages)
        (results / f"{stem}.md").write_text(md + "\n")
        (results / f"{stem}.json").write_text(json.dumps({"meta": meta, "stages": rep.stages, "rows": rows}, indent=1))
        shutil.copy(results / f"{stem}.md", results / "LATEST.md")
        if args.out:
            for f in results.glob(f"{stem}*"):
                shutil.copy(f, Path(args.out) / f.name)

    def bench(name: str, targets: list[str], timeout: float) -> None:
        out_json = bench_dir / f"{name}.json"
        rep.run(name, [py, "-m", "pytest", *targets, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                       f"--benchmark-json={out_json}"], timeout, env)
        rows.extend(benchmark_rows(out_json))
        write()

    rc, _ = rep.run("install", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--no-index", "-e", "."], 90)
    if rc != 0:  # no network there: run from the source tree (kernels/ is the beit_fast.kernels package)
        link = ROOT / "beit_fast" / "kernels"
        if not link.exists():
            link.symlink_to(ROOT / "kernels", target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    rep.run("nvidia-smi", ["nvidia-smi"], 15)
    if "tests" not in skip:
        rep.run("kernel_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS], 110, env)
        write()
    if "step" not in skip:
        for i in map(int, filter(None, args.steps.split(","))):
            t = STEP_BENCHES[i]
            bench(f"step{i}", [f"benchmarks/bench_train_step.py::{t}"], 110)
    if "kernels" not in skip:
        bench("kernels", ["benchmarks/bench_kernels.py", "benchmarks/bench_attention.py"], 100)
    if "fast_step_tests" not in skip:
        rep.run("fast_step_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fast_step.py"],
                120, env)
        write()
    if "cli" not in skip:  # the CLI end to end on CUDA (fast path, compile) under torchrun with NCCL
        rep.run("cli_torchrun_nccl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                      "-m", "beit_fast.pretrain", "--tokenizer_steps", "40", "--num_samples", "512",
                                      "--epochs", "2", "--batch_size", "64", "--output_dir", "/tmp/beit_cli",
                                      "--no_progress"], 120, env)
        write()
    if "profile" not in skip:
        rep.run("profile", [py, "benchmarks/profile_step.py", "--batch", str(args.batch),
                            "--out", str(results / f"{stem}.profile.txt")], 90, env)
        write()
    if "hf_patch" not in skip:
        bench("hf_patch", ["benchmarks/bench_hf_patch.py"], 60)
    write()
    print(markdown(meta, rows, rep.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
