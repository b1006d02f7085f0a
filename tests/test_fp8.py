"""--fp8: torchao float8 training of the blocks' QKV and MLP linears (emulated on CPU).

torchao is optional: the conversion tests skip without it; the clear-error tests run either way."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from beit_fast.train.loss import MIMLoss
from beit_fast.train.mim import FastPretrainEngine
from beit_fast.model.fp8 import FP8_LINEAR_SUFFIXES, convert_to_fp8_training, fp8_unavailable_reason
from beit_fast.data.masking import MaskingGenerator
from beit_fast.model.beit import build_model, get_config
from beit_fast.train.optim import build_optimizer

K = 6  # masked patches per image


def _tiny():
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=256, img_size=32, patch_size=8)
    return cfg, build_model(cfg).configure_fast_path(attention="math", fused_embed=None)


def _batch(cfg, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = cfg.grid_size
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=g)
    gen = MaskingGenerator((grid, grid), K, min_num_patches=2, fixed_count=True)
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(b)]))
    tokens = torch.randint(0, cfg.vocab_size, (b, grid * grid), generator=g)
    return images, masks, tokens


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_fp8_refused_off_hopper_with_a_clear_reason():
    why = fp8_unavailable_reason("cpu")
    assert why is not None and ("CUDA GPU" in why or "torchao" in why)
    _, model = _tiny()
    with pytest.raises(RuntimeError, match="FP8 training needs"):
        convert_to_fp8_training(model)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())  # left untouched


def test_pretrain_cli_fp8_on_cpu_is_a_clear_error(tmp_path):
    from beit_fast.pretrain import main

    with pytest.raises(SystemExit, match="--fp8"):
        main(["--fp8", "--fast", "on", "--device", "cpu", "--output_dir", str(tmp_path), "--no_progress"])
    with pytest.raises(SystemExit, match="--fp8 needs the fast step"):
        main(["--fp8", "--fast", "off", "--device", "cpu", "--output_dir", str(tmp_path)])


def test_engine_fp8_on_cpu_is_a_clear_error(one_thread):
    cfg, model = _tiny()
    sched = np.full(10, 1e-3)
    with pytest.raises(RuntimeError, match="FP8 training needs"):
        FastPretrainEngine(model, None, build_optimizer(model, 1e-3, 0.05), torch.device("cpu"), sched, sched,
                           num_masked=K, compile=False, fp8=True)


def test_conversion_swaps_block_linears_and_keeps_parameters_and_state_dict(one_thread):
    pytest.importorskip("torchao.float8")
    cfg, model = _tiny()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    names = convert_to_fp8_training(model, emulate=True)
    assert names == [f"blocks.{i}.{s}" for i in range(cfg.depth) for s in FP8_LINEAR_SUFFIXES]
    for name, mod in model.named_modules():
        assert (type(mod).__name__ == "Float8Linear") == (name in names), name
    # the very same Parameter objects: an optimizer built before the conversion stays valid
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before
    fresh = build_model(cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)  # checkpoints load both ways
    model.load_state_dict(fresh.state_dict(), strict=True)
    assert convert_to_fp8_training(model, emulate=True) == []  # idempotent


def test_emulated_fp8_step_matches_fp32_within_fp8_rounding(one_thread):
    """FP8 quantises the GEMM operands (e4m3 forward: unit roundoff 2^-4; e5m2 gradients: 2^-3), so
    per-tensor gradients move by a few percent; the loss, a mean over all rows, by far less. The loss
    must change (the FP8 path really runs) and stay within 1e-3 relative; the whole gradient within 10%."""
    pytest.importorskip("torchao.float8")
    cfg, ref = _tiny()
    f8 = copy.deepcopy(ref)
    convert_to_fp8_training(f8, emulate=True)
    images, masks, tokens = _batch(cfg)
    losses = []
    for model in (ref, f8):
        loss, _ = MIMLoss(model, num_masked=K)(images, masks, tokens)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] != losses[1]
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-3
    g_ref, g_f8 = _flat_grad(ref), _flat_grad(f8)
    assert torch.isfinite(g_f8).all()
    assert ((g_f8 - g_ref).norm() / g_ref.norm()).item() < 0.1


def test_emulated_fp8_training_follows_the_fp32_loss_curve(one_thread):
    """Twenty AdamW steps through the fast engine (uncompiled, CPU): the FP8 loss curve stays within 2%
    of the fp32 one at every step, and both go down."""
    pytest.importorskip("torchao.float8")
    cfg, ref = _tiny()
    f8 = copy.deepcopy(ref)
    convert_to_fp8_training(f8, emulate=True)
    curves = []
    for model in (ref, f8):
        sched = np.full(100, 2e-3)
        eng = FastPretrainEngine(model, None, build_optimizer(model, 2e-3, 0.05), torch.device("cpu"), sched, sched,
                                 num_masked=K, compile=False)
        eng.tokenize = lambda tok_images, mask, _t=_batch(cfg)[2]: _t  # fixed tokens: the model step alone
        images, masks, _ = _batch(cfg)
        curves.append([eng.train_step((images, images, masks), s).loss for s in range(20)])
    ref_curve, f8_curve = np.array(curves[0]), np.array(curves[1])
    assert ref_curve[-1] < ref_curve[0] - 0.5 and f8_curve[-1] < f8_curve[0] - 0.5
    assert np.max(np.abs(f8_curve - ref_curve) / ref_curve) < 0.02
