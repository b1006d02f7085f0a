"""No code runs from a file: every entry point that reads a checkpoint or tokenizer file refuses a crafted
pickle (a marker file that the payload would create never appears), and only the explicit, documented
opt-in (``--trust-pickle`` / ``trust_pickle=True``) reads foreign pickles, with a warning.

The payload is what a hostile ``checkpoint.pt`` holds: an object whose ``__reduce__`` calls ``exec``. A
normal unpickler (``torch.load(weights_only=False)``) runs it while loading; the safe loader must refuse the
file before anything in it is called.
"""
import ast
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from beit_fast.utils import checkpoint as ck
from beit_fast import pretrain
from beit_fast.utils.checkpoint import CheckpointError, load_checkpoint, validate_checkpoint
from beit_fast.train.checkpoint_folder import find_resume_checkpoint
from beit_fast.model.beit import build_model
from test_pretrain import make_toy_images, make_toy_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(__file__).resolve().parents[1] / "beit_fast"


class RunsCode:
    """Unpickling this object runs ``exec(code)``: the code creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))



class _Latin1Bytes:
    """Unpickles to ``bytearray(payload)`` through ``bytearray(str, "latin-1")``: no ``_codecs`` global."""

    def __init__(self, payload):
        self.text = bytes(payload).decode("latin-1")

    def __reduce__(self):
        return (bytearray, (self.text, "latin-1"))


class ViaLoadFromBytes:
    """Unpickling this object calls ``torch.storage._load_from_bytes(payload)``, which unpickles ``payload``
    (here: a :class:`RunsCode`) with ``torch.load(weights_only=False)``, i.e. Python's normal unpickler."""

    def __init__(self, marker):
        buf = io.BytesIO()
        torch.save(RunsCode(marker), buf)
        self.payload = buf.getvalue()

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (_Latin1Bytes(self.payload),))


def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32)


def evil_checkpoint(path, marker, payload=RunsCode):
    """A file that looks like one of our training checkpoints, with the payload under ``args``."""
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "optimizer": {}, "step": 1,
                "epoch": 1, "kind": "finetune", "args": payload(marker)}, path)
    return Path(path)


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    return evil_checkpoint(tmp_path / "evil.pt", marker), marker


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    make_toy_images(root / "images", n=8, size=40)
    make_toy_tokenizer(root / "tok.pt")
    return root


def pretrain_args(toy, out, *extra, tok=None, tokenizer="dvae"):
    return ["--data_path", str(toy / "images"), "--tokenizer", tokenizer, "--discrete_vae_weight_path",
            str(tok or toy / "tok.pt"), "--model", "tiny", "--input_size", "32", "--patch_size", "8",
            "--num_mask_patches", "6", "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers",
            "0", "--amp", "none", "--epochs", "1", "--no_progress", "--output_dir", str(out), *map(str, extra)]


def clean_exit(fn, *args, **kwargs) -> str:
    """Run a CLI main; it must end in a clean ``error: ...`` SystemExit; returns the message."""
    with pytest.raises(SystemExit) as exc:
        fn(*args, **kwargs)
    code = exc.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "Traceback" not in code, code
    return code


