"""Fine-tuning through the one engine and loop: the compiled fast step against the eager step (loss and every
gradient, fp32 tight; the same update), the non-finite check on the device (no host read in the step; a
skipped update leaves weights and AdamW state untouched), pretraining's non-finite policy (save, then stop),
and exact resume of a fine-tuning run stopped in the middle of an epoch."""
import copy
import json
import math

import pytest
import torch

from beit_fast.utils.checkpoint import load_checkpoint
from beit_fast.config import FinetuneConfig
from beit_fast.train.loss import build_finetune_loss
from beit_fast.model.beit import build_classifier
from beit_fast.train.optim import cosine_scheduler, param_groups_layer_decay
from beit_fast.train.engine import Engine
from beit_fast.train.finetuning import ClassificationBatches, finetune
from beit_fast.train.loop import NonFiniteLossError
from beit_fast.data.transforms import build_mixup

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
CLASSES = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model():
    torch.manual_seed(0)
    model = build_classifier("tiny", CLASSES, drop_path_rate=0.0, **SMALL)
    with torch.no_grad():  # zero tables and a 0.001-scaled head at init: give them values so they matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.2)
    return model


def make_engine(model, fast, compile=False, attention="sdpa", mixup=True):
    task = build_finetune_loss(model, None, 0.1, fast=fast, attention=attention, activation_checkpointing=1 if fast else "none")
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.65), lr=1e-3, fused=True)
    sched = cosine_scheduler(1e-3, 1e-5, 2, 5)
    mix = build_mixup(CLASSES, 0.8, 1.0, label_smoothing=0.1) if mixup else None
    return Engine(task, opt, torch.device("cpu"), sched, sched * 50, clip_grad=1.0,
                  prepare=ClassificationBatches(torch.device("cpu"), mix), compile=compile, nonfinite_check="device")


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (4,), generator=g)


