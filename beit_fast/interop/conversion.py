"""Any supported format -> any other, through the official names."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .formats import FORMATS, StateDict, detect_format
from .hf_keys import hf_to_official, official_to_hf
from .official_keys import _add_index, _official_order
from .timm_keys import official_to_timm

def to_official(
    state_dict: Mapping[str, torch.Tensor], src: str | None = None, with_index: bool = True,
    grid: tuple[int, int] | None = None,
) -> StateDict:
    """Any supported format -> official names (with the ``relative_position_index`` buffers when
    ``with_index``, as the official code saves them)."""
    src = src or detect_format(state_dict)
    if src in ("hf", "hf_legacy"):
        out = hf_to_official(state_dict, with_index=False)
    elif src in ("timm", "official"):
        out = dict(state_dict)
    else:
        raise ValueError(f"unknown source format {src!r}; supported: {FORMATS}")
    return _add_index(out, grid) if with_index else _official_order(out)


TARGETS = ("official", "timm", "hf", "hf_legacy", "hf_auto")
_FAMILY = {"official": "official", "timm": "official", "hf": "hf", "hf_legacy": "hf"}


def same_family(a: str, b: str) -> bool:
    """official/timm share key names (timm lacks the index buffers); hf/hf_legacy are both HuggingFace."""
    return _FAMILY.get(a, a) == _FAMILY.get(b, b)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], to: str, src: str | None = None, *, drop_mim_head: bool = False,
    hf_prefix: str | None = None, grid: tuple[int, int] | None = None,
) -> StateDict:
    """Convert a BEiT state dict from any format (detected unless ``src`` is given) to ``to``: "official",
    "timm", "hf", "hf_legacy" or "hf_auto" (the installed transformers' naming). Values and dtypes are
    never changed; see the direction-specific functions for what each direction refuses."""
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; supported: {', '.join(TARGETS)}")
    if src is not None and src not in FORMATS:
        raise ValueError(f"unknown source format {src!r}; supported: {', '.join(FORMATS)}")
    detected = detect_format(state_dict)
    if src is not None and not same_family(src, detected):
        raise ValueError(f"the state dict looks like {detected!r}, not {src!r}")
    official = to_official(state_dict, detected, with_index=True, grid=grid)
    if to == "official":
        return official
    if to == "timm":
        return official_to_timm(official, drop_mim_head=drop_mim_head)
    return official_to_hf(official, naming="auto" if to == "hf_auto" else to, prefix=hf_prefix)