# ---------------------------------------------------------------------------------------------------------
# Every entry point refuses a crafted pickle
# ---------------------------------------------------------------------------------------------------------
def test_library_readers_refuse_crafted_pickles(evil, tmp_path):
    from beit_fast.interop.checkpoints import load_state_dict
    from beit_fast.interop.pretrained import PretrainedLoadError, load_pretrained, load_state_dict_any
    from beit_fast.model.beit import build_classifier

    path, marker = evil
    with pytest.raises(ck.UnsafeCheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        validate_checkpoint(path)
    with pytest.raises(PretrainedLoadError, match="--trust-pickle"):
        load_state_dict_any(path)
    with pytest.raises(PretrainedLoadError, match="--trust-pickle"):
        load_pretrained(build_classifier("tiny", 4, img_size=16, patch_size=8, depth=2), path)
    with pytest.raises(ValueError, match="trust_pickle"):
        load_state_dict(path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pt").write_bytes(path.read_bytes())
    messages = []
    assert find_resume_checkpoint(out, warn=messages.append) == (None, None)
    assert "--trust-pickle" in messages[0]
    assert not marker.exists()


def test_pretrain_resume_refuses_crafted_pickles(evil, toy, tmp_path):
    path, marker = evil
    message = clean_exit(pretrain.main, pretrain_args(toy, tmp_path / "o1", "--resume", path))
    assert "--trust-pickle" in message and str(path) in message
    out = tmp_path / "o2"
    out.mkdir()
    (out / "checkpoint-last.pt").write_bytes(path.read_bytes())
    message = clean_exit(pretrain.main, pretrain_args(toy, out, "--resume", "auto"))
    assert "none of the 1 checkpoints" in message
    assert not marker.exists()


def test_finetune_and_linear_probe_refuse_crafted_pickles(evil, tmp_path):
    from beit_fast import finetune, linear_probe

    path, marker = evil
    common = ["--input_size", "16", "--labels_per_class", "2", "--no_progress", "--epochs", "1", "--batch_size", "10"]
    for argv in (["--finetune", path], ["--resume", path], ["--eval", "--resume", path]):
        message = clean_exit(finetune.main, [*map(str, argv), *common, "--output_dir", str(tmp_path / "ft")])
        assert "--trust-pickle" in message, message
    message = clean_exit(linear_probe.main, ["--finetune", str(path), *common])
    assert "--trust-pickle" in message
    assert not marker.exists()


def test_visualize_refuses_crafted_pickles(evil, tmp_path):
    from beit_fast import visualize

    path, marker = evil
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-last.pt").write_bytes(path.read_bytes())
    for argv in ([str(run)], [str(run), "--checkpoint", str(path)]):
        message = clean_exit(visualize.main, [*argv, "--only", "mask", "--out_dir", str(tmp_path / "pics")])
        assert "--trust-pickle" in message
    assert not marker.exists()


def test_convert_refuses_crafted_pickles(evil, tmp_path, capsys):
    from beit_fast.convert import main as convert_main

    path, marker = evil
    assert convert_main([str(path), str(tmp_path / "out.pt")]) == 1
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(path.read_bytes())
    assert convert_main([str(hf), str(tmp_path / "out2.pt")]) == 1
    assert capsys.readouterr().err.count("--trust-pickle") == 2
    assert not marker.exists()


@pytest.mark.parametrize("payload", [RunsCode, ViaLoadFromBytes], ids=["exec", "_load_from_bytes"])
def test_tokenizer_files_refuse_crafted_pickles(toy, tmp_path, payload):
    from beit_fast.tokenizer import build_tokenizer, dalle_state_dict_from_file
    from beit_fast.tokenizer.dvae import DiscreteVAE

    marker = tmp_path / "MARKER"
    path = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": payload(marker)}, path)
    with pytest.raises(Exception):
        dalle_state_dict_from_file(path)
    for kind in ("dalle", "dvae"):
        with pytest.raises(Exception):
            build_tokenizer(kind, path)
        clean_exit(pretrain.main, pretrain_args(toy, tmp_path / f"out_{kind}", tok=path, tokenizer=kind))
    with pytest.raises(Exception):
        DiscreteVAE.from_checkpoint(path)
    assert not marker.exists()


def test_trust_pickle_is_the_only_way_and_it_warns(evil, tmp_path):
    """The opt-in reads a foreign pickle (here an official-style checkpoint with argparse args) with a
    warning; it is also exactly what lets a crafted file run code, which is why it is opt-in."""
    import argparse

    model = tiny_model()
    official = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, official)
    with pytest.raises(ck.UnsafeCheckpointError, match=r"argparse\.Namespace"):
        load_checkpoint(official)
    with pytest.warns(UserWarning, match="can run arbitrary code"):
        state = load_checkpoint(official, trust_pickle=True)
    assert state["args"].lr == 1.0
    path, marker = evil
    with pytest.warns(UserWarning, match="can run arbitrary code"):
        load_checkpoint(path, trust_pickle=True)
    assert marker.exists()


def test_finetune_cli_trust_pickle_loads_an_official_style_checkpoint(tmp_path, caplog):
    import argparse

    from beit_fast import finetune

    model = tiny_model()
    official = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, official)
    common = ["--input_size", "16", "--labels_per_class", "2", "--no_progress", "--epochs", "1", "--batch_size", "10",
              "--output_dir", str(tmp_path / "ft")]
    assert "--trust-pickle" in clean_exit(finetune.main, ["--finetune", str(official), *common])
    caplog.set_level(logging.WARNING, logger="beit_fast")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = finetune.main(["--finetune", str(official), "--trust-pickle", *common])
    assert res["final_top1"] is not None
    # The CLI routes Python warnings into the package log (beit_fast.utils.logs.cli_logging): the warning is a record
    warned = [r for r in caplog.records if r.name.startswith("beit_fast") and r.levelno == logging.WARNING]
    assert any("--trust-pickle" in r.getMessage() and "can run arbitrary code" in r.getMessage() for r in warned)