def loss_and_grads(engine, raw, seed):
    torch.manual_seed(seed)  # the same mixup draw for both engines
    inputs = engine.prepare(raw)
    engine.model.zero_grad(set_to_none=True)
    loss, acc = engine.compute_loss(*inputs)
    loss.backward()
    return loss.detach(), acc, {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixup", [True, False], ids=["mixup", "labels"])
def test_compiled_fast_step_through_the_engine_matches_the_eager_step(mixup):
    """The fast step (the classifier's fused SDPA attention with per-block bias, activation checkpointing,
    torch.compile fullgraph with static shapes) against the eager step, both through Engine: the same loss
    and every gradient (fp32, tight), and after two full optimizer steps the same weights."""
    torch._dynamo.reset()
    model = make_model()
    eager, fast = make_engine(model, fast=False, mixup=mixup), make_engine(copy.deepcopy(model), fast=True,
                                                                           compile=True, mixup=mixup)
    assert fast.compiled and not eager.compiled
    (l1, a1, g1), (l2, a2, g2) = loss_and_grads(eager, batch(1), 11), loss_and_grads(fast, batch(1), 11)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a2, a1)
    assert set(g1) == set(g2) and any("relative_position_bias_table" in n for n in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
    for step in range(2):
        torch.manual_seed(step)
        r1 = eager.train_step(batch(2 + step), step)
        torch.manual_seed(step)
        r2 = fast.train_step(batch(2 + step), step)
        torch.testing.assert_close(r2.loss, r1.loss, atol=1e-5, rtol=1e-4)
        assert not bool(r1.skipped) and not bool(r2.skipped)
    for (name, p), q in zip(eager.model.named_parameters(), fast.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


def test_non_finite_fine_tuning_step_is_skipped_on_the_device(monkeypatch):
    model = make_model()
    engine = make_engine(model, fast=False)
    engine.train_step(batch(0), 0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(engine.optimizer.state_dict()["state"])
    images, labels = batch(1)
    images[0, 0, 0, 0] = math.nan
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or 0.0)
    result = engine.train_step((images, labels), 1)
    monkeypatch.undo()
    assert reads == []  # nothing read on the host in the step
    assert bool(result.skipped) and bool(result.bad) and not math.isfinite(float(result.loss))
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for i, s in engine.optimizer.state_dict()["state"].items():
        for k in s:
            assert torch.equal(s[k], state[i][k]), (i, k)


class Prototypes(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(1234)
        protos = torch.randn(CLASSES, 3, 16, 16, generator=g)
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % CLASSES
        self.x = protos[self.y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=3e-3, warmup_epochs=1, mixup=0.8, cutmix=1.0, drop_path=0.1,
                layer_decay=0.75, amp="none", log_freq=2, clip_grad=1.0)
    return FinetuneConfig(**{**base, **kw})


def _run(out, **kw):
    torch.manual_seed(0)
    model = build_classifier("tiny", CLASSES, **SMALL)
    res = finetune(model, Prototypes(40), Prototypes(15, seed=1), _cfg(**kw), output_dir=out, progress=False)
    return res, model


def test_fine_tuning_resumed_mid_epoch_is_bit_exact(tmp_path):
    """Stopped in the middle of epoch 2 (mixup, cutmix, drop path, random augmentation state all in play),
    then resumed: the same epoch records and bit-identical weights as the uninterrupted run."""
    full, model_full = _run(tmp_path / "full")
    part, _ = _run(tmp_path / "part", stop_after_steps=7)  # 5 steps an epoch: stopped at step 7
    assert part["interrupted"] and load_checkpoint(tmp_path / "part" / "checkpoint-last.pt")["step"] == 7
    resumed, model_resumed = _run(tmp_path / "part", resume="auto")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        assert (a["train_loss"], a["top1"], a["val_loss"]) == (b["train_loss"], b["top1"], b["val_loss"])
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for (name, p), q in zip(model_full.named_parameters(), model_resumed.parameters()):
        assert torch.equal(p, q), name
    assert full["final_top1"] == resumed["final_top1"]


def test_non_finite_losses_save_then_stop(tmp_path):
    """Pretraining's policy for fine-tuning too: after max_bad_steps consecutive non-finite steps the run
    saves a checkpoint (the last good weights: no bad step updated them) and stops with an error."""
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite losses"):
        _run(tmp_path / "nan", lr=1e30, min_lr=1e30, warmup_epochs=0, clip_grad=None, log_freq=1, mixup=0.0,
             cutmix=0.0)
    state = load_checkpoint(tmp_path / "nan" / "checkpoint-last.pt")
    assert state["kind"] == "finetune" and all(torch.isfinite(v).all() for v in state["model"].values()
                                               if v.is_floating_point())


def test_tensorboard_scalars_of_a_fine_tuning_run(tmp_path):
    """Every run logs through the one loop: fine-tuning's epoch records go to log.jsonl and TensorBoard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res, _ = _run(tmp_path / "run", epochs=2, mixup=0.0, cutmix=0.0, log_dir=str(tmp_path / "tb"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss/train_loss", "val/top1", "val/top5", "val/val_loss", "opt/lr"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("val/top1")
    assert [e.step for e in events] == [5, 10]
    assert [e.value for e in events] == pytest.approx([h["top1"] for h in res["history"]])


def test_cli_fast_flags_reach_the_step(tmp_path, monkeypatch):
    """--fast on (uncompiled here: compiling is checked above), --attn_backend, --activation_checkpointing: the
    task module the engine runs is the classifier's fast path with that attention and checkpointing."""
    from beit_fast.finetune import main
    from beit_fast.train import finetuning

    built = []

    def spy(model, *args, **kwargs):
        task = build_finetune_loss(model, *args, **kwargs)
        built.append(({b.attn.attn_backend for b in model.blocks}, model.checkpoint_blocks, args, kwargs))
        return task

    monkeypatch.setattr(finetuning, "build_finetune_loss", spy)
    res = main(["--epochs", "1", "--input_size", "16", "--labels_per_class", "4", "--batch_size", "20", "--fast", "on",
                "--no-compile", "--attn_backend", "sdpa", "--activation_checkpointing", "all", "--no_progress",
                "--output_dir", str(tmp_path / "run")])
    (attention, checkpointed, args, kwargs), = built
    assert attention == {"sdpa"} and checkpointed == {0, 1, 2, 3} and kwargs["fast"] is True
    assert res["best_top1"] is not None
    with pytest.raises(SystemExit, match="activation_checkpointing"):
        main(["--activation_checkpointing", "some", "--epochs", "1", "--no_progress",
              "--output_dir", str(tmp_path / "bad")])
