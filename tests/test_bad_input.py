"""Bad input to ``python -m beit_fast.pretrain``: every flag, file and image a user can get wrong ends in
either a clear ``error: ...`` (SystemExit) or a correct run; never a traceback from deep inside, never a
non-finite loss in the log. Explicit cases first, then a property-based test (hypothesis) over random flag
combinations and random image files."""
import importlib.util
import io
import math
import os
import re
import tempfile
import warnings
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from beit_fast import pretrain
from test_pretrain import make_toy_images, make_toy_tokenizer, read_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_toy_images(root / "images", n=8, size=40)
    make_toy_tokenizer(root / "tok.pt")
    (root / "junk.pt").write_bytes(b"not a tokenizer" * 20)
    (root / "junk_zip.pt").write_bytes(b"PK\x03\x04" + b"not a tokenizer" * 20)  # passes the first-bytes check
    (root / "a_file").write_text("x")
    (root / "empty").mkdir()
    allbad = root / "allbad"
    allbad.mkdir()
    (allbad / "zero.png").write_bytes(b"")
    (allbad / "text.jpg").write_text("hello")
    (allbad / "random.png").write_bytes(os.urandom(300))
    return root


def args(root, *extra, images=None, tok=None):
    return ["--data_path", str(images or root / "images"), "--tokenizer", "dvae", "--discrete_vae_weight_path",
            str(tok or root / "tok.pt"), "--model", "tiny", "--input_size", "32", "--patch_size", "8",
            "--num_mask_patches", "6", "--min_mask_patches_per_block", "2", "--batch_size", "4", "--num_workers", "0",
            "--amp", "none", "--epochs", "1", "--no_progress", "--output_dir", str(root / "out"), *map(str, extra)]


def run_expecting_error(argv):
    """The SystemExit message (argparse's usage errors: its stderr line), asserting it is a clean one."""
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exc:
        pretrain.main(argv)
    code = exc.value.code
    if code == 2:  # argparse: usage + "prog: error: ..." on stderr
        lines = err.getvalue().strip().splitlines()  # the usage error, then a pointer to --help
        message = next((line for line in lines if ": error: " in line), lines[-1])
        assert ": error: " in message, message
        return message
    assert isinstance(code, str) and code.startswith("error: "), code
    assert "Traceback" not in code
    return code


