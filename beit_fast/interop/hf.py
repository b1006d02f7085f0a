"""Patch HuggingFace transformers' BEiT models (one instance at a time) with beit_fast's fused ops.

``apply_beit_fast_to_hf(model, attention="auto", fused_loss=False, fused_embed=True, *, return_logits=False,
fast_rel_pos_bias=True)`` replaces methods *on the given instance* (instance attributes shadowing the
class's methods; the class and every other instance are untouched; no parameter, buffer or config value
changes, so state dicts and ``save_pretrained`` are unaffected). ``revert_beit_fast(model)`` removes them.
Every replacement keeps the replaced method's signature (``inspect.signature`` shows HF's) and, by default,
HF's output contract: the same outputs, the same gradients, the same ``return_dict=False`` tuples.

The parts (transformers >= 5 module layout: ``model.beit.layers[i].attention.q_proj`` ...), each switchable:

* ``attention``: ``BeitAttention.forward`` (every layer) -> q/k/v projections as HF computes them, then
  ``beit_fast.ops.attention_with_bias(q, k, v, attention_mask, scale=module.scaling)``. The additive
  ``attention_mask`` HF hands to the attention already holds the relative position bias (shared and/or
  per layer) plus any user mask, so the bias and its gradient go through the fused attention. It stands in
  for HF's SDPA attention only: HF's own forward runs whenever ``config._attn_implementation`` is not
  ``"sdpa"`` ("eager", "flex_attention", a registered kernel), whenever attention maps are requested
  (``output_attentions`` as a forward keyword or in the config: HF then records them from its own code),
  for a boolean mask, and in training with ``attention_probs_dropout_prob > 0`` (the fused op has no
  dropout).
* ``fast_rel_pos_bias``: ``BeitRelativePositionBias.forward`` (shared and per layer) -> when the window is
  the model's own and ``interpolate_pos_encoding`` is off, a direct gather from the table with an index
  cached on the table's device (HF re-runs a same-size bilinear interpolation, an identity, and indexes
  with a CPU index tensor on every call). Other windows: HF's own forward. Identical values.
* ``fused_embed``: ``BeitEmbeddings.forward`` -> ``beit_fast.ops.patch_embed_mask`` (patch projection,
  flatten and the mask-token blend in one op; Triton on CUDA), then [CLS], position embeddings and dropout
  as HF does. Only for boolean ``bool_masked_pos`` (or none); other mask dtypes use HF's forward.
* ``fused_loss`` (explicit opt-in, ``BeitForMaskedImageModeling`` only): ``forward`` with ``labels`` ->
  the loss is ``masked_linear_cross_entropy`` over the masked positions only, and no ``[B, N, vocab]``
  logits are built. This changes the output contract (no logits unless ``return_logits``; 0.0 instead of
  NaN when every label is ignored): see :func:`apply_beit_fast_to_hf`. Off by default.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ops.attention import _VALID_NAMES as _ATTENTION_NAMES
from ..ops.attention import attention_with_bias
from ..ops.backend import VALID_BACKENDS
from ..ops.cross_entropy import masked_linear_cross_entropy
from ..ops.patch_embed import patch_embed_mask
from ..ops.rel_pos import gather_relative_position_bias
from .patching import _begin_patch

__all__ = ["apply_beit_fast_to_hf", "SUPPORTED_HF_MODELS"]

SUPPORTED_HF_MODELS = ("BeitForMaskedImageModeling", "BeitForImageClassification", "BeitForSemanticSegmentation",
                       "BeitBackbone", "BeitModel")
IGNORE_INDEX = -100  # HF's nn.CrossEntropyLoss() default, the index HF's MIM loss ignores


# --------------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------------
def _hf_classes() -> dict[str, type]:
    try:
        from transformers.models.beit import modeling_beit as mb
    except Exception:  # transformers missing or broken: nothing can be an HF BEiT model
        return {}
    return {name: getattr(mb, name) for name in SUPPORTED_HF_MODELS if hasattr(mb, name)}


def _unsupported(model: object) -> TypeError:
    cls = type(model)
    return TypeError(
        f"apply_beit_fast_to_hf does not support {cls.__module__}.{cls.__qualname__}; supported: "
        + ", ".join(f"transformers.{n}" for n in SUPPORTED_HF_MODELS)
        + " (for timm's Beit use apply_beit_fast_to_timm)"
    )


def _ops_backend(value, name: str) -> str | None:
    """True -> "auto", False/None -> None (off), a backend name -> itself."""
    if value is True:
        return "auto"
    if value is False or value is None:
        return None
    if isinstance(value, str) and value in VALID_BACKENDS:
        return value
    raise ValueError(f"{name} must be True, False, None or one of {VALID_BACKENDS}, got {value!r}")


def _attention_backend(value) -> str | None:
    if value is None or value is False:
        return None
    if isinstance(value, str) and value in _ATTENTION_NAMES:
        return value
    raise ValueError(f"attention must be None (keep HF's attention) or one of {_ATTENTION_NAMES}, got {value!r}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _check_structure(model: nn.Module, beit: nn.Module) -> None:
    """The instance must have the module layout these patches were written for (transformers >= 5)."""
    problems = []
    emb = getattr(beit, "embeddings", None)
    proj = getattr(getattr(emb, "patch_embeddings", None), "projection", None)
    if not isinstance(proj, nn.Conv2d):
        problems.append("embeddings.patch_embeddings.projection (Conv2d)")
    layers = getattr(beit, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        problems.append("layers (ModuleList of BeitLayer)")
    else:
        for layer in layers:
            attn = getattr(layer, "attention", None)
            if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim",
                                                  "config")):
                problems.append("layers[i].attention.{q,k,v,o}_proj, scaling, head_dim, config")
                break
    if problems:
        import transformers

        raise TypeError(
            f"{type(model).__name__} from transformers {transformers.__version__} does not have the module "
            f"layout apply_beit_fast_to_hf supports (transformers >= 5): missing {', '.join(problems)}"
        )


# --------------------------------------------------------------------------------------------------
# Replacement methods, bound to one instance (interop.patching._PatchedMethod: a functools.partial that is
# picklable, deep-copyable and shows the replaced method's signature)
# --------------------------------------------------------------------------------------------------
# The one HF attention implementation the fused attention stands in for (it computes what HF's SDPA path
# computes and, like it, returns no attention probabilities). Any other choice runs HF's own code.
FUSED_ATTN_REPLACES = "sdpa"


def _wants_hf_attention(self, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """True when HF's own BeitAttention.forward must run instead of the fused one."""
    if getattr(self.config, "_attn_implementation", None) != FUSED_ATTN_REPLACES:
        return True  # "eager", "flex_attention", a registered kernel, or None (HF's eager default)
    # attention maps requested: HF records the probabilities its own attention returns (same rule as HF's
    # capture_outputs: the forward keyword, else the config)
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        return True
    if attention_mask is not None and not attention_mask.is_floating_point():
        return True  # boolean mask: no additive bias to hand over
    return self.training and self.attention_dropout > 0  # the fused op has no dropout


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """BeitAttention.forward through attention_with_bias; returns (output, None) as HF's SDPA path does."""
    if _wants_hf_attention(self, attention_mask, kwargs):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    out = attention_with_bias(q, k, v, attention_mask, scale=self.scaling, backend=self._beit_fast_attention)
    out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), None


