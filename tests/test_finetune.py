"""Fine-tuning: transforms, mixup/cutmix targets, a tiny run that learns, checkpoints/resume, the CLI."""
import json

import pytest
import torch
from PIL import Image

from beit_fast.utils.checkpoint import atomic_save, load_checkpoint
from beit_fast.finetune import main
from beit_fast.config import FinetuneConfig
from beit_fast.train.evaluation import accuracy, evaluate
from beit_fast.train.loss import soft_target_cross_entropy
from beit_fast.train.finetuning import default_layer_decay, finetune
from beit_fast.data.transforms import build_mixup, build_transforms, parse_randaug
from beit_fast.model.beit import build_classifier, build_model

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


class Prototypes(torch.utils.data.Dataset):
    """Separable toy images: a fixed random pattern per class plus noise."""

    def __init__(self, n, num_classes=4, seed=0, noise=0.5):
        g = torch.Generator().manual_seed(1234)
        protos = torch.randn(num_classes, 3, 16, 16, generator=g)
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % num_classes
        self.x = protos[self.y] + noise * torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _quiet(**kw):
    base = dict(epochs=1, batch_size=16, lr=3e-3, warmup_epochs=0, mixup=0.0, cutmix=0.0, drop_path=0.0,
                layer_decay=0.75, amp="none")
    return FinetuneConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def test_parse_randaug():
    assert parse_randaug("rand-m9-mstd0.5-inc1") == (2, 9)
    assert parse_randaug("rand-m7-n3") == (3, 7)
    assert parse_randaug("none") is None and parse_randaug(None) is None
    for bad in ("v0", "rand-m11", "rand-x3"):
        with pytest.raises(ValueError):
            parse_randaug(bad)