CASES = [
    (("--batch_size", -1), "--batch_size must be positive"),
    (("--epochs", 0), "--epochs must be positive"),
    (("--update_freq", 0), "--update_freq must be positive"),
    (("--num_mask_patches", 17), r"--num_mask_patches must be in \[1, 16\] for a 4x4 patch grid"),
    (("--num_mask_patches", 0), "--num_mask_patches must be in"),
    (("--max_mask_patches_per_block", 0), "--max_mask_patches_per_block must be positive"),
    (("--input_size", 30), "--input_size 30 is not divisible by --patch_size 8"),
    (("--patch_size", 0), "--patch_size must be positive"),
    (("--second_input_size", 64), "token grid"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--lr", -1), "--lr must be >= 0"),
    (("--lr", "1e38"), r"--lr 1e\+38 is too large"),
    (("--warmup_lr", "1e38"), r"--warmup_lr 1e\+38 is too large"),
    (("--max_image_pixels", 0), "--max_image_pixels must be positive"),
    (("--min_lr", "inf"), "--min_lr must be a finite number"),
    (("--opt_betas", 1, 0.9), r"--opt_betas must both be in \[0, 1\)"),
    (("--opt_eps", 0), "--opt_eps must be positive"),
    (("--drop_path", 1), r"--drop_path must be in \[0, 1\)"),
    (("--layer_scale_init_value", -0.1), "--layer_scale_init_value must be >= 0"),
    (("--color_jitter", -0.5), "--color_jitter must be >= 0"),
    (("--weight_decay_end", -1), "--weight_decay_end must be >= 0"),
    (("--warmup_steps", -5), "--warmup_steps must be a step count"),
    (("--seed", -1), "--seed must be >= 0"),
    (("--keep_last", -1), "--keep_last must be >= 0"),
    (("--num_workers", -1), "--num_workers must be >= 0"),
    (("--save_ckpt_steps", -1), "--save_ckpt_steps must be >= 0"),
    (("--activation_checkpointing", "some"), "--activation_checkpointing must be none, all or a positive integer"),
    (("--epochs", 10**10), "is not a plausible run"),
    (("--model", "huge"), "argument --model: invalid choice: 'huge'"),
    (("--train_interpolation", "cubic"), "argument --train_interpolation: invalid choice"),
    (("--batch_size", "four"), "argument --batch_size: invalid int value"),
    (("--amp", "fp8"), "argument --amp: invalid choice"),
    (("--amp", "fp16"), "fp16 mixed precision needs a CUDA device"),
    (("--device", "gpu0"), "--device 'gpu0' is not a device"),
    (("--device", "cuda"), "no CUDA device is available"),
    (("--fsdp",), "--fsdp needs a distributed launch"),
    (("--fsdp", "--amp", "fp16"), "--fsdp does not support --amp fp16"),
    (("--fast", "on", "--no-compile", "--attn_backend", "flex"), "--attn_backend flex cannot run on cpu"),
    (("--vocab_size", 100), "--vocab_size 100 does not match the tokenizer's vocabulary of 64"),
    (("--batch_size", 9), "8 images give 8 per process, fewer than one step of --batch_size 9"),
    (("--batch_size", 4, "--update_freq", 3), "fewer than one step of --batch_size 4 x --update_freq 3"),
    (("--num_samples", 10), "--num_samples only applies to the embedded demo"),
    (("--resume", "/nonexistent/ckpt.pt"), "--resume checkpoint not found"),
    (("--input_size", 8, "--num_mask_patches", 1), "these mask settings mask no patch of a 1x1 grid"),
]


@pytest.mark.parametrize("extra,message", CASES, ids=[" ".join(map(str, c[0])) for c in CASES])
def test_bad_flag_gives_clear_error(toy, extra, message):
    assert_match(run_expecting_error(args(toy, *extra)), message)


def assert_match(text, pattern):
    assert re.search(pattern, text), f"{pattern!r} not in {text!r}"


def test_bad_files_give_clear_errors(toy):
    cases = [
        (args(toy, tok=toy / "missing.pt"), "tokenizer weights not found"),
        (args(toy, tok=toy / "junk.pt"), "--discrete_vae_weight_path .*junk.pt is not a tokenizer weights file"),
        (args(toy, tok=toy / "junk_zip.pt"), "cannot load the dvae tokenizer from .*junk_zip.pt"),
        (args(toy, "--tokenizer", "dalle"), "cannot load the dalle tokenizer from .*tok.pt: .*not a DALL-E"),
        (args(toy, "--output_dir", toy / "a_file"), "--output_dir .*a_file exists and is not a folder"),
        (args(toy, "--resume", toy / "junk.pt"), "--resume .*junk.pt is not a checkpoint: no zip archive"),
        (args(toy, "--resume", toy / "junk_zip.pt"), "checkpoint .*junk_zip.pt cannot be loaded"),
        (args(toy, "--resume", toy / "tok.pt"), "not a beit_fast training checkpoint"),
        (args(toy, images=toy / "nope"), "image folder not found"),
        (args(toy, images=toy / "a_file"), "not a folder"),
        (args(toy, images=toy / "empty"), "no image files found"),
    ]
    for argv, message in cases:
        assert_match(run_expecting_error(argv), message)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_of_unreadable_files_fails_clearly(toy, workers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = run_expecting_error(args(toy, "--batch_size", 2, "--num_workers", workers, images=toy / "allbad"))
    assert_match(message, r"^error: 3 consecutive images starting at index \d could not be read")


def test_odd_image_formats_train_and_unreadable_files_are_skipped(toy, tmp_path):
    """Greyscale, 1-bit, palette (with transparency), RGBA, LA, CMYK JPEG, 16-bit PNG, tiny and very
    elongated images all train; a zero-byte file, a truncated PNG, a truncated JPEG and random bytes with an
    image extension are skipped and counted; non-image files are ignored."""
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("1").save(folder / "bits.png")
    rgb.convert("P").save(folder / "palette.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(folder / "palette_trns.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(folder / "deep16.png")
    rgb.resize((1, 1)).save(folder / "one_pixel.png")
    rgb.resize((300, 3)).save(folder / "elongated.bmp")
    rgb.save(folder / "ok.webp")
    (folder / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[:200])
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "noise.jpeg").write_bytes(os.urandom(500))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = pretrain.main(args(toy, "--batch_size", 3, "--epochs", 2, "--log_freq", 1, "--output_dir", out,
                                     images=folder))
    log = read_log(out)
    assert summary["steps"] == 10 and len(log) == 10  # 15 files with image extensions, batch 3
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["skipped_images"] == 4


def test_hostile_data_folder_trains_and_counts_what_it_skips(toy, tmp_path):
    """Symlink loops, a FIFO named like an image and a pixel bomb in the image folder: the run neither hangs
    nor multiplies samples; the bomb is skipped and counted (forked, so that a hang fails instead of blocking)."""
    from test_pretrain import run_forked

    folder = tmp_path / "hostile"
    make_toy_images(folder, n=8, size=40)
    os.symlink(".", folder / "loop")
    os.symlink(".", folder / "loop2")
    os.mkfifo(folder / "x.png")
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")
    out = tmp_path / "out"
    run_forked(args(toy, "--batch_size", 3, "--log_freq", 1, "--output_dir", out, images=folder), timeout=120)
    log = read_log(out)
    assert len(log) == 3  # 9 files (8 images + the bomb), batch 3
    assert log[-1]["skipped_images"] == 1


# ---------------------------------------------------------------------------------------------------------
# Property-based: random flag sets (valid ones must be accepted, invalid ones refused naming the flag), and
# random image files under valid flag sets
# ---------------------------------------------------------------------------------------------------------
#: Values every flag may take together (any combination of them is a valid run of the toy data).
VALID = {
    "--batch_size": st.integers(1, 4),
    "--epochs": st.integers(1, 2),
    "--update_freq": st.integers(1, 2),
    "--lr": st.sampled_from(["0", "1e-4", "1e-3", "1e30"]),
    "--min_lr": st.sampled_from(["0", "1e-5"]),
    "--warmup_lr": st.sampled_from(["0", "1e-6"]),
    "--warmup_epochs": st.integers(0, 3),
    "--warmup_steps": st.integers(-1, 4),
    "--weight_decay": st.sampled_from(["0", "0.05"]),
    "--weight_decay_end": st.sampled_from(["0", "0.1"]),
    "--clip_grad": st.sampled_from(["0", "3"]),
    "--drop_path": st.sampled_from(["0", "0.1", "0.99"]),
    "--layer_scale_init_value": st.sampled_from(["0", "0.1"]),
    "--color_jitter": st.sampled_from(["0", "0.4"]),
    "--opt_betas": st.sampled_from([("0.9", "0.999"), ("0", "0.5")]),
    "--opt_eps": st.sampled_from(["1e-8", "1e-3"]),
    "--seed": st.integers(0, 3),
    "--keep_last": st.integers(0, 2),
    "--log_freq": st.integers(1, 3),
    "--save_ckpt_freq": st.integers(1, 2),
    "--save_ckpt_steps": st.integers(0, 2),
    "--stop_after_steps": st.integers(0, 3),
    "--max_bad_steps": st.integers(1, 3),
    "--max_image_pixels": st.sampled_from(["1000000", "64000000"]),
    "--jpeg_decoder": st.sampled_from(["auto", "pil", *(["simplejpeg"] if importlib.util.find_spec("simplejpeg")
                                                        else [])]),
    "--model": st.just("tiny"),
    "--amp": st.sampled_from(["none", "auto"]),
    "--train_interpolation": st.sampled_from(["bicubic", "nearest"]),
    "--activation_checkpointing": st.sampled_from(["none", "all", "2"]),
    "--fixed_mask_count": st.just(None),
    "--no-rel_pos_bias": st.just(None),
    "--abs_pos_emb": st.just(None),
    "--fast": st.sampled_from([("on", "--no-compile", "--kernel_backend", "reference"), ("off",)]),
}
#: Values that are wrong on their own, and the flags the error must name.
INVALID = {
    "--batch_size": (st.sampled_from(["0", "-1"]), "--batch_size"),
    "--epochs": (st.sampled_from(["0", "-2"]), "--epochs"),
    "--update_freq": (st.just("0"), "--update_freq"),
    "--patch_size": (st.sampled_from(["0", "-8"]), "--patch_size"),
    "--input_size": (st.sampled_from(["30", "36"]), "--input_size"),
    "--second_input_size": (st.sampled_from(["8", "33", "64"]), "--second_input_size"),
    "--num_mask_patches": (st.sampled_from(["0", "17", "-1"]), "--num_mask_patches"),
    "--min_mask_patches_per_block": (st.sampled_from(["0", "-1"]), "--min_mask_patches_per_block"),
    "--max_mask_patches_per_block": (st.just("0"), "--max_mask_patches_per_block"),
    "--lr": (st.sampled_from(["-1", "nan", "inf", "1e39"]), "--lr"),
    "--min_lr": (st.sampled_from(["-1e-5", "nan"]), "--min_lr"),
    "--warmup_lr": (st.sampled_from(["-1", "1e39"]), "--warmup_lr"),
    "--warmup_epochs": (st.just("-1"), "--warmup_epochs"),
    "--warmup_steps": (st.sampled_from(["-2", "-3"]), "--warmup_steps"),
    "--weight_decay": (st.sampled_from(["-0.1", "nan"]), "--weight_decay"),
    "--weight_decay_end": (st.just("-1"), "--weight_decay_end"),
    "--clip_grad": (st.just("-1"), "--clip_grad"),
    "--drop_path": (st.sampled_from(["1", "-0.1", "inf"]), "--drop_path"),
    "--layer_scale_init_value": (st.just("-1"), "--layer_scale_init_value"),
    "--color_jitter": (st.just("-1"), "--color_jitter"),
    "--opt_betas": (st.sampled_from([("1", "0.5"), ("-0.1", "0.9"), ("0.9", "nan")]), "--opt_betas"),
    "--opt_eps": (st.sampled_from(["0", "-1"]), "--opt_eps"),
    "--seed": (st.just("-1"), "--seed"),
    "--keep_last": (st.just("-1"), "--keep_last"),
    "--log_freq": (st.sampled_from(["0", "-1"]), "--log_freq"),
    "--save_ckpt_freq": (st.just("0"), "--save_ckpt_freq"),
    "--save_ckpt_steps": (st.just("-1"), "--save_ckpt_steps"),
    "--stop_after_steps": (st.just("-1"), "--stop_after_steps"),
    "--max_bad_steps": (st.just("0"), "--max_bad_steps"),
    "--max_image_pixels": (st.sampled_from(["0", "-5"]), "--max_image_pixels"),
    "--num_workers": (st.just("-1"), "--num_workers"),
    "--activation_checkpointing": (st.sampled_from(["0", "x"]), "--activation_checkpointing"),
    "--vocab_size": (st.just("0"), "--vocab_size"),
}
#: Values argparse itself refuses (exit status 2, one usage error naming the flag).
UNPARSABLE = {
    "--batch_size": st.sampled_from(["four", "1.5"]),
    "--lr": st.just("abc"),
    "--model": st.just("huge"),
    "--train_interpolation": st.just("spline"),
    "--amp": st.just("fp8"),
    "--jpeg_decoder": st.just("turbo"),
}
N_FAST = int(os.environ.get("BEIT_FAST_FUZZ_EXAMPLES", 300))


def _argv(base, flags):
    argv = list(base)
    for flag, value in flags.items():
        if value is None:
            argv.append(flag)
        elif isinstance(value, tuple):
            argv += [flag, *value]
        elif str(value).startswith("-"):  # "-1e-5" would be read as an option: write it as --flag=-1e-5
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, str(value)]
    return argv


def _flag_error(argv) -> tuple[int, str] | None:
    """None if the flags pass validation (``resolve_defaults``), else (exit status, message)."""
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            pretrain.resolve_defaults(pretrain.get_args_parser().parse_args([str(a) for a in argv]))
        except SystemExit as e:
            return (2, err.getvalue()) if e.code == 2 else (1, e.code)
    return None


@settings(max_examples=N_FAST, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(valid=st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=8).flatmap(
           lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys})),
       invalid=st.dictionaries(st.sampled_from(sorted(INVALID)), st.none(), max_size=3).flatmap(
           lambda keys: st.fixed_dictionaries({k: INVALID[k][0] for k in keys})),
       unparsable=st.dictionaries(st.sampled_from(sorted(UNPARSABLE)), st.none(), max_size=1).flatmap(
           lambda keys: st.fixed_dictionaries({k: UNPARSABLE[k] for k in keys})))