def _rel_pos_bias_forward(self, window_size, interpolate_pos_encoding: bool = False, dim_size=None):
    """BeitRelativePositionBias.forward: a plain gather at the model's own window size."""
    if interpolate_pos_encoding or tuple(int(s) for s in window_size) != tuple(self.window_size):
        return type(self).forward(self, window_size, interpolate_pos_encoding, dim_size)
    table = self.relative_position_bias_table
    cache = self._beit_fast_index_cache
    index = cache.get(table.device)
    if index is None:
        index = type(self).generate_relative_position_index(tuple(self.window_size)).to(table.device)
        cache[table.device] = index
    return gather_relative_position_bias(table, index).unsqueeze(0)


def _embeddings_forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None):
    """BeitEmbeddings.forward with the patch projection and the mask-token blend in patch_embed_mask."""
    if bool_masked_pos is not None and (bool_masked_pos.dtype != torch.bool or self.mask_token is None):
        return type(self).forward(self, pixel_values, bool_masked_pos=bool_masked_pos)
    patch = self.patch_embeddings
    num_channels = pixel_values.shape[1]
    if num_channels != patch.num_channels:  # HF's own check and message
        raise ValueError(
            "Make sure that the channel dimension of the pixel values match with the one set in the configuration."
            f" Expected {patch.num_channels} but got {num_channels}."
        )
    _, _, height, width = pixel_values.shape
    proj = patch.projection
    dtype = _compute_dtype(pixel_values)
    weight = proj.weight
    token = self.mask_token if self.mask_token is not None else weight.new_zeros(weight.shape[0])
    embeddings = patch_embed_mask(
        pixel_values.to(dtype), weight.to(dtype), proj.bias.to(dtype) if proj.bias is not None else None,
        token.reshape(-1).to(dtype), bool_masked_pos, backend=self._beit_fast_embed,
    )
    if bool_masked_pos is not None:
        # HF blends with the (fp32) mask token, which promotes the result under autocast: keep its dtype
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, self.mask_token.dtype))
    batch_size = embeddings.shape[0]
    cls_tokens = self.cls_token.expand(batch_size, -1, -1)
    embeddings = torch.cat((cls_tokens, embeddings), dim=1)
    if self.position_embeddings is not None:
        embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
    return self.dropout(embeddings)