def test_transforms_shapes_and_eval_crop():
    img = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    train = build_transforms(32, train=True, randaug="rand-m9-mstd0.5-inc1", reprob=1.0)
    x = train(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    ev = build_transforms(32, train=False)
    a, b = ev(img), ev(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert "Resize" in repr(ev) and "36" in repr(ev)  # int(32 / (224/256)) = 36, then the 32 center crop
    small = build_transforms(16, train=True, randaug=None, reprob=0, hflip=0, min_scale=0.5)
    assert "HorizontalFlip" not in repr(small) and "RandAugment" not in repr(small)
    assert small(img).abs().max() <= 1.0  # (x - 0.5) / 0.5 in [-1, 1] without erasing
    alt = build_transforms(16, train=True, randaug=False, scale=(0.3, 0.9), reprob=0)
    assert "RandAugment" not in repr(alt) and "0.3" in repr(alt) and "0.9" in repr(alt)
    assert "RandAugment" in repr(build_transforms(16, train=True, randaug=True))


def test_mixup_cutmix_soft_targets_sum_to_one():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 5
    for mixup, cutmix in ((0.8, 1.0), (0.8, 0.0), (0.0, 1.0)):
        fn = build_mixup(5, mixup, cutmix, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
        for _ in range(3):
            xm, t = fn(x, y)
            assert xm.shape == x.shape and t.shape == (8, 5)
            torch.testing.assert_close(t.sum(-1), torch.ones(8))
            assert t.min() >= 0.1 / 5 - 1e-6
    assert build_mixup(5, 0.0, 0.0) is None
    fn = build_mixup(5, 0.8, 1.0, prob=0.0, label_smoothing=0.0)  # never mixes: one-hot targets
    xm, t = fn(x, y)
    assert torch.equal(xm, x) and torch.equal(t, torch.nn.functional.one_hot(y, 5).float())
    logits = torch.randn(8, 5)
    torch.testing.assert_close(soft_target_cross_entropy(logits, t), torch.nn.functional.cross_entropy(logits, y))


def test_accuracy_top5_capped():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert accuracy(logits, torch.tensor([1, 2]), (1, 5)) == [1, 2]
    assert default_layer_decay(12) == 0.65 and default_layer_decay(24) == 0.75


def test_config_validation():
    with pytest.raises(ValueError, match="layer_decay"):
        _quiet(layer_decay=1.5).validate()
    assert FinetuneConfig(blr=1e-3, batch_size=512).effective_lr() == pytest.approx(2e-3)
    assert FinetuneConfig().effective_lr() == 4e-3


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def test_tiny_finetune_learns(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("tiny", 4, **SMALL)
    train, val = Prototypes(128, seed=0), Prototypes(64, seed=1)
    before = evaluate(model, val)
    res = finetune(model, train, val, _quiet(epochs=6, warmup_epochs=1), output_dir=tmp_path, progress=False)
    losses = [h["train_loss"] for h in res["history"]]
    assert len(res["history"]) == 6
    assert losses[-1] < 0.6 * losses[0], losses
    assert res["final_top1"] >= 0.9 and res["best_top1"] >= res["final_top1"], res
    assert before["top1"] < 0.6
    assert res["final_top5"] == 1.0  # top-5 of 4 classes is capped at 4: always right
    assert (tmp_path / "checkpoint-best.pt").is_file() and (tmp_path / "checkpoint-last.pt").is_file()
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 7))
    assert all(k in lines[0] for k in ("train_loss", "val_loss", "top1", "top5", "lr"))
    best = load_checkpoint(tmp_path / "checkpoint-best.pt")
    assert best["epoch"] == res["best_epoch"] and best["kind"] == "finetune"


def test_mixup_path_runs_and_resume(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("tiny", 4, **SMALL)
    cfg = _quiet(epochs=1, mixup=0.8, cutmix=1.0, drop_path=0.1, clip_grad=1.0)
    res = finetune(model, Prototypes(32), Prototypes(16, seed=1), cfg, output_dir=tmp_path, progress=False)
    assert len(res["history"]) == 1 and torch.isfinite(torch.tensor(res["history"][0]["train_loss"]))
    assert model.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    # Resume: a second run with more epochs continues after epoch 1.
    model2 = build_classifier("tiny", 4, **SMALL)
    res2 = finetune(model2, Prototypes(32), Prototypes(16, seed=1), _quiet(epochs=2, mixup=0.8, cutmix=1.0,
                    resume="auto"), output_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in res2["history"]] == [1, 2]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(model, Prototypes(8), None, _quiet(), progress=False)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--finetune", "--layer_decay", "--mixup", "--cutmix", "--reprob", "--aa", "--blr", "--use_cls",
                 "--no_hflip", "--crop_pct", "--resume", "--eval", "--attn_backend"):
        assert flag in out


def _pretrain_ckpt(tmp_path):
    torch.manual_seed(0)
    pre = build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32)
    return atomic_save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "pretrain.pt")


def test_cli_smoke_from_pretraining_checkpoint(tmp_path, capsys):
    ckpt = _pretrain_ckpt(tmp_path)
    out = tmp_path / "run"
    common = ["--input_size", "16", "--labels_per_class", "4", "--no_progress", "--batch_size", "20"]
    res = main(["--finetune", str(ckpt), "--epochs", "1", "--output_dir", str(out), *common])
    assert (out / "checkpoint-best.pt").is_file() and (out / "log.jsonl").is_file()
    assert res["best_top1"] is not None and 0 <= res["final_top5"] <= 1
    assert "best top-1" in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoint-best.pt")
    assert state["model_config"]["depth"] == 2 and state["model_config"]["patch_size"] == 8  # the checkpoint's arch
    ev = main(["--eval", "--finetune", str(out / "checkpoint-best.pt"), *common])
    assert ev["final_top1"] == pytest.approx(res["history"][-1]["top1"])


