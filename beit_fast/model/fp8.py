"""Optional FP8 matmuls for the Transformer blocks (torchao's float8 training), behind ``--fp8``.

``convert_to_fp8_training(model)`` swaps the QKV projection and the two MLP linears of every block
(``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``) for torchao's ``Float8Linear``:
tensorwise dynamic scaling, e4m3 forward operands and e5m2 gradients, fp32 accumulation (torchao's
default recipe). Everything else keeps the AMP dtype: the patch embedding, attention itself, the output
projection, LayerNorms and the fused head + loss. The parameters themselves are kept (the new modules
hold the same ``nn.Parameter`` objects in their master dtype), so an optimizer built before the
conversion, state dicts and checkpoints are unchanged; a converted model loads an unconverted
checkpoint and the other way round.

FP8 tensor cores need a CUDA card of compute capability 8.9 or newer (Hopper: H100/H200; also Ada).
``emulate=True`` runs the same casts and scaling with the matmul emulated in higher precision: it works
on CPU and is how the tests check the conversion. torchao is an optional dependency
(``pip install -e ".[fp8]"`` in the clone).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

__all__ = ["FP8_LINEAR_SUFFIXES", "fp8_unavailable_reason", "convert_to_fp8_training"]

# Linears that go to FP8: the block's big GEMMs (QKV: D -> 3D, MLP: D -> 4D -> D), about 5/6 of its FLOPs.
FP8_LINEAR_SUFFIXES: tuple[str, ...] = ("attn.qkv", "mlp.fc1", "mlp.fc2")
MIN_CAPABILITY = (8, 9)


def _torchao_float8():
    return importlib.import_module("torchao.float8")


def fp8_unavailable_reason(device: torch.device | str, emulate: bool = False) -> str | None:
    """Why FP8 training cannot run on ``device`` (None when it can)."""
    try:
        _torchao_float8()
    except Exception as e:  # ImportError, or a torchao built for another torch failing at import
        return (f"FP8 training needs torchao (pip install -e '.[fp8]' in the clone); it cannot be imported here "
                f"({type(e).__name__}: {e})")
    if emulate:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 training needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: H100/H200 "
                f"or Ada); this run is on {device.type}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        return (f"FP8 training needs compute capability >= 8.9 (H100/H200 or Ada); "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def _wanted(module: nn.Module, fqn: str) -> bool:
    # exactly nn.Linear (not already converted), a block linear, and shapes FP8 GEMMs accept (multiples of 16)
    return (type(module) is nn.Linear and fqn.endswith(FP8_LINEAR_SUFFIXES) and fqn.startswith("blocks.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8_training(model: nn.Module, *, emulate: bool = False) -> list[str]:
    """Swap the blocks' QKV and MLP linears of ``model`` (a BEiT model of :mod:`beit_fast.model.beit`) for
    torchao ``Float8Linear`` in place; returns the names converted (already converted ones are skipped).

    Call it before ``torch.compile`` and before sharding the model. Raises RuntimeError naming the reason
    when FP8 cannot run on the model's device (``emulate=True``: only torchao is needed)."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    why = fp8_unavailable_reason(device, emulate=emulate)
    if why is not None:
        raise RuntimeError(why)
    f8 = _torchao_float8()
    names = [name for name, mod in model.named_modules() if _wanted(mod, name)]
    if names:
        config = f8.Float8LinearConfig(emulate=emulate)
        f8.convert_to_float8_training(model, module_filter_fn=_wanted, config=config)
    return names