def _mim_forward(
    self,
    pixel_values: torch.Tensor | None = None,
    bool_masked_pos: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """BeitForMaskedImageModeling.forward with the masked-only fused loss (``fused_loss``, opt-in; see
    apply_beit_fast_to_hf). HF's parameters; ``return_logits`` (bool) is an extra keyword."""
    from transformers.modeling_outputs import MaskedLMOutput

    return_dict = self.config.return_dict
    passed = kwargs.pop("return_dict", None)
    if passed is not None:
        return_dict = passed
    return_logits = kwargs.pop("return_logits", None)
    if return_logits is None:
        return_logits = self._beit_fast_return_logits
    cls_forward = type(self).forward
    if labels is None or bool_masked_pos is None or bool_masked_pos.dtype != torch.bool:
        # HF's path: logits over all patches (and HF's own loss / errors in the unusual cases)
        return cls_forward(self, pixel_values, bool_masked_pos=bool_masked_pos, labels=labels,
                           interpolate_pos_encoding=interpolate_pos_encoding, attention_mask=attention_mask,
                           return_dict=return_dict, **kwargs)
    outputs = self.beit(pixel_values, bool_masked_pos=bool_masked_pos,
                        interpolate_pos_encoding=interpolate_pos_encoding, attention_mask=attention_mask, **kwargs)
    patches = self.layernorm(outputs.last_hidden_state)[:, 1:]
    if labels.dim() == 2 and labels.shape == bool_masked_pos.shape:
        labels = labels[bool_masked_pos]  # token grid [B, N] -> the masked tokens, row-major
    hidden = patches[bool_masked_pos]  # [M, D], the rows HF's loss reads from its [B, N, V] logits
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must hold one token per masked patch ({hidden.shape[0]} masked, row-major order of "
            f"bool_masked_pos) or be a [B, N] token grid of bool_masked_pos's shape {tuple(bool_masked_pos.shape)}; "
            f"got shape {tuple(labels.shape)}"
        )
    head = self.lm_head
    dtype = _compute_dtype(hidden)
    loss = masked_linear_cross_entropy(
        hidden.to(dtype), head.weight.to(dtype), head.bias.to(dtype) if head.bias is not None else None, labels,
        ignore_index=IGNORE_INDEX, backend=self._beit_fast_loss,
    )
    logits = head(patches) if return_logits else None
    output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                            attentions=outputs.attentions)
    return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def apply_beit_fast_to_hf(
    model: nn.Module,
    attention: str | None = "auto",
    fused_loss: bool | str = False,
    fused_embed: bool | str = True,
    *,
    return_logits: bool = False,
    fast_rel_pos_bias: bool = True,
) -> nn.Module:
    """Patch a transformers ``BeitForMaskedImageModeling``, ``BeitForImageClassification``,
    ``BeitForSemanticSegmentation``, ``BeitBackbone`` or ``BeitModel`` instance in place with beit_fast's
    fused ops; returns the same model. Undo with ``revert_beit_fast``.

    Each part is switched on its own (the module docstring says what each replaces and when HF's own code
    still runs); the defaults are the parts that keep HF's output contract exactly:

    Args:
        attention: an ``attention_with_bias`` backend ("auto", "math", "sdpa", ...), or None/False to keep
            HF's attention. Default "auto". Replaces HF's SDPA attention only (``config._attn_implementation
            == "sdpa"``, HF's default); with attention maps requested HF's attention runs.
        fused_loss: (masked image modeling only; ignored for the other models) False (default) keeps HF's
            forward and loss. True/"auto", "reference", "triton": the masked-only fused loss (the
            ``masked_linear_cross_entropy`` backend), an explicit opt-in that changes the output (below).
        fused_embed: True/"auto" (default), "reference", "triton": the ``patch_embed_mask`` backend; False
            keeps HF's embedding.
        return_logits: with ``fused_loss``: default for the forward's ``return_logits`` keyword (below).
        fast_rel_pos_bias: replace ``BeitRelativePositionBias.forward`` by the cached-index gather at the
            model's own window size (identical values). Default True.

    With ``fused_loss`` the patched ``BeitForMaskedImageModeling.forward(pixel_values, bool_masked_pos,
    labels=None, ..., return_logits=None)`` returns, when ``labels`` are given and ``bool_masked_pos`` is a
    bool tensor: ``MaskedLMOutput(loss, logits, hidden_states, attentions)`` where

    * ``loss``: fp32 mean cross-entropy of ``lm_head(layernorm(h)[:, 1:][bool_masked_pos])`` against
      ``labels``, the masked patches' tokens in row-major order (shape [M], as HF expects; a [B, N] token
      grid of ``bool_masked_pos``'s shape is also accepted); labels of -100 are ignored. Equal to HF's
      ``CrossEntropyLoss()(logits[bool_masked_pos], labels)`` except that with no counted label it is 0.0
      with zero gradients (HF: NaN). Under autocast the head GEMM runs in the autocast dtype and the loss
      in fp32, as HF's.
    * ``logits``: ``None`` unless ``return_logits`` (keyword, else the ``apply`` default) is true; then HF's
      ``[B, N, vocab]`` logits, computed in addition (they are not used for the loss).
    * ``hidden_states`` / ``attentions``: as HF.

    With ``return_dict=False`` (keyword or config) the tuple is ``output.to_tuple()``, which skips Nones:
    ``(loss,)`` without logits. Without ``labels`` (or with a non-bool mask) HF's own forward runs, with the
    fused attention/embedding underneath: full logits, no loss. Without ``fused_loss`` (the default) the
    model returns exactly what HF returns: loss and logits, HF's tuples, NaN when every label is ignored.

    Raises:
        TypeError: ``model`` is not one of the supported classes (the message names its type), or has a
            module layout other than transformers >= 5's.
        ValueError: an unknown backend name.
    """
    classes = _hf_classes()
    if not classes or not isinstance(model, tuple(classes.values())):
        raise _unsupported(model)
    attn_backend = _attention_backend(attention)
    embed_backend = _ops_backend(fused_embed, "fused_embed")
    loss_backend = _ops_backend(fused_loss, "fused_loss")
    is_mim = isinstance(model, classes["BeitForMaskedImageModeling"])
    beit = model if isinstance(model, classes["BeitModel"]) else model.beit
    _check_structure(model, beit)

    options: dict[str, Any] = {
        "attention": attn_backend, "fused_embed": embed_backend,
        "fused_loss": loss_backend if is_mim else None, "return_logits": bool(return_logits),
        "fast_rel_pos_bias": bool(fast_rel_pos_bias),
    }
    state = _begin_patch(model, "transformers", options)
    prefix = "" if beit is model else "beit."

    if attn_backend is not None:
        _patch_attention(state, beit, prefix, attn_backend)
    if fast_rel_pos_bias:
        _patch_rel_pos_biases(state, beit, prefix)
    if embed_backend is not None:
        _patch_embeddings(state, beit, prefix, embed_backend)
    if is_mim and loss_backend is not None:
        _patch_mim_loss(state, model, loss_backend, return_logits)
    return model


