"""Smoke tests of the input-pipeline benchmarks (benchmarks/bench_input_pipeline.py, bench_end_to_end.py) at
a tiny size: they run and report their fields (no timing is asserted)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_end_to_end  # noqa: E402
import bench_input_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_stage_benchmark_reports_every_stage(tmp_path):
    result = bench_input_pipeline.measure(n_images=2, repeats=1, folder=tmp_path / "jpegs")
    stages = result["stages"]
    for name in ("pil/decode", "pil/jitter+flip", "pil/crop+resize 224", "pil/tokenizer view 112",
                 "tensor/decode (torchvision)", "tensor/jitter", "tensor/crop+resize 224", "tensor/tokenizer view 112",
                 "masking", "decode/PIL draft 1/2 (opt-in, other pixels)"):
        assert stages[name]["images_per_s"] > 0 and math.isfinite(stages[name]["ms_per_image"]), name
    assert stages["tensor/decode (torchvision)"]["same_pixels"] is True  # libjpeg-turbo, as Pillow's
    assert stages["decode/PIL draft 1/2 (opt-in, other pixels)"]["same_pixels"] is False
    for decoder in bench_input_pipeline.JPEG_DECODERS_MEASURED:  # the loader's own path, file to both views
        for row in ("load/file -> RGB", "sample/file -> both views"):
            assert stages[f"{row}, --jpeg_decoder {decoder}"]["images_per_s"] > 0, row
    if "simplejpeg" in bench_input_pipeline.JPEG_DECODERS_MEASURED:
        assert stages["load/file -> RGB, --jpeg_decoder simplejpeg"]["same_pixels"] is True
        assert stages["sample/file -> both views, --jpeg_decoder simplejpeg"]["same_pixels"] is True
    assert "| pil/decode |" in bench_input_pipeline.markdown(result)
    assert 150 <= min(result["mean_size"]) and max(result["mean_size"]) <= 500  # ImageNet-like sizes


def test_end_to_end_runs_the_real_loop_for_both_pipelines(tmp_path):
    bench_end_to_end.make_jpeg_folder(tmp_path / "jpegs", 8, 48, 96)
    rows = [bench_end_to_end.run_end_to_end(p, tmp_path / "jpegs", tmp_path / "runs", batch=4, steps=1, warmup=1)
            for p in ("pil", "gpu")]
    for row in rows:
        assert row["images_per_s"] > 0 and row["step_images_per_s"] >= row["images_per_s"]
        assert 0 <= row["data_wait_share"] <= 1 and row["measured_steps"] == 1
        assert row["cpu_cores_used"] is None or row["cpu_cores_used"] >= 0
        assert (tmp_path / "runs" / row["pipeline"] / "checkpoint-last.pt").is_file()  # pretrain itself ran
    assert "| gpu | cpu | tiny |" in bench_end_to_end.markdown(rows)


def test_end_to_end_fine_tuning_row_on_cpu(tmp_path):
    bench_end_to_end.make_jpeg_folder(tmp_path / "jpegs", 14, 48, 96)
    row = bench_end_to_end.run_finetune_end_to_end(tmp_path / "jpegs", tmp_path / "runs", batch=4, steps=1, warmup=1,
                                                   num_workers=0)
    assert row["task"] == "finetune" and row["measured_steps"] == 1 and row["images_per_s"] > 0
    assert 0.0 <= row["data_wait_share"] <= 1.0
    assert "| finetune | pil | cpu | tiny |" in bench_end_to_end.markdown([row])
