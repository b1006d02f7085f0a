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


def test_readme_drop_in_example_runs_from_the_clone_and_prints_equal_losses():
    """The HF drop-in example, as a user pastes it into a script saved in the clone (the repository root on
    sys.path, where our kernels/ folder once shadowed PyPI's ``kernels`` that transformers imports)."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    section = README.read_text().split("## Drop-in fast backend for other trainers", 1)[1].split("\n## ", 1)[0]
    code, = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    root = README.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.search(r"HuggingFace's loss (\S+), patched (\S+)", done.stdout)
    assert printed, done.stdout
    hf, ours = map(float, printed.groups())
    assert abs(hf - ours) <= 1e-4 * max(1.0, abs(hf)) and hf > 1.0  # ~ln(50) = 3.9 for an untrained model
