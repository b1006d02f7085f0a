"""Interoperability with HuggingFace transformers and timm: patch their BEiT models with beit_fast's
fused ops, and convert checkpoints between the official, HuggingFace and timm layouts.

    apply_beit_fast_to_hf(model, attention="auto", fused_loss=False, fused_embed=True)
    apply_beit_fast_to_timm(model, attention="auto", activation_checkpointing=False)
    revert_beit_fast(model)
    detect_format(state_dict); convert_state_dict(state_dict, to="hf"); official_to_hf / hf_to_official /
    official_to_timm / timm_to_official; load_state_dict / save_state_dict (torch and safetensors files)

Neither transformers nor timm is imported by this package until a function needs it. See INTEROP.md.
"""
from __future__ import annotations

from .checkpoints import (
    FORMATS,
    TARGETS,
    convert_state_dict,
    detect_format,
    detect_layout,
    hf_config_from_state_dict,
    hf_to_official,
    infer_architecture,
    installed_hf_naming,
    load_state_dict,
    official_config_from_hf,
    official_config_from_state_dict,
    official_pretrain_to_finetune,
    official_to_hf,
    official_to_timm,
    save_state_dict,
    timm_kwargs_from_state_dict,
    timm_to_official,
    to_official,
)
from .hf import apply_beit_fast_to_hf
from .patching import beit_fast_patch_info, revert_beit_fast
from .timm import apply_beit_fast_to_timm

__all__ = [
    "apply_beit_fast_to_hf",
    "apply_beit_fast_to_timm",
    "revert_beit_fast",
    "beit_fast_patch_info",
    "FORMATS",
    "TARGETS",
    "detect_format",
    "detect_layout",
    "convert_state_dict",
    "to_official",
    "official_to_hf",
    "hf_to_official",
    "official_to_timm",
    "timm_to_official",
    "official_pretrain_to_finetune",
    "infer_architecture",
    "installed_hf_naming",
    "official_config_from_state_dict",
    "official_config_from_hf",
    "hf_config_from_state_dict",
    "timm_kwargs_from_state_dict",
    "load_state_dict",
    "save_state_dict",
]