# The parts of ``apply_beit_fast_to_hf``: each sets its instance attributes through the patch state (so that
# ``revert_beit_fast`` undoes them); ``prefix`` is the BeitModel's path in the model ("" or "beit.").
def _patch_attention(state, beit: nn.Module, prefix: str, attn_backend: str) -> None:
    for i, layer in enumerate(beit.layers):
        attn = layer.attention
        state.set(attn, "_beit_fast_attention", attn_backend)
        state.set_method(attn, _attention_forward, "BeitAttention.forward -> attention_with_bias",
                         f"{prefix}layers.{i}.attention")


def _patch_rel_pos_biases(state, beit: nn.Module, prefix: str) -> None:
    biases = []
    if beit.shared_position_bias is not None:
        biases.append((f"{prefix}shared_position_bias", beit.shared_position_bias))
    for i, layer in enumerate(beit.layers):
        if getattr(layer, "relative_position_bias", None) is not None:
            biases.append((f"{prefix}layers.{i}.relative_position_bias", layer.relative_position_bias))
    for path, module in biases:
        state.set(module, "_beit_fast_index_cache", {})
        state.set_method(module, _rel_pos_bias_forward,
                         "BeitRelativePositionBias.forward -> cached-index gather", path)


def _patch_embeddings(state, beit: nn.Module, prefix: str, embed_backend: str) -> None:
    emb = beit.embeddings
    state.set(emb, "_beit_fast_embed", embed_backend)
    state.set_method(emb, _embeddings_forward, "BeitEmbeddings.forward -> patch_embed_mask",
                     f"{prefix}embeddings")


def _patch_mim_loss(state, model: nn.Module, loss_backend: str, return_logits: bool) -> None:
    state.set(model, "_beit_fast_loss", loss_backend)
    state.set(model, "_beit_fast_return_logits", bool(return_logits))
    state.set_method(model, _mim_forward,
                     "BeitForMaskedImageModeling.forward -> masked-only masked_linear_cross_entropy", "")
