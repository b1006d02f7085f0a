"""beit_fast: fast, faithful BEiT pretraining (masked image modeling with visual tokens) for PyTorch.

Public API: the model and its configs, the masking generator, the loss modules (model + loss as one
module, for pretraining and fine-tuning), the fused ops (each with its reference) and their backend switch. Everything not re-exported here is private.

The names are imported on first use (PEP 562 module ``__getattr__``), so ``import beit_fast`` and the
command-line programs' ``--help`` do not import torch; ``from beit_fast import X`` works as usual.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    "BeitConfig": "model.beit",
    "MODEL_CONFIGS": "model.beit",
    "get_config": "model.beit",
    "build_model": "model.beit",
    "VisionTransformerForMaskedImageModeling": "model.beit",
    "MaskingConfig": "data.masking",
    "MaskingGenerator": "data.masking",
    "patch_embed_mask": "ops",
    "masked_linear_cross_entropy": "ops",
    "attention_with_bias": "ops",
    "attention_with_rel_pos_bias": "ops",
    "set_backend": "ops",
    "get_backend": "ops",
    "use_backend": "ops",
    "FusedLinearCrossEntropyLoss": "model.modules",
    "PatchEmbedMask": "model.modules",
    "RelPosBiasAttention": "model.modules",
    "apply_beit_fast_to_hf": "interop",
    "apply_beit_fast_to_timm": "interop",
    "revert_beit_fast": "interop",
    "convert_state_dict": "interop",
    "detect_format": "interop",
    "VisionTransformerForClassification": "model.beit",
    "build_classifier": "model.beit",
    "load_pretrained": "interop.pretrained",
    "resize_rel_pos_bias_table": "interop.pretrained",
    "PretrainedLoadError": "interop.pretrained",
    "MIMLoss": "train.loss",
    "ClassificationLoss": "train.loss",
    "build_finetune_loss": "train.loss",
    "param_groups_layer_decay": "train.optim",
    "layer_id_for_vit": "train.optim",
    "apply_schedule": "train.optim",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'beit_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .interop import (apply_beit_fast_to_hf, apply_beit_fast_to_timm, convert_state_dict, detect_format,
                          revert_beit_fast)
    from .train.loss import ClassificationLoss, MIMLoss, build_finetune_loss
    from .data.masking import MaskingConfig, MaskingGenerator
    from .model.beit import (
        MODEL_CONFIGS, BeitConfig, VisionTransformerForClassification, VisionTransformerForMaskedImageModeling,
        build_classifier, build_model, get_config,
    )
    from .model.modules import FusedLinearCrossEntropyLoss, PatchEmbedMask, RelPosBiasAttention
    from .ops import (attention_with_bias, attention_with_rel_pos_bias, get_backend, masked_linear_cross_entropy,
                      patch_embed_mask, set_backend, use_backend)
    from .train.optim import apply_schedule, layer_id_for_vit, param_groups_layer_decay
    from .interop.pretrained import PretrainedLoadError, load_pretrained, resize_rel_pos_bias_table
