"""beit_fast: fast, faithful BEiT pretraining (masked image modeling with visual tokens) for PyTorch.

Public API: the model and its configs, the masking generator, the loss modules (model + loss as one
module, for pretraining and fine-tuning), the fused ops (each with its reference) and their backend switch. Everything not re-exported here is private.
"""
from .masking import MaskingConfig, MaskingGenerator
from .model import (
    MODEL_CONFIGS,
    BeitConfig,
    VisionTransformerForMaskedImageModeling,
    build_model,
    get_config,
    VisionTransformerForClassification,
    build_classifier,
)
from .loss import ClassificationLoss, MIMLoss, build_finetune_loss
from .optim import apply_schedule, layer_id_for_vit, param_groups_layer_decay
from .pretrained import PretrainedLoadError, load_pretrained, resize_rel_pos_bias_table
from .interop import (
    apply_beit_fast_to_hf,
    apply_beit_fast_to_timm,
    convert_state_dict,
    detect_format,
    revert_beit_fast,
)
from .modules import FusedLinearCrossEntropyLoss, PatchEmbedMask, RelPosBiasAttention
from .ops import (
    attention_with_bias,
    attention_with_rel_pos_bias,
    get_backend,
    masked_linear_cross_entropy,
    patch_embed_mask,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BeitConfig",
    "MODEL_CONFIGS",
    "get_config",
    "build_model",
    "VisionTransformerForMaskedImageModeling",
    "MaskingConfig",
    "MaskingGenerator",
    "patch_embed_mask",
    "masked_linear_cross_entropy",
    "attention_with_bias",
    "attention_with_rel_pos_bias",
    "set_backend",
    "get_backend",
    "use_backend",
    "FusedLinearCrossEntropyLoss",
    "PatchEmbedMask",
    "RelPosBiasAttention",
    "apply_beit_fast_to_hf",
    "apply_beit_fast_to_timm",
    "revert_beit_fast",
    "convert_state_dict",
    "detect_format",
    "VisionTransformerForClassification",
    "build_classifier",
    "load_pretrained",
    "resize_rel_pos_bias_table",
    "PretrainedLoadError",
    "MIMLoss",
    "ClassificationLoss",
    "build_finetune_loss",
    "param_groups_layer_decay",
    "layer_id_for_vit",
    "apply_schedule",
]
