"""BEiT checkpoints across layouts: official (= ours), HuggingFace transformers, timm; torch and safetensors.

Formats (``detect_format`` names; ``FORMATS``):

``"official"``   the official ``microsoft/unilm`` key names, which are ours: ``blocks.{i}.attn.qkv.weight``,
                 ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``, ``rel_pos_bias.*`` (pretraining, shared) or
                 ``blocks.{i}.attn.relative_position_bias_table`` (fine-tuned), with the persistent
                 ``relative_position_index`` buffers the official code saves.
``"timm"``       timm's ``Beit``: the official fine-tuning names without ``relative_position_index`` (timm
                 keeps it non-persistent), no ``mask_token``, no ``lm_head``.
``"hf"``         transformers >= 5 in-memory names (``beit.layers.{i}.attention.q_proj.weight``,
                 ``beit.shared_position_bias.*``): what ``model.state_dict()`` gives and ``load_state_dict``
                 takes with the installed transformers.
``"hf_legacy"``  the names in files on the Hub and written by ``save_pretrained`` (every transformers version
                 reads them with ``from_pretrained``): ``beit.encoder.layer.{i}.attention.attention.query.weight``,
                 ``beit.encoder.relative_position_bias.*``.

Layouts (``detect_layout``): ``"pretrain"`` (masked image modeling: ``lm_head``), ``"classification"``
(``head`` / ``classifier``), ``"backbone"`` (neither).

Every converter goes through the official names, maps one tensor to one tensor except the attention
input projection (official ``qkv.weight [3D, D]`` <-> HF ``query/key/value`` ``[D, D]`` each, a split and a
concatenation, exact), and never changes a value or a dtype: official -> HF -> official is bitwise
identical. What cannot be represented is refused with a ``ValueError`` rather than dropped silently; see
the individual functions and INTEROP.md.

This module is the entry point; the work is split by job: :mod:`.formats` (detection),
:mod:`.official_keys` (official order, index buffers, pretraining -> fine-tuning), :mod:`.hf_keys` and
:mod:`.timm_keys` (the key mapping per library; the qkv split/concatenation is in ``hf_keys``),
:mod:`.conversion` (any -> any), :mod:`.architecture` (hyper-parameters and configs), :mod:`.files`
(reading and writing). Their public names are importable from here.
"""
from __future__ import annotations


from .architecture import (
    hf_config_from_state_dict,
    infer_architecture,
    official_config_from_hf,
    official_config_from_state_dict,
    timm_kwargs_from_state_dict,
)
from .conversion import TARGETS, convert_state_dict, to_official
from .files import load_state_dict, save_state_dict
from .formats import FORMATS, LAYOUTS, detect_format, detect_layout
from .hf_keys import hf_to_official, installed_hf_naming, official_to_hf
from .official_keys import official_pretrain_to_finetune
from .timm_keys import official_to_timm, timm_to_official


__all__ = [
    "FORMATS",
    "LAYOUTS",
    "detect_format",
    "detect_layout",
    "convert_state_dict",
    "to_official",
    "TARGETS",
    "official_to_hf",
    "hf_to_official",
    "official_to_timm",
    "timm_to_official",
    "official_pretrain_to_finetune",
    "infer_architecture",
    "official_config_from_state_dict",
    "official_config_from_hf",
    "hf_config_from_state_dict",
    "timm_kwargs_from_state_dict",
    "load_state_dict",
    "save_state_dict",
    "installed_hf_naming",
]
