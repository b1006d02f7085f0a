"""The machinery of ``gpu_report.py``: stages in their own processes, rows as JSON lines, tables, ratios.

Plain Python (no torch): the CPU tests exercise all of it. A stage is a command that appends result rows,
one JSON object per line, to the file named by ``{rows}`` in its command (see :class:`RowWriter`); a row
written before the stage crashed or was killed at its time limit is kept. The report is rebuilt from all
rows after every stage (:func:`write_report`), so a machine taken back mid-run still leaves results.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------------


class RowWriter:
    """Appends rows to a JSON-lines file, flushed and fsynced one by one (a killed stage keeps them)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.rows: list[dict] = []

    def emit(self, table: str, **fields) -> dict:
        row = {"table": table, **fields}
        self.rows.append(row)
        print("ROW " + json.dumps(row, default=str), flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; a line cut short by a kill is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def spread(samples: list[float]) -> dict:
    """Median, min, max, interquartile range and count of ``samples`` (one value per repeat)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return {"median": None, "min": None, "max": None, "iqr": None, "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0], xs[0], xs[0]]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "iqr": q[2] - q[0], "n": len(xs)}


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One process of the report. ``cmd`` may hold ``{rows}`` (its rows file) and ``{results}`` (the
    results folder). ``limit_s``: killed after this long (cut to what is left of the budget); ``expect_s``:
    the planned time (the budget in gpu_report's docstring); ``min_s``: skipped when less is left."""

    name: str
    cmd: list[str]
    limit_s: float
    expect_s: float
    what: str
    min_s: float = 20.0
    env: dict = field(default_factory=dict)
    expect_h200_s: float | None = None  # planned seconds on an H200 (``expect_s``: on an H100), None: the same

    def planned(self, card: str = "H100") -> float:
        """Planned seconds on ``card`` ("H100" or "H200")."""
        return self.expect_h200_s if card == "H200" and self.expect_h200_s is not None else self.expect_s


@dataclass
class StageResult:
    stage: str
    status: str  # ok | failed | timed out | skipped
    rc: int | None
    seconds: float
    limit_s: float
    rows: int
    note: str = ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_stage(stage: Stage, rows_path: Path, deadline: float, cwd: Path, env: dict, log) -> StageResult:
    """Run ``stage`` in its own process group, killed at its limit or at ``deadline`` (time.time());
    its output goes to ``log`` (an open text file) and the tail of it to stdout."""
    left = deadline - time.time()
    if left < stage.min_s:
        note = f"skipped: {left:.0f} s of the budget left, the stage needs at least {stage.min_s:.0f} s"
        print(f"[{stage.name}] {note}", flush=True)
        return StageResult(stage.name, "skipped", None, 0.0, 0.0, 0, note)
    limit = min(stage.limit_s, left)
    cmd = [c.replace("{rows}", str(rows_path)).replace("{results}", str(rows_path.parent)) for c in stage.cmd]
    print(f"[{stage.name}] {stage.what} (limit {limit:.0f} s, planned {stage.expect_s:.0f} s)", flush=True)
    log.write(f"\n===== {stage.name}: {stage.what}\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    # own session: a kill also ends the stage's children (inductor's compile workers)
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, **stage.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        rc, status = 124, "timed out"
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    secs = time.time() - t0
    out = out or ""
    log.write(out + f"\n[{stage.name}] {status} rc={rc} after {secs:.1f} s\n")
    log.flush()
    tail = [ln for ln in out.splitlines() if not ln.startswith("ROW ")]
    if any(Path(c).name == "pytest" or c == "pytest" for c in cmd):
        RowWriter(rows_path).emit("tests", **pytest_outcome(out, stage.name, status))
    note = ""
    if status != "ok":
        errs = [ln.strip() for ln in tail if "Error" in ln or "error:" in ln]
        note = (errs[-1] if errs else (tail[-1].strip() if tail else ""))[:300]
        if status == "timed out":
            note = f"killed at its limit of {limit:.0f} s" + (f"; last line: {note}" if note else "")
    print("\n".join(tail[-25:]), flush=True)
    n_rows = len(read_rows(rows_path))
    print(f"[{stage.name}] {status} in {secs:.0f} s, {n_rows} rows", flush=True)
    return StageResult(stage.name, status, rc, round(secs, 1), round(limit, 1), n_rows, note)


def pytest_outcome(out: str, stage: str, status: str) -> dict:
    """A pytest run's counts (passed, failed, skipped, errors) and the ids of its failures, from its output
    (``-q -rfE``); a run killed at its limit has no summary line: then the counts are None."""
    counts: dict[str, int | None] = {"passed": None, "failed": None, "skipped": None, "errors": None}
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)
               and (" in " in ln or ln.startswith("="))]
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    failures = [ln.split(" ", 1)[1].split(" - ")[0] for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return {"stage": stage, "status": status, **counts, "failures": failures[:30]}


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _fmt(v, digits: int = 2) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1e-3 or v == 0:
            return f"{v:.{digits}f}" if abs(v) >= 1 else f"{v:.3f}"
        return f"{v:.1e}"
    return str(v).replace("|", "/").replace("\n", " ")


def _range(r: dict, lo: str = "ms_min", hi: str = "ms_max") -> str:
    return f"{_fmt(r.get(lo))}-{_fmt(r.get(hi))}" if r.get(lo) is not None else ""


# The columns of a whole-step row (pretraining and fine-tuning steps alike).
_STEP_COLUMNS = [
    ("row", lambda r: r.get("name")), ("what it runs", lambda r: r.get("runs")),
    ("ms/step (median)", lambda r: _fmt(r.get("ms"))), ("min-max", _range),
    ("images/s", lambda r: _fmt(r.get("images_per_s"))), ("MFU %", lambda r: _fmt(r.get("mfu_percent"), 1)),
    ("peak GiB", lambda r: _fmt(r.get("peak_mem_gib"))),
    ("compile + warm-up s", lambda r: _fmt(r.get("setup_s"), 1)),
    ("graphs compiled", lambda r: _fmt(r.get("compiled_graphs"), 0)),
    ("first loss", lambda r: _fmt(r.get("first_loss"), 3)),
    ("note", lambda r: r.get("error") or r.get("note", "")),
]

# Columns per table: (header, function of the row).
TABLES: dict[str, dict] = {
    "step": {
        "title": "Whole pretraining step, one optimizer update (same model size, batch, mask and data in every row)",
        "cols": _STEP_COLUMNS,
    },
    "finetune_step": {
        "title": "Whole fine-tuning step, one optimizer update (BEiT-B/16 at 224, 1000 classes, mixup targets, "
                 "drop path 0.1; same batch and optimizer in every row)",
        "cols": _STEP_COLUMNS,
    },
    "attention": {
        "title": "Attention with the relative position bias, forward + backward incl. the bias gradient (bias "
                 "\"table\": the model's path, table [T, H] + index, gradient to the table; \"dense\": an [H, N, N] "
                 "bias, the HF / timm patches' path)",
        "cols": [
            ("bias", lambda r: r.get("path", "dense")), ("shape", lambda r: r.get("shape")),
            ("candidate", lambda r: r.get("candidate")),
            ("ms fwd+bwd (median)", lambda r: _fmt(r.get("ms"), 3)), ("min-max", _range),
            ("ms fwd", lambda r: _fmt(r.get("fwd_ms"), 3)),
            ("TFLOP/s", lambda r: _fmt(r.get("tflops"), 1)),
            ("max rel. error vs fp32", lambda r: _fmt(r.get("max_rel_err"))),
            ("within tolerance", lambda r: _fmt(r.get("ok"))),
            ("note", lambda r: r.get("error") or r.get("skip") or r.get("note", "")),
        ],
    },
    "attention_kernels": {
        "title": "Our Triton attention kernels, each timed alone on the table path (the autotuner's choice)",
        "cols": [
            ("shape", lambda r: r.get("shape")), ("kernel", lambda r: r.get("kernel")),
            ("ms (median)", lambda r: _fmt(r.get("ms"), 3)), ("min-max", _range),
            ("configuration chosen", lambda r: r.get("config")),
            ("note", lambda r: r.get("error") or r.get("programs_note", "")),
        ],
    },
    "profile": {
        "title": "Where the compiled fast step's GPU time goes (torch.profiler, kernels classified by name and caller)",
        "cols": [
            ("component", lambda r: r.get("component")), ("ms/step", lambda r: _fmt(r.get("ms_per_step"), 2)),
            ("% of step", lambda r: _fmt(r.get("percent"), 1)), ("kernels/step", lambda r: _fmt(r.get("kernels_per_step"), 0)),
            ("largest kernel", lambda r: (r.get("top_kernel") or "")[:90]),
        ],
    },
    "profile_top": {
        "title": "Top kernels of the compiled fast step",
        "cols": [
            ("kernel", lambda r: (r.get("kernel") or "")[:110]), ("component", lambda r: r.get("component")),
            ("ms/step", lambda r: _fmt(r.get("ms_per_step"), 3)), ("calls/step", lambda r: _fmt(r.get("calls_per_step"), 0)),
        ],
    },
    "ce_chunk": {
        "title": "Fused linear + cross-entropy: chunk size swept (MAX_CHUNK_BYTES of kernels/cross_entropy.py)",
        "cols": [
            ("chunk MiB", lambda r: _fmt(r.get("chunk_mib"), 0)), ("rows/chunk", lambda r: _fmt(r.get("rows"), 0)),
            ("ms fwd+bwd (median)", lambda r: _fmt(r.get("ms"), 3)), ("min-max", _range),
            ("peak MiB", lambda r: _fmt(r.get("peak_mib"), 0)), ("loss", lambda r: _fmt(r.get("loss"), 5)),
            ("note", lambda r: r.get("error") or r.get("skip") or r.get("note", "")),
        ],
    },
    "patch_embed": {
        "title": "Patch embedding + mask token, forward + backward",
        "cols": [
            ("variant", lambda r: r.get("variant")), ("what it runs", lambda r: r.get("runs")),
            ("ms (median)", lambda r: _fmt(r.get("ms"), 3)), ("min-max", _range),
            ("peak MiB", lambda r: _fmt(r.get("peak_mib"), 0)),
            ("rel. error vs fp32 Conv2d", lambda r: _fmt(r.get("rel_err_vs_fp32"))),
            ("note", lambda r: r.get("error") or r.get("skip") or r.get("note", "")),
        ],
    },
    "fp8_parity": {
        "title": "Loss curves, bf16 vs FP8 (same init, same batches, same schedule)",
        "cols": [
            ("step", lambda r: r.get("step")), ("loss bf16", lambda r: _fmt(r.get("bf16"), 4)),
            ("loss fp8", lambda r: _fmt(r.get("fp8"), 4)), ("difference", lambda r: _fmt(r.get("diff"), 4)),
        ],
    },
    "tests": {
        "title": "Tests run on the card (BEIT_FAST_REAL_GPU=1)",
        "cols": [
            ("stage", lambda r: r.get("stage")), ("status", lambda r: r.get("status")),
            ("passed", lambda r: _fmt(r.get("passed"))), ("failed", lambda r: _fmt(r.get("failed"))),
            ("skipped", lambda r: _fmt(r.get("skipped"))), ("errors", lambda r: _fmt(r.get("errors"))),
            ("failures", lambda r: ", ".join(r.get("failures") or [])[:400]),
        ],
    },
    "env": {
        "title": "Environment",
        "cols": [("what", lambda r: r.get("key")), ("value", lambda r: r.get("value"))],
    },
}


def markdown_table(table: str, rows: list[dict]) -> list[str]:
    spec = TABLES.get(table)
    if spec is None:  # an unknown table: every key
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "table"]
        spec = {"title": table, "cols": [(k, (lambda r, k=k: _fmt(r.get(k)))) for k in keys]}
    cols = spec["cols"]
    out = [f"**{spec['title']}**", "", "| " + " | ".join(h for h, _ in cols) + " |",
           "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        cells = []
        for _, f in cols:
            v = f(r)
            cells.append(v.replace("|", "/").replace("\n", " ") if isinstance(v, str) else _fmt(v))
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


# --------------------------------------------------------------------------------------------------
# what the numbers say
# --------------------------------------------------------------------------------------------------

HEADLINE = "beit_fast"  # the default step row (attention "auto"): the option rows are compared with it
OURS = ("beit_fast", "beit_fast_triton", "beit_fast_sdpa")  # the headline is the fastest of these in the run
OPTIONS = ("beit_fast_sync_free", "beit_fast_cudagraphs", "beit_fast_autotune", "beit_fast_fp8")  # vs beit_fast
EAGER_REFERENCE = "reference_eager"
COMPILED_PEERS = ("hf_compiled", "timm_compiled")
TARGETS = {"images_per_s": 4500.0, "vs_eager_reference": 2.5, "vs_best_compiled_peer": 1.3,
           "attention_ms_b256_n197": 1.0, "hf_patched_vs_hf": 1.3,
           "finetune_vs_eager": 2.0, "finetune_vs_timm_compiled": 1.2}
FINETUNE_OURS = ("ft_beit_fast", "ft_beit_fast_triton")  # the fast fine-tuning rows: the faster one is ours
FINETUNE_EAGER, FINETUNE_TIMM = "ft_eager", "ft_timm_compiled"


def _ok_steps(rows: list[dict], table: str = "step") -> dict[str, dict]:
    return {r["name"]: r for r in rows if r.get("table") == table and r.get("ms")}


def finetune_lines(rows: list[dict]) -> list[str]:
    """The fine-tuning step's numbers against issue 13's targets, every ratio from this run."""
    steps = _ok_steps(rows, "finetune_step")
    ours = [steps[n] for n in FINETUNE_OURS if n in steps]
    if not ours:
        return []
    fast = min(ours, key=lambda r: r["ms"])
    s = (f"fine-tuning step ({fast['name']}): {fast['ms']:.1f} ms [{_range(fast)}], "
         f"{fast.get('images_per_s', 0):,.0f} images/s")
    if fast.get("mfu_percent") is not None:
        s += f", {fast['mfu_percent']:.1f}% of the bf16 peak"
    lines = [s]
    for name, key, what in ((FINETUNE_EAGER, "finetune_vs_eager", "the eager fine-tuning step"),
                            (FINETUNE_TIMM, "finetune_vs_timm_compiled", "timm beit_base_patch16_224 compiled")):
        other = steps.get(name)
        if other:
            lines.append(f"fine-tuning vs {what}: {other['ms'] / fast['ms']:.2f}x (target {TARGETS[key]}x)"
                         + (" [ranges overlap]" if _overlap(other, fast) else ""))
    return lines


def _overlap(a: dict, b: dict) -> bool:
    return (a.get("ms_min") is not None and b.get("ms_min") is not None
            and a["ms_min"] <= b["ms_max"] and b["ms_min"] <= a["ms_max"])


def headline(rows: list[dict]) -> str:
    """The name of the fastest of our step rows (:data:`OURS`) that ran in this run, else :data:`HEADLINE`."""
    steps = _ok_steps(rows)
    ours = [steps[n] for n in OURS if n in steps]
    return min(ours, key=lambda r: r["ms"])["name"] if ours else HEADLINE


def ratios(rows: list[dict]) -> list[dict]:
    """Speed ratios between step rows of this run (``a`` over ``b`` = b's ms / a's ms), with a flag when
    the two rows' min-max ranges overlap (then the order is not established by this run)."""
    steps = _ok_steps(rows)
    top = headline(rows)
    base = HEADLINE if HEADLINE in steps else top  # the option rows run on the default (attention "auto") step
    pairs = [(top, EAGER_REFERENCE), (top, "reference_compiled"), (top, "hf_eager"),
             (top, "hf_compiled"), (top, "timm_compiled"), ("beit_fast_triton", "beit_fast_sdpa"),
             ("hf_patched", "hf_eager"),
             ("hf_patched_compiled", "hf_compiled"), ("reference_compiled", EAGER_REFERENCE),
             ("hf_compiled", "hf_eager"), ("beit_fast_sync_free", base), ("beit_fast_cudagraphs", base),
             ("beit_fast_autotune", base), ("beit_fast_fp8", base)]
    out = []
    for a, b in pairs:
        if a in steps and b in steps:
            out.append({"a": a, "b": b, "speedup": steps[b]["ms"] / steps[a]["ms"],
                        "ranges_overlap": _overlap(steps[a], steps[b])})
    ft = _ok_steps(rows, "finetune_step")
    for a in FINETUNE_OURS:
        for b in (FINETUNE_EAGER, FINETUNE_TIMM):
            if a in ft and b in ft:
                out.append({"a": a, "b": b, "speedup": ft[b]["ms"] / ft[a]["ms"], "ranges_overlap": _overlap(ft[a], ft[b])})
    return out


def best_compiled_peer(rows: list[dict]) -> dict | None:
    steps = _ok_steps(rows)
    peers = [steps[n] for n in COMPILED_PEERS if n in steps]
    return min(peers, key=lambda r: r["ms"]) if peers else None


def summary_lines(rows: list[dict]) -> list[str]:
    """The few numbers that matter, each from this run, against the targets of issue 11."""
    steps = _ok_steps(rows)
    lines = []
    fast = steps.get(headline(rows))
    if fast:
        s = (f"{fast['name']} step: {fast['ms']:.1f} ms [{_range(fast)}], {fast.get('images_per_s', 0):,.0f} images/s"
             f" (target {TARGETS['images_per_s']:,.0f})")
        if fast.get("mfu_percent") is not None:
            s += f", {fast['mfu_percent']:.1f}% of the bf16 peak"
        lines.append(s)
        ref = steps.get(EAGER_REFERENCE)
        if ref:
            lines.append(f"vs eager reference: {ref['ms'] / fast['ms']:.2f}x (target {TARGETS['vs_eager_reference']}x)"
                         + (" [ranges overlap]" if _overlap(ref, fast) else ""))
        peer = best_compiled_peer(rows)
        if peer:
            lines.append(f"vs best compiled peer ({peer['name']}): {peer['ms'] / fast['ms']:.2f}x "
                         f"(target {TARGETS['vs_best_compiled_peer']}x)" + (" [ranges overlap]" if _overlap(peer, fast) else ""))
    hp, he = steps.get("hf_patched"), steps.get("hf_eager")
    if hp and he:
        lines.append(f"HF patched vs HF (eager, SDPA): {he['ms'] / hp['ms']:.2f}x (target {TARGETS['hf_patched_vs_hf']}x)")
    att = [r for r in _attention_rows(rows) if r.get("ms") and r.get("ok") is not False
           and str(r.get("shape", "")).startswith("B256") and "N197" in str(r.get("shape", ""))]
    if att:
        best = min(att, key=lambda r: r["ms"])
        lines.append(f"attention B256 N197 fwd+bwd ({best.get('path', 'dense')} bias): best {best['candidate']} "
                     f"{best['ms']:.3f} ms (target <= {TARGETS['attention_ms_b256_n197']} ms)")
    for r in ratios(rows):
        overlap = " [ranges overlap: not a measured difference]" if r["ranges_overlap"] else ""
        if r["a"] in OPTIONS:
            lines.append(f"option {r['a']}: {r['speedup']:.3f}x the default step{overlap}")
        elif (r["a"], r["b"]) == ("beit_fast_triton", "beit_fast_sdpa"):
            lines.append(f"attention triton vs sdpa in the whole step: {r['speedup']:.3f}x{overlap}")
    lines += finetune_lines(rows)
    setups = [r["setup_s"] for r in rows if r.get("table") in ("step", "finetune_step") and r.get("setup_s") is not None]
    if setups:
        lines.append(f"compile + warm-up of the {len(setups)} step rows: {sum(setups):.0f} s in all (their setup_s)")
    fp8 = [r for r in rows if r.get("table") == "fp8_summary"]
    if fp8:
        r = fp8[-1]
        lines.append(f"fp8 loss curve: mean |fp8 - bf16| over the last {r.get('last_n')} steps "
                     f"{_fmt(r.get('mean_abs_diff_last'), 4)} (final bf16 {_fmt(r.get('final_bf16'), 3)}, "
                     f"fp8 {_fmt(r.get('final_fp8'), 3)})")
    return lines


def derived_rows(rows: list[dict], every: int = 10, last_n: int = 50) -> list[dict]:
    """Rows computed from other rows of the run: the bf16 vs FP8 loss curves side by side."""
    curves = {r.get("variant"): r for r in rows if r.get("table") == "loss_curve"}
    if "bf16" not in curves or "fp8" not in curves:
        return []
    a, b = curves["bf16"]["losses"], curves["fp8"]["losses"]
    n = min(len(a), len(b))
    out = [{"table": "fp8_parity", "step": i, "bf16": a[i], "fp8": b[i], "diff": b[i] - a[i]}
           for i in range(n) if i % every == 0 or i == n - 1]
    tail = range(max(0, n - last_n), n)
    if n:
        out.append({"table": "fp8_summary", "steps": n, "last_n": len(tail), "final_bf16": a[n - 1],
                    "final_fp8": b[n - 1], "mean_abs_diff_last": sum(abs(b[i] - a[i]) for i in tail) / len(tail),
                    "mean_rel_diff_last": sum(abs(b[i] - a[i]) / abs(a[i]) for i in tail) / len(tail)})
    return out


def _attention_rows(rows: list[dict]) -> list[dict]:
    """The attention rows that decide: the table path's (the model's) when the run has them, else the dense."""
    att = [r for r in rows if r.get("table") == "attention"]
    table = [r for r in att if r.get("path") == "table"]
    return table or att


def attention_backends(rows: list[dict]) -> tuple[str, ...]:
    """beit_fast's attention backends as the env stage found them (empty when it did not run)."""
    for r in rows:
        if r.get("table") == "attention_backends":
            return tuple(r.get("backends", ()))
    return ()


# backends of beit_fast.ops.attention_with_bias that auto may pick (benchmark-only candidates excluded)
def propose_auto_priority(rows: list[dict], backends: tuple[str, ...], shape_prefix: str = "B256") -> dict:
    """An ``AUTO_PRIORITY["cuda"]`` order from this run's attention rows (the table path's, the model's, when
    the run has them): the candidates that are real
    backends, ran and stayed within tolerance, fastest first at the primary shape (then the other shapes'
    mean rank as a tie-break), followed by the backends that did not run or failed, "math" before those
    that failed. Returns ``{"order": (...), "measurements": {shape: {candidate: ms or reason}}}``."""
    att = _attention_rows(rows)
    measurements: dict[str, dict] = {}
    for r in att:
        if r.get("ms") is not None:
            val = round(r["ms"], 3) if r.get("ok") is not False else f"{r['ms']:.3f} ms, outside tolerance"
        else:
            val = (r.get("error") or r.get("skip") or "no result")[:120]
        measurements.setdefault(r.get("shape", "?"), {})[r.get("candidate")] = val
    good = {}
    for r in att:
        if r.get("ms") is not None and r.get("ok") is not False and r.get("candidate") in backends:
            good.setdefault(r["candidate"], {})[r.get("shape")] = r["ms"]
    primary = [s for s in measurements if str(s).startswith(shape_prefix)]

    def key(name: str):
        times = good[name]
        prim = [times[s] for s in primary if s in times]
        return (0 if prim else 1, prim[0] if prim else float("inf"), sum(times.values()) / len(times))

    order = sorted(good, key=key)
    failed = [b for b in backends if b not in order and any(
        r.get("candidate") == b and (r.get("error") or r.get("ok") is False) for r in att)]
    rest = [b for b in backends if b not in order and b not in failed]
    if "math" in failed:  # math is the always-works fallback
        failed.remove("math")
        rest.insert(0, "math")
    return {"order": tuple(order + rest + failed), "measurements": measurements}


def write_report(out_dir: Path, stem: str, meta: dict, stages: list[StageResult], rows: list[dict],
                 plan: list[Stage], backends: tuple[str, ...] = ()) -> str:
    """Write ``<stem>.md`` and ``<stem>.json`` (and LATEST.md) into ``out_dir``; returns the markdown."""
    rows = [r for r in rows if r.get("table") not in ("fp8_parity", "fp8_summary")] + derived_rows(rows)
    backends = backends or attention_backends(rows)
    lines = [f"### GPU report: {meta.get('card', '?')} ({meta.get('date', '?')})", ""]
    lines.append("; ".join(f"{k}: {' '.join(str(v).split())}" for k, v in meta.items() if k not in ("card", "date")))
    lines.append("")
    summ = summary_lines(rows)
    if summ:
        lines += ["**Summary (every ratio from this run)**", ""] + [f"- {s}" for s in summ] + [""]
    proposal = propose_auto_priority(rows, backends) if backends else None
    if proposal and any(r.get("table") == "attention" for r in rows):
        lines += ["**Proposed `AUTO_PRIORITY[\"cuda\"]`** (from the attention rows below; commit it with the "
                  "measurements to beit_fast/ops/attention.py)", "", "```python",
                  f"AUTO_PRIORITY[\"cuda\"] = {proposal['order']!r}",
                  f"AUTO_PRIORITY_MEASUREMENTS[\"ms_fwd_bwd\"] = {json.dumps(proposal['measurements'])}", "```", ""]
    lines += ["**Stages** (each its own process, killed at its limit)", "",
              "| stage | what | status | seconds | limit | planned | rows | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    planned = {s.name: s for s in plan}
    done = {s.stage for s in stages}
    for s in stages:
        p = planned.get(s.stage)
        lines.append(f"| {s.stage} | {p.what if p else ''} | {s.status} | {s.seconds} | {s.limit_s} | "
                     f"{p.expect_s if p else ''} | {s.rows} | {s.note.replace('|', '/')} |")
    for p in plan:
        if p.name not in done:
            lines.append(f"| {p.name} | {p.what} | not run yet | | {p.limit_s} | {p.expect_s} | | |")
    lines.append("")
    order = [t for t in TABLES if t != "env"] + ["env"]
    hidden = {"loss_curve", "attention_backends"}  # in the json only
    seen = [t for t in dict.fromkeys(r.get("table") for r in rows) if t not in hidden]
    for table in order + [t for t in seen if t not in order]:
        trs = [r for r in rows if r.get("table") == table]
        if table in ("step", "finetune_step"):
            trs = sorted(trs, key=lambda r: (r.get("ms") is None, r.get("ms") or 0))
        if table == "attention":
            trs = sorted(trs, key=lambda r: (r.get("path") != "table", str(r.get("shape")), r.get("ms") is None,
                                             r.get("ms") or 0))
        if trs:
            lines += markdown_table(table, trs)
    md = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "summary": summ, "ratios": ratios(rows), "auto_priority": proposal,
         "stages": [asdict(s) for s in stages], "plan": [asdict(p) for p in plan], "rows": rows},
        indent=1, default=str))
    return md