def test_cli_bad_inputs(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--data_path", str(tmp_path / "missing"), "--no_progress"])
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="val"):
        main(["--data_path", str(tmp_path / "data"), "--no_progress", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not found"):
        main(["--finetune", str(tmp_path / "nope.pt")])
    pre = build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32)
    sd = {k: v for k, v in pre.state_dict().items() if not k.startswith("blocks.1.attn")}
    bad = atomic_save({"model": sd, "model_config": pre.cfg.to_dict()}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="lacks"):
        main(["--finetune", str(bad), "--input_size", "16", "--epochs", "1", "--no_progress",
              "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="aa"):
        main(["--aa", "v0"])


def _hold_lock(folder, ready, release):
    from beit_fast.train.checkpoint_folder import OutputDirLock

    with OutputDirLock(folder):
        ready.set()
        release.wait(60)


def test_output_folder_is_locked_and_a_fresh_run_does_not_overwrite_another(tmp_path, caplog):
    import logging
    import multiprocessing as mp

    from beit_fast.utils.checkpoint import CheckpointError, OutputDirInUseError

    out = tmp_path / "ft"
    train, val = Prototypes(32), Prototypes(16, seed=1)
    finetune(build_classifier("tiny", 4, **SMALL), train, val, _quiet(epochs=1), output_dir=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pt")}
    with pytest.raises(CheckpointError, match=r"resume='auto'.*overwrite_output_dir"):
        finetune(build_classifier("tiny", 4, **SMALL), train, val, _quiet(epochs=1), output_dir=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pt")} == before
    caplog.set_level(logging.INFO, logger="beit_fast")
    res = finetune(build_classifier("tiny", 4, **SMALL), train, val, _quiet(epochs=1, resume="auto"), output_dir=out,
                   progress=False)
    assert "the run is complete" in caplog.text and [h["epoch"] for h in res["history"]] == [1]
    # another process holding the folder: refused, naming it
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            finetune(build_classifier("tiny", 4, **SMALL), train, val, _quiet(epochs=2, resume="auto"),
                     output_dir=out, progress=False)
    finally:
        release.set()
        holder.join(30)
    # the explicit overwrite starts over
    finetune(build_classifier("tiny", 4, **SMALL), train, val, _quiet(epochs=1), output_dir=out, progress=False,
             overwrite_output_dir=True)
    assert [json.loads(s)["epoch"] for s in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_the_demo_fine_tunes_the_pretraining_demos_model_when_it_is_there(tmp_path, monkeypatch, caplog):
    """Right after ``python -m beit_fast.pretrain``, ``python -m beit_fast.finetune`` starts from its checkpoint
    (it trained from scratch, with a warning) and says so; ``--finetune ''`` still trains from scratch."""
    import logging

    monkeypatch.chdir(tmp_path)
    assert FinetuneConfig().resolved().finetune is None  # no pretraining demo yet: from scratch
    demo = tmp_path / "runs" / "beit_pretrain_demo"
    demo.mkdir(parents=True)
    torch.manual_seed(0)
    pre = build_model("tiny", img_size=16, patch_size=8, depth=2, vocab_size=32)
    atomic_save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, demo / "checkpoint-last.pt")
    assert FinetuneConfig().resolved().finetune == "runs/beit_pretrain_demo/checkpoint-last.pt"
    assert FinetuneConfig(finetune="").resolved().finetune == ""
    assert FinetuneConfig(patch_size=4).resolved().finetune is None  # an architecture flag: the user's model
    caplog.set_level(logging.INFO, logger="beit_fast")
    res = main(["--labels_per_class", "4", "--no_progress", "--batch_size", "20", "--epochs", "1"])
    assert "fine-tuning the pretraining demo's model runs/beit_pretrain_demo/checkpoint-last.pt" in caplog.text
    assert "training from scratch" not in caplog.text
    state = load_checkpoint(tmp_path / "runs" / "beit_finetune_demo" / "checkpoint-best.pt")
    assert state["model_config"]["patch_size"] == 8 and state["model_config"]["depth"] == 2  # the demo's model
    assert res["best_top1"] is not None