def test_every_cli_that_reads_pickles_has_the_same_opt_in():
    from beit_fast import convert, finetune, linear_probe, visualize

    for parser in (pretrain.get_args_parser(), finetune.get_args_parser(), linear_probe.get_args_parser(),
                   visualize.get_args_parser(), convert.build_parser()):
        actions = {s: a for a in parser._actions for s in a.option_strings}
        assert "--trust-pickle" in actions, parser.prog
        assert "arbitrary code" in actions["--trust-pickle"].help, parser.prog


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of the previous format (numpy RNG state pickled) still load, safely
# ---------------------------------------------------------------------------------------------------------
def test_previous_format_loads_without_opt_in_and_new_format_is_plain(tmp_path):
    import random

    legacy = {"model": tiny_model().state_dict(), "optimizer": {}, "step": 3, "model_config": {"depth": 2},
              "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(legacy, tmp_path / "old.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")  # numpy globals inside
    state = validate_checkpoint(tmp_path / "old.pt")
    from beit_fast.utils.rng import rng_state, set_rng_state

    np.random.seed(123)
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.random(3), _draw_after(legacy["rng"]["numpy"]))
    # What the package writes now holds only tensors and plain Python values.
    torch.save({"rng": rng_state()}, tmp_path / "new.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.pt") == []


def _draw_after(numpy_state):
    rs = np.random.RandomState()
    rs.set_state(numpy_state)
    return rs.random(3)


def test_safe_allow_list_does_not_admit_other_numpy_objects(tmp_path):
    """The previous format's allow-list admits uint32 arrays (the MT19937 key), not arbitrary numpy
    objects: an object array (whose elements could be anything) is refused."""
    torch.save({"x": np.array([1, "a"], dtype=object)}, tmp_path / "obj.pt")
    with pytest.raises(ck.UnsafeCheckpointError):
        load_checkpoint(tmp_path / "obj.pt")


# ---------------------------------------------------------------------------------------------------------
# Done-when: no loader in the package reaches a normal unpickler without the opt-in
# ---------------------------------------------------------------------------------------------------------
def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_unsafe_loader_in_the_package():
    """Read off the package's syntax trees (comments and docs do not count):

    * ``torch.load`` is called only in ``beit_fast/utils/checkpoint.py`` (the one reader), always with a literal
      ``weights_only=True``, except once with ``weights_only=False`` in ``_load_trusting_pickle``, the
      function only the opt-in reaches, which warns;
    * nothing calls ``pickle.load(s)``, ``pickle.Unpickler(...)`` or ``torch.storage._load_from_bytes``;
    * the only ``pickle.Unpickler`` subclasses are the DALL-E legacy reader's, each restricted by its own
      ``find_class`` (and ``persistent_load``), in a module that calls no ``torch.load``.
    """
    loads, bad, unpicklers = [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        tree = ast.parse(path.read_text())
        owner = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    owner[id(node)] = fn.name  # ast.walk reaches outer functions first: the innermost wins
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("weights_only")
                literal = value.value if isinstance(value, ast.Constant) else None
                loads.append((rel, owner.get(id(node)), literal))
            if isinstance(node, (ast.Attribute, ast.Name)) and _dotted(node) in (
                    "pickle.load", "pickle.loads", "torch.storage._load_from_bytes", "_load_from_bytes"):
                bad.append(f"{rel}:{node.lineno}: {_dotted(node)}")
            if isinstance(node, ast.Call) and _dotted(node.func) == "pickle.Unpickler":
                bad.append(f"{rel}:{node.lineno}: pickle.Unpickler(...)")
            if isinstance(node, ast.ClassDef) and any(_dotted(b) == "pickle.Unpickler" for b in node.bases):
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                unpicklers.append((rel, node.name, "find_class" in methods))
    assert not bad, bad
    assert {rel for rel, _, _ in loads} == {"beit_fast/utils/checkpoint.py"}, loads
    unsafe = [(rel, fn, literal) for rel, fn, literal in loads if literal is not True]
    assert unsafe == [("beit_fast/utils/checkpoint.py", "_load_trusting_pickle", False)], loads
    assert unpicklers, "the DALL-E legacy reader's restricted unpickler was not found"
    assert all(rel == "beit_fast/tokenizer/dalle_file.py" and restricted for rel, _, restricted in unpicklers), unpicklers
    source = (PACKAGE / "utils" / "checkpoint.py").read_text()
    fn = source[source.index("def _load_trusting_pickle"):]
    fn = fn[: fn.index("\ndef ", 1)]
    assert "warnings.warn" in fn
