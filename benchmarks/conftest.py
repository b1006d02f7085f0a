"""Benchmark collection: ``pytest benchmarks/ --benchmark-only`` collects ``bench_*.py`` files.

On a machine with CUDA the Triton kernels must run compiled, not under the interpreter that the root
conftest switches on for CPU tests: if CUDA is available and the kernels have not been imported yet,
TRITON_INTERPRET is turned off here (BEIT_FAST_REAL_GPU=1 does the same from the root conftest).

After the tables, one summary line per benchmark group says what the numbers mean: each row's median
against the group's baseline row, with its min-max range, and whether the ranges overlap (then this run
does not establish the order); rows that ran in Triton's interpreter are marked as such.
"""
import os
import sys

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
    if not any(m.startswith("beit_fast.kernels.") for m in sys.modules):
        os.environ["TRITON_INTERPRET"] = "0"

# the row a group's ratios are taken against: the first name containing one of these
BASELINE_KEYS = ("reference", "conv2d", "math", "[hf]", "eager")


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; only add the directory walk
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _row_name(name: str) -> str:
    return name[name.index("[") + 1:-1] if "[" in name and name.endswith("]") else name


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def summary_lines(rows: list[dict]) -> list[str]:
    """Per group of ``rows`` (dicts with group, name, median, min, max in seconds, extra_info): a header line
    naming the baseline row (the first whose name holds one of BASELINE_KEYS, else the group's first row), then
    one short line per row, fastest first: median [min-max] and the ratio to the baseline."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"] or "", []).append(r)
    lines = []
    for group, items in groups.items():
        base = next((r for key in BASELINE_KEYS for r in items if key in r["name"]), items[0])
        note = " (times of interpreted rows mean nothing)" if any(
            r.get("extra_info", {}).get("interpreter") for r in items) else ""
        lines.append(f"summary {group}: ratios vs {_row_name(base['name'])}{note}")
        for r in sorted(items, key=lambda r: r["median"]):
            label = _row_name(r["name"])
            if r.get("extra_info", {}).get("interpreter") and "INTERPRETED" not in label:
                label += " (Triton interpreter)"
            s = f"  {label} {_ms(r['median'])} ms [{_ms(r['min'])}-{_ms(r['max'])}]"
            if r is base:
                s += " = baseline"
            else:
                s += f" = {base['median'] / r['median']:.2f}x"
                if r["min"] <= base["max"] and base["min"] <= r["max"]:
                    s += " (ranges overlap: order not established)"
            lines.append(s)
    return lines


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    rows = []
    for b in benches:
        stats = getattr(b, "stats", None)
        if stats is None or not getattr(stats, "rounds", 0):
            continue
        rows.append({"group": b.group, "name": b.name, "median": stats.median, "min": stats.min, "max": stats.max,
                     "extra_info": dict(getattr(b, "extra_info", {}) or {})})
    if rows:
        terminalreporter.write_sep("-", "benchmark summary (median [min-max] per row; ratios within a group)")
        for line in summary_lines(rows):
            terminalreporter.write_line(line)