def test_flag_validation_accepts_valid_sets_and_names_every_invalid_flag(toy, valid, invalid, unparsable):
    """Random flag sets: each flag valid, invalid on its own, or not even parsable. Valid sets must pass
    validation; otherwise the error must name every invalid flag (argparse: the unparsable one)."""
    flags = {**valid, **invalid, **unparsable}
    result = _flag_error(_argv(args(toy), flags))
    if unparsable:
        assert result is not None and result[0] == 2, result
        (flag,) = unparsable
        assert f"argument {flag}" in result[1], result
        return
    if not invalid:
        assert result is None, f"a valid flag set was refused: {flags}: {result}"
        return
    assert result is not None and result[0] == 1, f"an invalid flag set was accepted: {flags}"
    message = result[1]
    assert message.startswith("error: ") and "Traceback" not in message
    # Flags that are wrong relative to the patch grid: not checked against a grid that is itself invalid.
    relative_to = {"--input_size": {"--patch_size"}, "--second_input_size": {"--patch_size", "--input_size"},
                   "--num_mask_patches": {"--patch_size", "--input_size"}}
    for flag in invalid:
        if relative_to.get(flag, set()) & set(invalid):
            continue
        assert flag in message, f"{flag} {flags[flag]} not named in {message!r}"


MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F"]


