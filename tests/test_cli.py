"""The command-line programs as a new user meets them: ``--help`` is instant (no torch import before the
flags are parsed) and says each default once, ``python beit_fast/X.py`` works like ``python -m
beit_fast.X``, errors name the path the user typed first and say where DALL-E's weights come from, a
refused resume names only what differs, and no CLI imports another."""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from beit_fast import pretrain
from test_pretrain import toy_args, toy_setup  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
CLIS = ["pretrain", "finetune", "linear_probe", "train_tokenizer", "convert", "visualize", "evidence", "segment"]
HEAVY = ["torch", "numpy", "PIL", "torchvision", "matplotlib", "sklearn", "skimage", "triton"]

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs ``python -m beit_fast.<cli> --help`` in a fresh interpreter and prints the heavy modules it imported.
HELP_PROBE = """
import contextlib, io, runpy, sys
sys.argv = ["prog", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        runpy.run_module("beit_fast.{cli}", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), e.code
assert "usage:" in out.getvalue()
print(sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("cli", CLIS)
def test_help_imports_no_heavy_module(cli):
    r = subprocess.run([sys.executable, "-c", HELP_PROBE.format(cli=cli, heavy=HEAVY)], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"python -m beit_fast.{cli} --help imported {r.stdout.strip()}"


def _parser(cli):
    module = importlib.import_module(f"beit_fast.{cli}")
    return (getattr(module, "get_args_parser", None) or module.build_parser)()


@pytest.mark.parametrize("cli", CLIS)
def test_help_states_each_default_once(cli):
    text = " ".join(_parser(cli).format_help().split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^()]*(\([^()]*\))?[^()]*\) \(default:", text), text


def test_help_of_keep_last_and_log_dir():
    text = " ".join(pretrain.get_args_parser().format_help().split())
    assert "--keep_last" in text and "(default: 2; 0: keep all)" in text
    assert "--log_dir" in text and "TensorBoard" in text


@pytest.mark.parametrize("cli", ["pretrain", "finetune", "convert"])
def test_running_the_file_works_like_dash_m(cli):
    r = subprocess.run([sys.executable, f"beit_fast/{cli}.py", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m beit_fast." in r.stdout and "Traceback" not in r.stderr


def test_no_cli_imports_another_cli():
    for cli in CLIS:
        tree = ast.parse((REPO / "beit_fast" / f"{cli}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                parts = parts if node.level else parts[1:]  # "from .x import", "from beit_fast.x import"
                imported.update(parts[:1])
                if parts in ([""], []):  # "from . import x", "from beit_fast import x"
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[-1] for alias in node.names)
        others = sorted(imported & (set(CLIS) - {cli}))
        assert not others, f"beit_fast/{cli}.py imports the CLI(s) {others}"


def test_option_names_agree_with_the_library():
    from beit_fast.train.evidence import VARIANTS
    from beit_fast.model.beit import MODEL_CONFIGS
    from beit_fast.config import EVIDENCE_VARIANTS
    from beit_fast.utils.options import DVAE_PRESET_NAMES, MODEL_NAMES
    from beit_fast.tokenizer.dvae import PRESETS

    assert MODEL_NAMES == tuple(sorted(MODEL_CONFIGS))
    assert DVAE_PRESET_NAMES == tuple(sorted(PRESETS))
    assert EVIDENCE_VARIANTS == tuple(VARIANTS)


def _error(argv):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(argv)
    assert isinstance(exc.value.code, str), exc.value.code
    return exc.value.code


def test_a_missing_data_folder_is_the_first_error(tmp_path):
    message = _error(["--data_path", str(tmp_path / "nonexistent"), "--output_dir", str(tmp_path / "out")])
    first = message.splitlines()[0]
    assert "--data_path" in first and "nonexistent" in first and "not found" in first, message


def test_dalle_without_weights_says_where_they_come_from(tmp_path):
    (tmp_path / "images").mkdir()
    message = _error(["--data_path", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out")])
    assert "https://cdn.openai.com/dall-e/encoder.pkl" in message and "DALL-E" in message
    assert "--tokenizer dvae" in message and "python -m beit_fast.train_tokenizer" in message
    assert "this machine" not in message


def test_refused_resume_names_only_the_keys_that_differ(toy_setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    pretrain.main(toy_args(toy_setup, out, "--epochs", "1"))
    message = _error(toy_args(toy_setup, out, "--epochs", "2", "--layer_scale_init_value", "0.5", "--resume", "auto"))
    assert "another model config" in message
    assert "init_values: checkpoint 0.1, this run 0.5" in message
    assert len(message.splitlines()) == 1 and "embed_dim" not in message and "vocab_size" not in message


def test_bad_tokenizer_cli_paths_give_clear_errors(tmp_path):
    from beit_fast.train_tokenizer import main

    with pytest.raises(SystemExit, match="--data_path .*nope: image folder not found"):
        main(["--data_path", str(tmp_path / "nope"), "--output", str(tmp_path / "t.pt")])
    with pytest.raises(SystemExit, match="--steps must be positive"):
        main(["--steps", "0", "--output", str(tmp_path / "t.pt")])
    assert not os.path.exists(tmp_path / "t.pt")


@pytest.mark.parametrize("cli", CLIS)
def test_a_bad_flag_gets_one_line_and_a_pointer_to_help(cli, capsys):
    """A mistyped flag value is one error line plus where to look, not ~50 lines of usage before it."""
    with pytest.raises(SystemExit) as stop:
        _parser(cli).parse_args({"convert": ["a", "b"], "visualize": ["a"]}.get(cli, []) + ["--no_such_flag"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "error:" in err[0] and "--no_such_flag" in err[0], err
    assert err[1] == f"Run 'python -m beit_fast.{cli} --help' for every flag and its default."


def test_an_unknown_model_names_the_choices_in_one_line(capsys):
    with pytest.raises(SystemExit):
        pretrain.get_args_parser().parse_args(["--model", "nonexistent"])
    first = capsys.readouterr().err.splitlines()[0]
    assert "--model" in first and "'nonexistent'" in first and "base" in first and "usage" not in first


@pytest.mark.parametrize("flag", ["--resume", "--discrete_vae_weight_path"])
def test_a_text_file_as_a_checkpoint_is_refused_before_any_work(tmp_path, flag):
    """The demo trained its tokenizer for ~30 s (leaving tokenizer.pt behind) before it found that --resume was
    a text file; now the file's first bytes are checked with the other flags, before anything is done."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a checkpoint\n")
    out = tmp_path / "out"
    message = _error([flag, str(notes), "--output_dir", str(out)])
    assert f"{flag} {notes} is not a" in message and "no zip archive" in message and "no pickle header" in message
    assert "b'hell'" in message
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("cli, flag", [("finetune", "--resume"), ("finetune", "--finetune"),
                                       ("linear_probe", "--finetune")])
def test_finetune_and_probe_refuse_a_text_checkpoint_at_once(tmp_path, cli, flag):
    module = importlib.import_module(f"beit_fast.{cli}")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        module.main([flag, str(empty), "--output_dir", str(tmp_path / "out")])
    assert f"{flag} {empty} is empty: not a checkpoint" in str(exc.value.code)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
