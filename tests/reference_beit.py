"""An independent plain-PyTorch BEiT forward for the model-level parity tests.

Written from the method (/work/shared/BEIT_SPEC.md sections 4 and 6), it shares nothing with beit_fast but
the weights: it reads a state dict with the official key names and does its own projections (q, k and v as
three separate matmuls, k without bias), its own scale, its own relative position index and gather, its own
LayerScale and its own masked head (gather the masked positions, then the head). A bug planted in the model,
the fused ops or the kernels cannot also be in here.

``perturb_`` gives a model weights under which every part matters: attention clearly non-uniform (q.k logits
of order one), LayerScale away from its constant init, a non-zero mask token and bias tables, head logits of
order one, so that a wrong scale, a dropped bias or a skipped mask token changes the loss and the gradients
by far more than fp32 rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with O(1)-effect values (by role, from a fixed seed); returns the model."""
    g = torch.Generator().manual_seed(seed)

    def draw(p, std, mean=0.0):
        return mean + std * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and "relative_position_bias_table" not in name and leaf not in ("cls_token", "mask_token",
                                                                                            "pos_embed"):
                fan_in = p[0].numel()
                gain = 1.0  # q.k * scale of std about one after LayerNorm: clearly non-uniform attention
                p.copy_(draw(p, gain / math.sqrt(fan_in)))
            elif "relative_position_bias_table" in name:
                p.copy_(draw(p, 0.5))
            elif leaf in ("cls_token", "mask_token", "pos_embed"):
                p.copy_(draw(p, 1.0))
            elif leaf in ("gamma_1", "gamma_2"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g).to(p.device, p.dtype))
            elif leaf == "weight":  # LayerNorm
                p.copy_(draw(p, 0.2, 1.0))
            else:  # biases, q_bias, v_bias
                p.copy_(draw(p, 0.2))
    return model


def leaf_params(model: torch.nn.Module) -> Params:
    """The model's parameters as fresh leaf tensors (same names, same values) that collect gradients."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def grads_of(params: Params) -> Params:
    return {n: p.grad for n, p in params.items() if p.grad is not None}


def rel_index(gh: int, gw: int) -> torch.Tensor:
    """``int64[N+1, N+1]``: patch (hi, wi) to patch (hj, wj) at row (hi-hj+gh-1)*(2gw-1) + (wi-wj+gw-1) of the
    table; [CLS] query -> any key: R, any query -> [CLS] key: R+1, [CLS] -> [CLS]: R+2, R = (2gh-1)(2gw-1)."""
    n = gh * gw
    r = (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            index[1 + i, 1 + j] = (i // gw - j // gw + gh - 1) * (2 * gw - 1) + (i % gw - j % gw + gw - 1)
    index[0, :] = r
    index[:, 0] = r + 1
    index[0, 0] = r + 2
    return index


def _attention(p: Params, pre: str, x: torch.Tensor, heads: int, shared_bias: torch.Tensor | None,
               index: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    hd = d // heads
    wq, wk, wv = p[pre + "qkv.weight"].split(d, dim=0)
    q = x @ wq.t() + p[pre + "q_bias"]
    k = x @ wk.t()
    v = x @ wv.t() + p[pre + "v_bias"]
    q, k, v = (t.view(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hd)
    if shared_bias is not None:
        logits = logits + shared_bias
    own = p.get(pre + "relative_position_bias_table")
    if own is not None:
        logits = logits + own[index].permute(2, 0, 1)
    out = torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)
    return out.transpose(1, 2).reshape(b, n, d) @ p[pre + "proj.weight"].t() + p[pre + "proj.bias"]


def _ln(p: Params, pre: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[pre + "weight"], p[pre + "bias"], eps)


def trunk(p: Params, images: torch.Tensor, heads: int, patch: int, mask: torch.Tensor | None = None,
          eps: float = 1e-6) -> torch.Tensor:
    """Tokens after the last block, before any final norm: ``[B, N+1, D]``. ``mask [B, N]`` bool (pretraining)
    puts the mask token at the masked patches before the [CLS] concat."""
    b = images.shape[0]
    gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
    w = p["patch_embed.proj.weight"]
    d = w.shape[0]
    # the patch embedding as a matmul over unfolded patches (not a convolution)
    cols = F.unfold(images, patch, stride=patch)  # [B, 3*P*P, N]
    x = (w.reshape(d, -1) @ cols).transpose(1, 2) + p["patch_embed.proj.bias"]
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), p["mask_token"].reshape(1, 1, d).to(x.dtype), x)
    x = torch.cat((p["cls_token"].reshape(1, 1, d).expand(b, 1, d), x), dim=1)
    if "pos_embed" in p:
        x = x + p["pos_embed"]
    index = rel_index(gh, gw).to(images.device)
    shared = p.get("rel_pos_bias.relative_position_bias_table")
    shared_bias = shared[index].permute(2, 0, 1) if shared is not None else None
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        a = _attention(p, pre + "attn.", _ln(p, pre + "norm1.", x, eps), heads, shared_bias, index)
        x = x + (p[pre + "gamma_1"] * a if pre + "gamma_1" in p else a)
        h = _ln(p, pre + "norm2.", x, eps)
        h = F.gelu(h @ p[pre + "mlp.fc1.weight"].t() + p[pre + "mlp.fc1.bias"])
        m = h @ p[pre + "mlp.fc2.weight"].t() + p[pre + "mlp.fc2.bias"]
        x = x + (p[pre + "gamma_2"] * m if pre + "gamma_2" in p else m)
    return x


def mim_loss(p: Params, images: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, heads: int, patch: int,
             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining loss and MIM accuracy: final norm, drop [CLS], gather the masked positions, THEN the head;
    mean cross-entropy over all masked positions of the batch."""
    x = _ln(p, "norm.", trunk(p, images, heads, patch, mask, eps), eps)[:, 1:]
    logits = x[mask] @ p["lm_head.weight"].t() + p["lm_head.bias"]
    labels = tokens[mask]
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def classifier_logits(p: Params, images: torch.Tensor, heads: int, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Fine-tuning classifier: fc_norm(mean of the patch tokens) with mean pooling (``fc_norm.*`` present),
    else norm(x)[:, 0]; then the head."""
    x = trunk(p, images, heads, patch, None, eps)
    pooled = _ln(p, "fc_norm.", x[:, 1:].mean(1), eps) if "fc_norm.weight" in p else _ln(p, "norm.", x, eps)[:, 0]
    return pooled @ p["head.weight"].t() + p["head.bias"]