@st.composite
def image_file(draw):
    """(file name, bytes): a valid image of a random mode / size / format, or random bytes."""
    ext = draw(st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".webp"]))
    if draw(st.booleans()):
        return ext, draw(st.binary(min_size=0, max_size=64))
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    elif mode in ("I", "F"):
        img = img.convert("L").convert(mode)
    elif mode != "RGB":
        img = img.convert(mode)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}[ext]
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store: store it as TIFF
        ext, buf = ".tif", io.BytesIO()
        img.save(buf, "TIFF")
    data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:  # sometimes truncated
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    return ext, data


@settings(max_examples=max(2, N_FAST // 40), deadline=None, database=None,
          derandomize=os.environ.get("BEIT_FAST_FUZZ_EXAMPLES") is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(flags=st.dictionaries(st.sampled_from(sorted(set(VALID) - {"--lr"})), st.none(), max_size=6).flatmap(
           lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys})),
       files=st.lists(image_file(), min_size=0, max_size=6),
       good_images=st.integers(1, 6))
def test_valid_flags_and_random_image_bytes_give_a_correct_run(toy, flags, files, good_images):
    """Valid flags on a folder of good images plus random files (valid, truncated or garbage bytes): the run
    completes with the expected number of steps and only finite losses, or (too few files for one step) it
    says so."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        folder.mkdir()
        make_toy_images(folder, n=good_images, size=36)
        for i, (ext, data) in enumerate(files):
            (folder / f"f{i}{ext}").write_bytes(data)
        flags = {"--batch_size": 2, "--epochs": 1, **flags}
        argv = _argv(args(toy, "--log_freq", 1, "--output_dir", tmp / "out", images=folder), flags)
        per_step = int(flags["--batch_size"]) * int(flags.get("--update_freq", 1))
        steps_per_epoch = (good_images + len(files)) // per_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if steps_per_epoch == 0:
                assert_match(run_expecting_error(argv), "fewer than one step")
                return
            summary = pretrain.main([str(a) for a in argv])
        total = steps_per_epoch * int(flags["--epochs"])
        stop = int(flags.get("--stop_after_steps", 0))
        assert summary["steps"] == (min(stop, total) if stop else total)
        log = read_log(tmp / "out")
        assert log and all(math.isfinite(r["loss"]) and math.isfinite(r["mlm_acc"]) for r in log), log
        assert [r["step"] for r in log] == sorted({r["step"] for r in log}) and log[-1]["step"] <= summary["steps"]


def test_a_folder_of_only_unreadable_files_names_them_not_the_batch_size(toy):
    """With fewer files than one step, the error said '3 images give 3 per process, fewer than one step of
    --batch_size 128': the real cause (no file can be read) only showed with --batch_size 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = run_expecting_error(args(toy, "--batch_size", 128, images=toy / "allbad"))
    assert_match(message, r"^error: 3 of the 3 image files under .*allbad cannot be read")
    assert "text.jpg" in message and "fewer than one step of --batch_size" not in message


