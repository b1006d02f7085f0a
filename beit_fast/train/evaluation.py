"""Evaluation of a classifier: top-1 / top-5 accuracy and cross-entropy on a data set (eval mode, no
augmentation); what fine-tuning runs at its epoch ends and ``--eval`` runs alone."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..utils.logs import bar_disable
from ..utils.amp import autocast_or_null

__all__ = ["evaluate", "accuracy", "topk_hits"]


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Correct predictions for each k (k capped at the number of classes): int64 ``[len(topk)]`` on the
    logits' device (no host read)."""
    maxk = min(max(topk), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred == labels[:, None]
    return torch.stack([hit[:, : min(k, maxk)].any(dim=-1).sum() for k in topk])


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[int]:
    """Correct predictions (counts, not rates) for each k, k capped at the number of classes."""
    return [int(v) for v in topk_hits(logits, labels, topk).tolist()]


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, *, batch_size: int = 128, device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None, num_workers: int = 0, progress: bool = False,
) -> dict:
    """``{"top1", "top5", "loss", "n"}`` of ``model`` on ``dataset`` (accuracies as fractions in [0, 1]; top-5 is top-k
    with k = min(5, classes); loss = plain cross-entropy). Eval mode; the mode is restored after."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    n, hits, loss_sum = 0, torch.zeros(2, dtype=torch.int64, device=device), torch.zeros((), device=device,
                                                                                   dtype=torch.float64)
    try:
        for images, labels in tqdm(loader, desc="eval", disable=bar_disable(progress), leave=False, dynamic_ncols=True):
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            with autocast_or_null(device.type, amp_dtype):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")  # summed on the device: read once
            hits += topk_hits(logits, labels, (1, 5))
            n += labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation data set is empty")
    c1, c5 = hits.tolist()
    return {"top1": c1 / n, "top5": c5 / n, "loss": float(loss_sum) / n, "n": n}
