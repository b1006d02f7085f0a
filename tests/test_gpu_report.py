"""The GPU report's machinery on CPU: stage runner (a stage that times out keeps its rows), tables and
json, ratios, the proposed attention order, the profile classifier, the attention candidates' skip paths,
and the benchmark summary lines of ``pytest benchmarks/ --benchmark-only`` (labels, never timings)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import report_lib as R  # noqa: E402
from profile_step import classify, component_rows, kernel_records, profile_steps  # noqa: E402

PY = sys.executable


def _emit_cmd(rows: int, then: str = "") -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); from report_lib import RowWriter; "
            f"w = RowWriter(sys.argv[1]); [w.emit('step', name=f'v{{i}}', ms=10.0 + i, ms_min=9.0 + i, "
            f"ms_max=11.0 + i) for i in range({rows})]; {then}")
    return [PY, "-c", code, "{rows}"]


# --------------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------------
def test_stage_that_times_out_is_killed_and_keeps_its_rows(tmp_path):
    stage = R.Stage("sleepy", _emit_cmd(2, "import time; time.sleep(60)"), limit_s=3, expect_s=1, what="x", min_s=1)
    t0 = time.time()
    with open(tmp_path / "log", "w") as log:
        res = R.run_stage(stage, tmp_path / "sleepy.jsonl", time.time() + 100, tmp_path, {}, log)
    assert time.time() - t0 < 30
    assert res.status == "timed out" and res.rc == 124 and "killed at its limit" in res.note
    assert res.rows == 2 and [r["name"] for r in R.read_rows(tmp_path / "sleepy.jsonl")] == ["v0", "v1"]


def test_failing_stage_and_budget(tmp_path):
    log = open(tmp_path / "log", "w")
    bad = R.Stage("bad", _emit_cmd(1, "raise ValueError('boom here')"), 30, 1, "x", min_s=1)
    res = R.run_stage(bad, tmp_path / "bad.jsonl", time.time() + 100, tmp_path, {}, log)
    assert res.status == "failed" and res.rc == 1 and "ValueError: boom here" in res.note and res.rows == 1
    late = R.Stage("late", _emit_cmd(1), 30, 1, "x", min_s=20)
    res = R.run_stage(late, tmp_path / "late.jsonl", time.time() + 5, tmp_path, {}, log)
    assert res.status == "skipped" and "left" in res.note and not (tmp_path / "late.jsonl").exists()
    # the limit is cut to what is left of the budget
    res = R.run_stage(R.Stage("cut", _emit_cmd(0, "import time; time.sleep(60)"), 600, 1, "x", min_s=1),
                      tmp_path / "cut.jsonl", time.time() + 3, tmp_path, {}, log)
    assert res.status == "timed out" and res.limit_s <= 3


def test_pytest_stage_writes_its_outcome_as_a_row(tmp_path):
    """A stage that runs pytest leaves its counts and failing ids in the report (not only in the log), also
    when it is killed before pytest's summary."""
    test_file = tmp_path / "test_x.py"
    test_file.write_text("import pytest\ndef test_a(): pass\ndef test_b(): assert 0\n"
                         "@pytest.mark.skip\ndef test_c(): pass\n")
    cmd = [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", str(test_file)]
    with open(tmp_path / "log", "w") as log:
        res = R.run_stage(R.Stage("t", cmd, 120, 1, "x", min_s=1), tmp_path / "t.jsonl", time.time() + 200,
                          tmp_path, {**__import__("os").environ, "PYTEST_ADDOPTS": ""}, log)
    assert res.status == "failed"
    (row,) = R.read_rows(tmp_path / "t.jsonl")
    assert (row["table"], row["passed"], row["failed"], row["skipped"]) == ("tests", 1, 1, 1)
    assert row["failures"] == [f"{test_file.name}::test_b"] or row["failures"][0].endswith("test_x.py::test_b")
    cut = R.pytest_outcome("..F.s", "t", "timed out")
    assert cut["passed"] is None and cut["status"] == "timed out"
    md = "\n".join(R.markdown_table("tests", [row]))
    assert "| t | failed | 1 | 1 | 1 |" in md


def test_read_rows_skips_a_line_cut_short(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"table": "step", "name": "a"}\n{"table": "step", "na')
    assert R.read_rows(f) == [{"table": "step", "name": "a"}]
    assert R.read_rows(tmp_path / "missing.jsonl") == []


def test_spread():
    s = R.spread([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4 and s["iqr"] > 0
    assert R.spread([5.0])["iqr"] == 0.0 and R.spread([])["n"] == 0


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    step = lambda name, ms, lo, hi, **kw: {"table": "step", "name": name, "runs": f"runs {name}", "ms": ms,  # noqa
                                           "ms_min": lo, "ms_max": hi, "images_per_s": 256 / ms * 1e3, **kw}
    att = lambda cand, ms, ok=True, **kw: {"table": "attention", "shape": "B256 H12 N197 Dh64", "candidate": cand,  # noqa
                                           "ms": ms, "ms_min": ms, "ms_max": ms, "ok": ok, **kw}
    return [
        step("beit_fast", 60.0, 59.0, 61.0, mfu_percent=45.0), step("reference_eager", 180.0, 178.0, 182.0),
        step("hf_compiled", 100.0, 98.0, 101.0), step("timm_compiled", 90.0, 89.0, 92.0),
        step("hf_eager", 145.0, 144.0, 146.0), step("hf_patched", 100.0, 99.0, 101.0),
        step("beit_fast_sync_free", 59.5, 58.5, 60.5), {"table": "step", "name": "hf_patched_compiled", "error": "Boom"},
        att("math", 3.6), att("sdpa", 2.8), att("triton", 0.9), att("cudnn", 0.7),
        att("flex", None, ok=None, error="InductorError: out of resource"), att("bad", 0.1, ok=False),
        {"table": "attention", "shape": "B256 H12 N197 Dh64", "candidate": "xformers", "skip": "not installed"},
        {"table": "attention", "shape": "B64 H12 N577 Dh64", "candidate": "sdpa", "ms": 1.5, "ok": True},
        {"table": "attention_backends", "backends": ["math", "sdpa", "flex", "xformers", "triton"]},
        {"table": "profile", "component": "gemm", "ms_per_step": 30.0, "percent": 50.0, "kernels_per_step": 100,
         "top_kernel": "nvjet_tst_128x256"},
        {"table": "loss_curve", "variant": "bf16", "losses": [9.0, 8.0, 7.0]},
        {"table": "loss_curve", "variant": "fp8", "losses": [9.0, 8.1, 7.05]},
        {"table": "env", "key": "torch", "value": "2.11.0"},
    ]


def test_ratios_summary_and_overlap():
    rows = _rows()
    rat = {(r["a"], r["b"]): r for r in R.ratios(rows)}
    assert rat[("beit_fast", "reference_eager")]["speedup"] == pytest.approx(3.0)
    assert not rat[("beit_fast", "reference_eager")]["ranges_overlap"]
    assert rat[("beit_fast_sync_free", "beit_fast")]["ranges_overlap"]
    assert R.best_compiled_peer(rows)["name"] == "timm_compiled"
    text = "\n".join(R.summary_lines(rows))
    assert "vs eager reference: 3.00x" in text and "vs best compiled peer (timm_compiled): 1.50x" in text
    assert "HF patched vs HF (eager, SDPA): 1.45x" in text
    assert "best cudnn 0.700 ms" in text  # cudnn is the fastest candidate within tolerance ("bad" is not)
    assert "beit_fast_sync_free" in text and "ranges overlap" in text
    assert "fp8 loss curve" in "\n".join(R.summary_lines(rows + R.derived_rows(rows)))


def test_headline_is_the_fastest_of_ours_and_the_table_path_decides_attention(tmp_path):
    """Call 1 measures beit_fast with attention triton and sdpa: the ratios are about the faster one; the
    attention rows of the model's path (table) decide the proposed AUTO_PRIORITY and the summary's best,
    the dense rows are shown too; each kernel's own row and the autotuner's choice are in the report."""
    step = lambda name, ms: {"table": "step", "name": name, "runs": name, "ms": ms, "ms_min": ms - 1,  # noqa
                             "ms_max": ms + 1, "images_per_s": 256 / ms * 1e3}
    att = lambda path, cand, ms: {"table": "attention", "path": path, "shape": "B256 H12 N197 Dh64",  # noqa
                                  "candidate": cand, "ms": ms, "ms_min": ms, "ms_max": ms, "ok": True}
    rows = [step("beit_fast_triton", 80.0), step("beit_fast_sdpa", 95.0), step("reference_eager", 200.0),
            step("timm_compiled", 100.0), att("table", "triton", 0.9), att("table", "sdpa", 2.8),
            att("dense", "sdpa", 0.5), att("dense", "triton", 1.5),
            {"table": "attention_backends", "backends": ["math", "sdpa", "flex", "xformers", "triton"]},
            {"table": "attention_kernels", "shape": "B256 H12 N197 Dh64", "kernel": "table gradient", "ms": 0.05,
             "ms_min": 0.05, "ms_max": 0.06, "config": "BLOCK_T: 4, BLOCK_C: 32, num_warps: 4",
             "configs_ms": {"BLOCK_T: 16": 0.09}}]
    assert R.headline(rows) == "beit_fast_triton" and R.headline(rows[1:]) == "beit_fast_sdpa"
    text = "\n".join(R.summary_lines(rows))
    assert "beit_fast_triton step: 80.0 ms" in text and "vs eager reference: 2.50x" in text
    assert "vs best compiled peer (timm_compiled): 1.25x" in text
    assert "attention B256 N197 fwd+bwd (table bias): best triton 0.900 ms" in text
    rat = {(r["a"], r["b"]): r["speedup"] for r in R.ratios(rows)}
    assert rat[("beit_fast_triton", "beit_fast_sdpa")] == pytest.approx(95 / 80)
    assert "attention triton vs sdpa in the whole step: 1.188x" in text and "option beit_fast_triton" not in text
    prop = R.propose_auto_priority(rows, R.attention_backends(rows))
    assert prop["order"][:2] == ("triton", "sdpa")  # the table path's order, not the dense one's
    md = R.write_report(tmp_path, "stem", {"card": "Fake GPU"}, [], rows, [])
    assert "| table | B256 H12 N197 Dh64 | triton | 0.900 |" in md and "| dense | B256 H12 N197 Dh64 | sdpa |" in md
    assert md.index("| table | B256") < md.index("| dense | B256")
    assert "| B256 H12 N197 Dh64 | table gradient | 0.050 |" in md and "BLOCK_T: 4, BLOCK_C: 32" in md


def _finetune_rows() -> list[dict]:
    row = lambda name, ms, lo, hi: {"table": "finetune_step", "name": name, "runs": f"runs {name}", "ms": ms,  # noqa
                                    "ms_min": lo, "ms_max": hi, "images_per_s": 256 / ms * 1e3}
    return [row("ft_eager", 300.0, 295.0, 305.0), row("ft_beit_fast", 150.0, 149.0, 151.0),
            row("ft_beit_fast_triton", 140.0, 139.0, 141.0), row("ft_timm_compiled", 180.0, 139.5, 182.0),
            {"table": "finetune_step", "name": "ft_other", "error": "Boom"}]


def test_finetune_rows_summary_ratios_and_table(tmp_path):
    """The fine-tuning stage's rows: the faster of our two rows against the eager step (target 2x) and timm
    compiled (target 1.2x), overlap flagged; the report has their table."""
    rows = _rows() + _finetune_rows()
    text = "\n".join(R.summary_lines(rows))
    assert "fine-tuning step (ft_beit_fast_triton): 140.0 ms [139.0-141.0], 1,829 images/s" in text
    assert "fine-tuning vs the eager fine-tuning step: 2.14x (target 2.0x)" in text
    assert "fine-tuning vs timm beit_base_patch16_224 compiled: 1.29x (target 1.2x) [ranges overlap]" in text
    rat = {(r["a"], r["b"]): r for r in R.ratios(rows)}
    assert rat[("ft_beit_fast", "ft_eager")]["speedup"] == pytest.approx(2.0)
    assert "fine-tuning" not in "\n".join(R.summary_lines(_rows()))  # no rows, no lines
    md = R.write_report(tmp_path, "stem", {"card": "Fake GPU"}, [], rows, [])
    assert "Whole fine-tuning step" in md and "| ft_beit_fast_triton | runs ft_beit_fast_triton | 140.0 |" in md
    assert "| ft_other |" in md and "Boom" in md


def test_finetune_stage_runs_on_cpu(tmp_path):
    """gpu_stages.py finetune at the CPU sizes, uncompiled (BEIT_FAST_SMOKE_NO_COMPILE): every variant that can
    run on a CPU writes a timed row (the code paths of the eager step, the fast loss module and timm's)."""
    pytest.importorskip("timm")
    rows_file = tmp_path / "rows.jsonl"
    env = {**__import__("os").environ, "BEIT_FAST_SMOKE_NO_COMPILE": "1"}
    r = subprocess.run([PY, str(BENCH / "gpu_stages.py"), "finetune", "--variants", "ft_eager,ft_beit_fast,ft_timm_compiled",
                        "--rows", str(rows_file)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = R.read_rows(rows_file)
    assert [row["name"] for row in rows] == ["ft_eager", "ft_beit_fast", "ft_timm_compiled"]
    for row in rows:
        assert row["table"] == "finetune_step" and row["ms"] > 0 and row["repeats"] == 2 and "error" not in row
        assert row["first_loss"] == pytest.approx(rows[0]["first_loss"], rel=0.2)  # ln(10) at init, all three
    assert "attention=sdpa" in rows[1]["runs"]


def test_fast_stage_loss_curve_runs_on_cpu(tmp_path):
    """The headline stage's bf16 loss curve (what the fp8 curve is compared with) trains on fresh batches whose
    token ids reach the whole vocabulary: the stand-in tokenizer must say the model's vocabulary size, not the
    largest id of the first batch (the engine counts the targets into a vocabulary-sized histogram)."""
    rows_file = tmp_path / "rows.jsonl"
    env = {**__import__("os").environ, "BEIT_FAST_SMOKE_NO_COMPILE": "1"}
    r = subprocess.run([PY, str(BENCH / "gpu_stages.py"), "step", "--variants", "beit_fast", "--extras", "curve",
                        "--curve-steps", "4", "--rows", str(rows_file)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = R.read_rows(rows_file)
    assert [row.get("error") for row in rows] == [None] * len(rows), rows
    curve, = [row for row in rows if row["table"] == "loss_curve"]
    assert curve["variant"] == "bf16" and len(curve["losses"]) == 4
    assert all(0 < x < 20 for x in curve["losses"])


def test_cpu_smoke_compiles_the_headline_steps(tmp_path):
    """Call 1's headline rows as the GPU runs them, at CPU sizes: beit_fast with attention triton (its kernels in
    Triton's interpreter) and sdpa, each through inductor's torch.compile on the CPU (a compile-time failure
    shows here, not first on the card), then the profile of the faster one (about 60 s of CPU time)."""
    rows_file = tmp_path / "rows.jsonl"
    env = {k: v for k, v in __import__("os").environ.items() if k != "BEIT_FAST_SMOKE_NO_COMPILE"}
    r = subprocess.run([PY, str(BENCH / "gpu_stages.py"), "step", "--variants", "beit_fast_triton,beit_fast_sdpa",
                        "--extras", "profile", "--repeats", "1", "--rows", str(rows_file)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = R.read_rows(rows_file)
    steps = [row for row in rows if row["table"] == "step"]
    assert [row["name"] for row in steps] == ["beit_fast_triton", "beit_fast_sdpa"]
    assert all("error" not in row and row["ms"] > 0 for row in steps), steps
    assert "attention=triton" in steps[0]["runs"] and "attention=sdpa" in steps[1]["runs"]
    assert all(row["compiled_graphs"] >= 1 for row in steps)  # inductor compiled each (not the eager fallback)
    assert steps[0]["first_loss"] == pytest.approx(steps[1]["first_loss"], rel=1e-3)  # same init, same batch
    fastest = min(steps, key=lambda row: row["ms"])["name"]
    profile = [row for row in rows if row["table"] == "profile"]
    assert profile and {row["variant"] for row in profile} == {fastest}


def test_proposed_auto_priority_keeps_only_backends_and_ranks_failures_last():
    rows = _rows()
    prop = R.propose_auto_priority(rows, R.attention_backends(rows))
    assert prop["order"] == ("triton", "sdpa", "math", "xformers", "flex")  # cudnn: not a backend
    m = prop["measurements"]["B256 H12 N197 Dh64"]
    assert m["triton"] == 0.9 and "out of resource" in m["flex"] and "outside tolerance" in m["bad"]


def test_write_report_md_and_json(tmp_path):
    rows = _rows()
    stages = [R.StageResult("fast", "ok", 0, 50.0, 150.0, 3), R.StageResult("slow", "timed out", 124, 90.0, 90.0, 1,
                                                                             "killed at its limit of 90 s")]
    plan = [R.Stage("fast", ["x"], 150, 60, "the headline"), R.Stage("slow", ["x"], 90, 30, "slow one"),
            R.Stage("later", ["x"], 60, 20, "not reached")]
    md = R.write_report(tmp_path, "stem", {"card": "Fake GPU", "date": "2026-12-01", "torch": "2.11"}, stages,
                        rows, plan)
    assert (tmp_path / "stem.md").read_text().strip() == md.strip()
    for text in ("### GPU report: Fake GPU", "Summary (every ratio from this run)", "AUTO_PRIORITY[\"cuda\"] = ",
                 "| slow | slow one | timed out |", "| later | not reached | not run yet |",
                 "Whole pretraining step", "| beit_fast | runs beit_fast | 60.00 | 59.00-61.00 |", "Boom",
                 "Where the compiled fast step's GPU time goes", "Loss curves, bf16 vs FP8", "Environment"):
        assert text in md, text
    data = json.loads((tmp_path / "stem.json").read_text())
    assert data["auto_priority"]["order"][0] == "triton"
    assert {s["stage"] for s in data["stages"]} == {"fast", "slow"}
    assert any(r["table"] == "fp8_summary" for r in data["rows"])


def test_gpu_report_main_runs_stages_and_writes_after_each(tmp_path, monkeypatch):
    """The orchestrator end to end with fake stages: one writes rows, one times out, one is skipped for
    lack of budget; the report files exist and say so."""
    import gpu_report

    fake = [R.Stage("env", _emit_cmd(1), 30, 1, "first", min_s=1),
            R.Stage("hang", _emit_cmd(1, "import time; time.sleep(60)"), 4, 1, "hangs", min_s=1),
            R.Stage("never", _emit_cmd(1), 30, 1, "needs more budget", min_s=500)]
    monkeypatch.setattr(gpu_report, "build_plans", lambda args, cuda=True: {1: fake})
    monkeypatch.setattr(gpu_report, "WHEEL_DIR", tmp_path / "no-wheels")
    monkeypatch.setattr(gpu_report, "source_shim", lambda env: "this tree")
    out = tmp_path / "out"
    rc = gpu_report.main(["--cpu-smoke", "--budget", "60", "--results-dir", str(tmp_path / "res"), "--out", str(out)])
    assert rc == 0
    md = (out / "LATEST.md").read_text()
    assert "| env | first | ok |" in md and "| hang | hangs | timed out |" in md and "| never | needs more budget | skipped |" in md
    data = json.loads(next(out.glob("*-cpu-smoke-plan1.json")).read_text())
    assert len([r for r in data["rows"] if r["table"] == "step"]) == 2


def _args(**kw):
    import argparse

    return argparse.Namespace(**{**dict(batch=None, repeats=5, curve_steps=120, only="", skip="", plan=1), **kw})


def test_call1_fits_the_command_limit_on_an_h100_in_order():
    """Call 1: environment, the CUDA tests of our attention, the table-path attention candidates, then the
    headline step table in one process (beit_fast triton and sdpa, the eager reference, HF eager, timm compiled,
    HF compiled) with the profile; planned seconds on an H100 and its stage limits within 540 s."""
    import gpu_report

    plans = gpu_report.build_plans(_args())
    call1 = plans[1]
    assert [s.name for s in call1] == ["env", "attention_tests", "attention_table", "steps"]
    assert gpu_report.planned_total(call1, "H100") <= gpu_report.COMMAND_LIMIT_S <= 540
    assert gpu_report.SETUP_S["H100"] + sum(s.limit_s for s in call1) <= 540
    assert gpu_report.planned_total(call1, "H200") <= gpu_report.planned_total(call1, "H100")
    tests, table, steps = call1[1:]
    assert "tests/test_ops_attention_triton.py" in tests.cmd and tests.planned("H100") <= 75
    cands = table.cmd[table.cmd.index("--candidates") + 1].split(",")
    assert table.cmd[2] == "attention_table" and "triton" in cands and "sdpa" in cands
    variants = steps.cmd[steps.cmd.index("--variants") + 1].split(",")
    assert variants[:2] == ["beit_fast_triton", "beit_fast_sdpa"]
    assert {"reference_eager", "hf_eager", "timm_compiled", "hf_compiled"} <= set(variants)
    assert "profile" in steps.cmd[steps.cmd.index("--extras") + 1]
    # call 2 and the later plans hold the rest, each within the limit too
    rest = {s.name for n in (2, 3, 4) for s in plans[n]}
    assert {"finetune", "end_to_end", "tokenizer", "hf_patched_compiled", "fp8", "options", "autotune",
            "gpu_tests"} <= rest
    assert [s.name for s in plans[2]][1] == "finetune"
    for n in (2, 3, 4):
        assert gpu_report.planned_total(plans[n], "H100") <= 540, n
    text = gpu_report.plan_text(plans)
    assert "plan 1 (call 1;" in text and f"{gpu_report.planned_total(call1):>7.0f}" in text


def test_stage_selection_only_skip_and_errors():
    import gpu_report

    plans = gpu_report.build_plans(_args())
    assert [s.name for s in gpu_report.select_stages(_args(only="fp8"), plans)] == ["env", "options", "fp8"]
    assert [s.name for s in gpu_report.select_stages(_args(only="steps,finetune"), plans)] == ["env", "steps",
                                                                                              "finetune"]
    assert [s.name for s in gpu_report.select_stages(_args(plan=2, skip="end_to_end"), plans)] == ["env", "finetune"]
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_report.select_stages(_args(only="nonsense"), plans)
    with pytest.raises(SystemExit, match="plans are 1, 2, 3, 4"):
        gpu_report.select_stages(_args(plan=9), plans)


def test_dry_plan_needs_no_gpu(capsys):
    import gpu_report

    assert gpu_report.main(["--dry-plan"]) == 0
    out = capsys.readouterr().out
    for text in ("plan 1 (call 1;", "attention_table", "H100 s", "H200 s", "plan 2 (call 2", "a session: 900 s"):
        assert text in out, text


def test_source_shim_never_puts_the_repository_root_on_the_path(tmp_path, monkeypatch):
    """Without an installed beit_fast, the stages see this tree's package through a folder holding only a link
    to it: ``import kernels`` does not find our kernels/ folder, beit_fast.kernels is ours."""
    import gpu_report

    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    monkeypatch.setattr(gpu_report.subprocess, "run", _fail_first_probe(gpu_report.subprocess.run))
    note = gpu_report.source_shim(env)
    assert "not on PYTHONPATH" in note
    paths = env["PYTHONPATH"].split(__import__("os").pathsep)
    assert str(gpu_report.ROOT) not in paths
    site = Path(paths[0])
    assert [p.name for p in site.iterdir()] == ["beit_fast"]
    code = ("import importlib.util, beit_fast, beit_fast.kernels.attention as ka; "
            "print(beit_fast.__file__); print(ka.__file__); "
            "s = importlib.util.find_spec('kernels'); print(s and list(s.submodule_search_locations or []))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pkg, kern, spec = r.stdout.splitlines()
    assert pkg.startswith(str(site)) and "kernels/attention.py" in kern
    assert str(gpu_report.ROOT / "kernels") not in spec


def test_fetch_gpu_wheels_script_carries_what_the_report_expects():
    """benchmarks/fetch_gpu_wheels.sh downloads one pinned wheel of each package gpu_report names (no xformers:
    none loads with the device image's torch 2.11 + CUDA 13), and checks each name once."""
    import re as _re

    import gpu_report

    text = (BENCH / "fetch_gpu_wheels.sh").read_text()
    specs = _re.search(r"^WHEELS=\(([^)]*)\)", text, _re.M).group(1).split()
    assert [x.split("==")[0] for x in specs] == list(gpu_report.CARRIED_WHEELS)
    assert all(_re.fullmatch(r"[\w.-]+==[\d.]+", x) for x in specs), specs
    checked = _re.search(r"^for name in ([^;]*); do", text, _re.M).group(1).split()
    assert checked == [n.replace("-", "_") for n in gpu_report.CARRIED_WHEELS]
    assert "xformers==" not in text


def _fail_first_probe(run):
    """subprocess.run whose first call (the 'is beit_fast installed from this tree' probe) says no."""
    calls = []

    def fake(*a, **k):
        calls.append(a)
        if len(calls) == 1:
            return subprocess.CompletedProcess(a[0], 1, "", "not installed")
        return run(*a, **k)

    return fake


# --------------------------------------------------------------------------------------------------
# profile classifier
# --------------------------------------------------------------------------------------------------
# kernel names as cuBLAS/cuDNN/CUTLASS/inductor/our kernels name them on Hopper (torch 2.11, CUDA 13)
RECORDED = [
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", (), "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__"
     "5x_cublas", (), "gemm"),
    ("triton_tem_fused_addmm_gelu_3", (), "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)",
     (), "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", ("aten::_efficient_attention_backward",), "attention"),
    ("triton_tem_fused_flex_attention_0", (), "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", (), "attention"),
    ("triton_poi_fused__to_copy_add_constant_pad_nd_expand_5", ("aten::_scaled_dot_product_efficient_attention",),
     "attention"),
    ("triton_per_fused__to_copy_add_mul_native_layer_norm_12", (), "norm/elementwise"),
    ("triton_red_fused__to_copy_gelu_gelu_backward_sum_17", (), "norm/elementwise"),
    ("_ce_rows_kernel", ("beit_fast::masked_linear_cross_entropy",), "loss"),
    ("nvjet_tst_128x128_64x6_1x2_h_bz_TNN", ("beit_fast::masked_linear_cross_entropy", "CompiledFunction"), "loss"),
    ("_pe_fwd_kernel", ("beit_fast::patch_embed_mask",), "embedding"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", (), "embedding"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, 2, float, float>>", (), "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     ("Optimizer.step#AdamW.step",), "optimizer"),
    ("Memcpy DtoH (Device -> Pinned)", ("aten::item", "aten::_local_scalar_dense"), "memcpy/memset"),
    ("Memset (Device)", ("Optimizer.step#AdamW.step",), "memcpy/memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", (), "norm/elementwise"),
    ("some_unknown_kernel", (), "other"),
]


@pytest.mark.parametrize("name,callers,component", RECORDED)
def test_classify_recorded_kernel_names(name, callers, component):
    assert classify(name, callers) == component


def test_component_rows_from_records_add_up_and_show_idle():
    records = [(n, 1000.0, c) for n, c, _ in RECORDED] * 2  # 2 steps
    comp, top = component_rows(records, steps=2, step_ms=30.0)
    by = {r["component"]: r for r in comp}
    assert by["gemm"]["ms_per_step"] == pytest.approx(3.0) and by["attention"]["ms_per_step"] == pytest.approx(5.0)
    busy = sum(r["ms_per_step"] for r in comp if not r["component"].startswith("idle"))
    assert busy == pytest.approx(len(RECORDED))
    assert by[next(k for k in by if k.startswith("idle"))]["ms_per_step"] == pytest.approx(30.0 - busy)
    assert sum(r["percent"] for r in comp) == pytest.approx(100.0)
    assert top[0]["calls_per_step"] == 1.0


def test_profile_of_a_tiny_cpu_step_is_classified(one_thread):
    """torch.profiler on a real (eager, CPU) BEiT step: the operators land in the expected components."""
    from beit_fast.train.loss import MIMLoss
    from beit_fast.model.beit import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=64, img_size=32, patch_size=8, depth=1)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    tokens = torch.randint(0, 64, (2, 16))

    def step(i):
        opt.zero_grad()
        loss, _ = MIMLoss(model)(images, mask, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()

    prof = profile_steps(step, steps=2)
    comp, top = component_rows(kernel_records(prof.events()), steps=2)
    found = {r["component"] for r in comp}
    assert {"gemm", "attention", "loss", "embedding", "norm/elementwise", "optimizer"} <= found, found
    assert all(r["ms_per_step"] >= 0 for r in comp) and top


# --------------------------------------------------------------------------------------------------
# attention candidates on CPU: the skip paths say why
# --------------------------------------------------------------------------------------------------
def test_attention_candidates_skip_paths_on_cpu():
    from attention_candidates import FLEX_LADDER, candidates

    from beit_fast.ops.attention import ATTENTION_BACKENDS

    q = torch.randn(1, 2, 5, 16)
    cands = {c.name: c for c in candidates(["math", "sdpa", "triton", "cudnn", "xformers", "flex"]
                                           + [f"flex_tiles:{t}" for t in FLEX_LADDER])}
    assert cands["math"].unavailable(q) is None and cands["sdpa"].unavailable(q) is None
    assert "CUDA" in cands["cudnn"].unavailable(q)
    assert "CUDA" in cands["xformers"].unavailable(q) and "CUDA" in cands["flex"].unavailable(q)
    assert all("CUDA" in cands[f"flex_tiles:{t}"].unavailable(q) for t in FLEX_LADDER)
    if "triton" not in ATTENTION_BACKENDS:
        assert "no 'triton' backend" in cands["triton"].unavailable(q)
    out = cands["math"].fn(q, q, q, torch.zeros(2, 5, 5), 0.25)
    assert out.shape == q.shape


def test_flex_ladder_tiles_are_valid():
    from attention_candidates import FLEX_LADDER

    for opts in FLEX_LADDER.values():
        assert opts["bwd_BLOCK_N1"] % opts["bwd_BLOCK_M1"] == 0 and opts["bwd_BLOCK_M2"] % opts["bwd_BLOCK_N2"] == 0
        assert all(128 % opts[k] == 0 for k in opts if "BLOCK" in k)


# --------------------------------------------------------------------------------------------------
# pytest benchmarks/ --benchmark-only: rows named by what they run, a summary line per group
# --------------------------------------------------------------------------------------------------
def test_benchmark_summary_lines_label_interpreted_rows_and_overlap():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", BENCH / "conftest.py")
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    rows = [
        {"group": "g", "name": "test_x[tiny-reference_fp32]", "median": 1.0, "min": 0.9, "max": 1.1, "extra_info": {}},
        {"group": "g", "name": "test_x[tiny-beit_fast_triton_INTERPRETED]", "median": 100.0, "min": 90.0, "max": 110.0,
         "extra_info": {"interpreter": True}},
        {"group": "g", "name": "test_x[tiny-eager_fp32]", "median": 1.05, "min": 0.95, "max": 1.2, "extra_info": {}},
    ]
    head, *lines = bench_conftest.summary_lines(rows)
    assert head == "summary g: ratios vs tiny-reference_fp32 (times of interpreted rows mean nothing)"
    assert lines == ["  tiny-reference_fp32 1000 ms [900-1100] = baseline",
                     "  tiny-eager_fp32 1050 ms [950-1200] = 0.95x (ranges overlap: order not established)",
                     "  tiny-beit_fast_triton_INTERPRETED 100000 ms [90000-110000] = 0.01x"]
    assert max(map(len, [head, *lines])) <= 120  # one short line per row (a group's line reached ~1,000 chars)


def test_benchmark_summary_gives_ratios_in_a_group_without_a_reference_row():
    """The timm compiled group has no 'reference'/'eager' row: its ratios are against its first row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", BENCH / "conftest.py")
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    rows = [{"group": "t", "name": "test_t[timm_compiled]", "median": 2.0, "min": 1.9, "max": 2.1, "extra_info": {}},
            {"group": "t", "name": "test_t[beit_fast]", "median": 1.0, "min": 0.9, "max": 1.1, "extra_info": {}}]
    assert bench_conftest.summary_lines(rows) == ["summary t: ratios vs timm_compiled",
                                                  "  beit_fast 1000 ms [900-1100] = 2.00x",
                                                  "  timm_compiled 2000 ms [1900-2100] = baseline"]


def test_cpu_benchmark_rows_are_named_by_what_they_run():
    """On CPU: no "eager_lowp" in fp32 groups, interpreted Triton rows named as such (and skipped unless
    asked for), the step rows named by what they run."""
    import bench_kernels
    import bench_train_step

    ce_ids = [p.id for p in bench_kernels._ce_params()]
    assert not any("lowp" in i for i in ce_ids)
    assert "cpu_small-eager_fp32" in ce_ids and "beit_b-eager_bf16" in ce_ids
    if not torch.cuda.is_available():
        assert "tiny-beit_fast_triton_INTERPRETED" in ce_ids and not bench_kernels.RUN_INTERPRETED
    (mark,) = [m for m in bench_train_step.test_train_step.pytestmark if m.name == "parametrize"]
    assert mark.kwargs["ids"] == ["reference_eager", "beit_fast_compiled", "beit_fast_compiled_ckpt_all"]


def test_benchmark_run_prints_the_summary_line():
    r = subprocess.run([PY, "-m", "pytest", str(BENCH / "bench_attention.py"), "--benchmark-only", "-q",
                        "-p", "no:cacheprovider", "-k", "cpu"], capture_output=True, text=True,
                       cwd=BENCH.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "benchmark summary" in r.stdout
    out = r.stdout.splitlines()
    at = next(i for i, ln in enumerate(out) if ln.startswith("summary attention fwd+bwd cpu B=8"))
    assert out[at].endswith("ratios vs cpu-B8-N197-float32-math-dense")
    rows = [ln for ln in out[at + 1:] if ln.startswith("  ")][:8]
    assert any("cpu-B8-N197-float32-math-dense" in ln and ln.endswith("= baseline") for ln in rows)
    assert any("cpu-B8-N197-float32-sdpa-table" in ln and "x" in ln.rsplit("=", 1)[1] for ln in rows)
    assert "triton" not in r.stdout.split("benchmark summary")[1] or "INTERPRETED" in r.stdout  # never unlabelled