def test_an_empty_folder_and_missing_dalle_weights_are_reported_at_once(toy):
    """Every problem found before training, in one message: the folder problem came one fix after the
    DALL-E weights problem."""
    argv = args(toy, images=toy / "empty")
    tok = argv.index("--discrete_vae_weight_path")
    argv = argv[:tok] + argv[tok + 2:]
    argv[argv.index("dvae")] = "dalle"
    message = run_expecting_error(argv)
    assert "no image files found" in message and "DALL-E" in message, message


# ---------------------------------------------------------------------------------------------------------
# The other command lines: every invalid flag named in a clear error, before any work (few examples each)
# ---------------------------------------------------------------------------------------------------------
BIG_SEED = str(2**64 + 1)


def _validate_finetune(argv, _root):
    """What ``python -m beit_fast.finetune`` checks before building anything: the flags, then the config."""
    import dataclasses

    from beit_fast import finetune

    cfg = finetune.resolve_defaults(finetune.get_args_parser().parse_args(argv))
    if cfg.layer_decay is None:  # set from the model's depth by the run
        cfg = dataclasses.replace(cfg, layer_decay=0.65)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _validate_probe(argv, _root):
    from beit_fast import linear_probe
    from beit_fast.config import ProbeConfig, exit_on_problems, from_args

    exit_on_problems(from_args(ProbeConfig, linear_probe.get_args_parser().parse_args(argv)).problems())


