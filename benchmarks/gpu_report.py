"""One call on a lent GPU: GPU tests, benchmarks, profile, and a results table for the README.

    python benchmarks/gpu_report.py [--out DIR] [--quick]

Installs nothing beyond this repository itself (``pip install --no-deps --no-build-isolation -e .``):
the device image has torch, triton, transformers, timm, pytest-benchmark. Writes
``benchmarks/results/<date>-<card>.json`` and ``.md`` (and copies into ``--out``, e.g. ``$OUT``), and
prints the markdown table. Sized to finish in under 8 minutes on an H100/H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/test_ops_patch_embed.py", "tests/test_ops_cross_entropy.py", "tests/test_ops_attention.py",
             "tests/test_fast_step.py"]


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
        out += f"\n[timed out after {timeout} s]"
    print(out[-4000:], flush=True)
    return rc, out, time.time() - t0


def benchmark_rows(bench_json: Path) -> list[dict]:
    data = json.loads(bench_json.read_text())
    rows = []
    for b in data["benchmarks"]:
        rows.append({"group": b.get("group") or "", "name": b["name"], "median_ms": b["stats"]["median"] * 1e3,
                     **b.get("extra_info", {})})
    return rows


def markdown(meta: dict, rows: list[dict], tests_line: str) -> str:
    lines = [f"### GPU results: {meta['card']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; GPU tests: {tests_line}", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, items in groups.items():
        base = next((r["median_ms"] for key in ("reference", "math", "eager") for r in items if key in r["name"]), None)
        lines += [f"**{group}**", "", "| variant | median ms | vs reference | images/s | MFU % | peak mem |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(items, key=lambda r: r["median_ms"]):
            speed = f"{base / r['median_ms']:.2f}x" if base else ""
            mem = r.get("peak_mem_GiB", r.get("peak_mem_MiB", ""))
            mem = f"{mem} GiB" if "peak_mem_GiB" in r else (f"{mem} MiB" if mem != "" else "")
            lines.append(f"| {r['name']} | {r['median_ms']:.3f} | {speed} | {r.get('images_per_s', '')} | "
                         f"{r.get('mfu_percent', '')} | {mem} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here (default: $OUT)")
    p.add_argument("--quick", action="store_true", help="skip the GPU tests (benchmarks and profile only)")
    p.add_argument("--batch", type=int, default=256, help="batch of the whole-step benchmarks")
    args = p.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a lent GPU")
        return 2
    meta = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    env = {"BEIT_FAST_REAL_GPU": "1", "TRITON_INTERPRET": "0", "BEIT_FAST_BENCH_BATCH": str(args.batch),
           "PYTHONUNBUFFERED": "1"}
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], 120)

    tests_line = "not run (--quick)"
    if not args.quick:
        rc, out, secs = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GPU_TESTS],
                            180, env)
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        tests_line = (summary[-1].strip("= ") if summary else f"exit {rc}") + f" in {secs:.0f} s"

    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', meta['card']).strip('-')}"
    bench_json = results / f"{stem}.bench.json"
    run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={bench_json}"], 300, env)
    rows = benchmark_rows(bench_json) if bench_json.exists() else []
    _, profile, _ = run([sys.executable, "benchmarks/profile_step.py", "--batch", str(args.batch),
                         "--out", str(results / f"{stem}.profile.txt")], 120, env)

    md = markdown(meta, rows, tests_line)
    (results / f"{stem}.md").write_text(md + "\n")
    (results / f"{stem}.json").write_text(json.dumps({"meta": meta, "tests": tests_line, "rows": rows}, indent=1))
    shutil.copy(results / f"{stem}.md", results / "LATEST.md")
    print(md)
    if args.out:
        for f in results.glob(f"{stem}*"):
            shutil.copy(f, Path(args.out) / f.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
