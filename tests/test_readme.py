"""The README's Python example runs as written, on the checkpoints the two demos write (shortened here to a
couple of steps each, with the demos' own architectures and output folders)."""
import re
from pathlib import Path

import pytest
import torch

from beit_fast import finetune, pretrain

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_example() -> str:
    section = README.read_text().split("## Use a trained model from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected one python block in the section"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demos write runs/... here, where the example reads them
    pretrain.main(["--epochs", "1", "--num_samples", "8", "--batch_size", "4", "--tokenizer_steps", "2",
                   "--num_workers", "0", "--no_progress"])
    finetune.main(["--epochs", "1", "--labels_per_class", "2", "--batch_size", "8", "--no_progress"])
    assert (tmp_path / "runs/beit_pretrain_demo/checkpoint-last.pt").is_file()
    assert (tmp_path / "runs/beit_finetune_demo/checkpoint-best.pt").is_file()
    capsys.readouterr()

    scope: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md", "exec"), scope)

    assert scope["features"].shape == (1, 128)
    assert [f.shape for f in scope["per_block"]] == [(1, 128), (1, 128)]
    assert scope["patch_tokens"].shape == (1, 64, 128)
    tokens = scope["visual_tokens"]
    assert tokens.shape == (1, 64) and tokens.dtype == torch.int64 and 0 <= int(tokens.min()) <= int(tokens.max()) < 512
    probs = scope["probs"]
    assert probs.shape == (10,) and abs(float(probs.sum()) - 1) < 1e-5
    printed = capsys.readouterr().out
    assert "predicted" in printed and "dropped the pretraining-only" in printed