def _validate_tokenizer(argv, root):
    from beit_fast import train_tokenizer
    from beit_fast.config import TokenizerConfig, exit_on_problems, from_args

    args = train_tokenizer.build_parser().parse_args([*argv, "--output", str(root / "tok_out.pt")])
    exit_on_problems(from_args(TokenizerConfig, args).problems())


def _run_visualize(argv, root):
    from beit_fast import visualize

    visualize.main([str(root / "empty_run"), "--only", "mask", "--out_dir", str(root / "pics"), *argv])


def _run_convert(argv, root):
    from beit_fast import convert

    raise SystemExit(convert.main([str(root / "missing.pt"), str(root / "out.pt"), *argv]))  # errors: stderr


#: Per command line: how to run it up to its validation, valid flag values (may be combined), invalid ones
#: (each must be named in the error; one per example, since some commands stop at the first).
OTHER_CLIS = {
    "finetune": (_validate_finetune, {
        "--epochs": st.sampled_from(["1", "3"]), "--batch_size": st.just("8"), "--lr": st.sampled_from(["1e-3", "0"]),
        "--seed": st.sampled_from(["0", "7"]), "--drop_path": st.just("0.1"), "--smoothing": st.just("0.1"),
        "--reprob": st.just("0.25"), "--mixup": st.sampled_from(["0", "0.8"])}, {
        "--epochs": st.sampled_from(["0", "-1"]), "--batch_size": st.just("-1"), "--lr": st.sampled_from(["nan", "1e39"]),
        "--seed": st.sampled_from([BIG_SEED, "-1"]), "--drop_path": st.just("1"), "--reprob": st.just("2"),
        "--hflip": st.just("-1"), "--min_crop_scale": st.just("0"), "--crop_pct": st.just("0"),
        "--smoothing": st.just("1.5"), "--mixup": st.just("-1"), "--layer_decay": st.just("0"),
        "--eval_freq": st.just("0"), "--nb_classes": st.just("0"), "--max_image_pixels": st.just("0"),
        "--weight_decay": st.just("nan"), "--num_workers": st.just("-1"), "--aa": st.just("bogus"),
        "--clip_grad": st.just("-1"), "--stop_after_steps": st.just("-1"), "--labels_per_class": st.just("0"),
        "--input_size": st.just("0"), "--patch_size": st.just("0"), "--finetune": st.just("/nonexistent/x.pt")}),
    "linear_probe": (_validate_probe, {
        "--epochs": st.just("2"), "--lr": st.just("1e-3"), "--seed": st.just("3"), "--batch_size": st.just("16")}, {
        "--epochs": st.just("0"), "--batch_size": st.just("-1"), "--seed": st.sampled_from([BIG_SEED, "-1"]),
        "--lr": st.sampled_from(["nan", "-1"]), "--weight_decay": st.just("inf"), "--num_workers": st.just("-1"),
        "--labels_per_class": st.just("0"), "--input_size": st.just("0"), "--max_image_pixels": st.just("0"),
        "--finetune": st.just("/nonexistent/x.pt"), "--layer": st.just("-2")}),
    "train_tokenizer": (_validate_tokenizer, {
        "--steps": st.just("5"), "--batch_size": st.just("4"), "--seed": st.just("1"), "--vocab_size": st.just("64"),
        "--input_size": st.just("32"), "--lr": st.just("1e-3")}, {
        "--steps": st.just("0"), "--batch_size": st.just("0"), "--eval_images": st.just("-1"),
        "--seed": st.sampled_from([BIG_SEED, "-1"]), "--lr": st.sampled_from(["nan", "-1", "0"]),
        "--vocab_size": st.sampled_from(["1", str(2**26)]), "--input_size": st.sampled_from(["30", "0", "100000"]),
        "--temperature_start": st.just("0"), "--kl_weight": st.just("-1"), "--save_every": st.just("-1"),
        "--workers": st.just("-1"), "--threads": st.just("0")}),
    "visualize": (_run_visualize, {}, {
        "--num_images": st.sampled_from(["0", "100000000"]), "--seed": st.sampled_from(["-1", BIG_SEED]),
        "--dpi": st.just("0"), "--only": st.just("bogus"), "--device": st.just("gpu0")}),
    "convert": (_run_convert, {}, {
        "--num-heads": st.sampled_from(["0", "-3"]), "--img-size": st.just("0"),
        "--layer-norm-eps": st.sampled_from(["nan", "-1"]), "--to": st.just("x"), "--from": st.just("y")}),
}
N_OTHER = int(os.environ.get("BEIT_FAST_FUZZ_EXAMPLES_OTHER", 25))


@pytest.mark.parametrize("cli", sorted(OTHER_CLIS))
@settings(max_examples=N_OTHER, deadline=None, database=None,
          derandomize=os.environ.get("BEIT_FAST_FUZZ_EXAMPLES_OTHER") is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_other_clis_name_every_invalid_flag(cli, data, tmp_path):
    """Random valid flags plus (usually) one invalid value: with it, a clear error naming that flag (argparse's
    usage error for values it cannot parse) and no traceback; without, validation passes."""
    run, valid, invalid = OTHER_CLIS[cli]
    (tmp_path / "empty_run").mkdir(exist_ok=True)
    flags = data.draw(st.dictionaries(st.sampled_from(sorted(valid)), st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: valid[k] for k in keys}))) if valid else {}
    bad = data.draw(st.sampled_from(sorted(invalid)) if not valid else st.one_of(st.none(), st.sampled_from(sorted(invalid))))
    if bad is not None:
        flags = {**flags, bad: data.draw(invalid[bad])}
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            run(_argv([], flags), tmp_path)
            code = None
        except SystemExit as e:
            code = e.code
    if bad is None:
        assert code in (None, 0), f"{cli}: a valid flag set was refused: {flags}: {code}"
        return
    assert code not in (None, 0), f"{cli}: {bad} {flags[bad]} was accepted"
    message = err.getvalue().strip() if isinstance(code, int) else str(code)  # int: argparse's / convert's stderr
    assert "Traceback" not in message and "error" in message, message
    assert bad in message or bad.lstrip("-").replace("-", "_") in message, f"{cli}: {bad} not named in {message!r}"
