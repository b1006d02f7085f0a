"""mIoU, mAcc and aAcc exactly as mmseg's ``mean_iou`` / ``eval_metrics`` compute them (mmseg 0.x
``mmseg/core/evaluation/metrics.py``, which the official BEiT results come from).

Per image: with ``reduce_zero_label`` the label 0 becomes 255 and every other label ``l`` becomes ``l - 1``;
pixels labelled ``ignore_index`` (255) are dropped; ``intersect`` = pixels where prediction == label, counted
per class, ``area_pred`` / ``area_label`` per class, ``union = pred + label - intersect``. The areas are
summed over the whole data set first, then: ``aAcc = sum(intersect) / sum(label)``,
``IoU_c = intersect_c / union_c``, ``Acc_c = intersect_c / label_c``, ``mIoU`` / ``mAcc`` = the mean over
classes with a defined value (NaN-mean: a class absent from labels and predictions has no IoU; one absent from
the labels but predicted has IoU 0 and no Acc).
"""
from __future__ import annotations

import math

import torch

__all__ = ["intersect_and_union", "SegmentationMetric"]


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255,
                        reduce_zero_label: bool = False) -> tuple[torch.Tensor, ...]:
    """``(area_intersect, area_union, area_pred, area_label)``, each int64 ``[num_classes]``, of one
    prediction (int ``[H, W]`` or any shape) against its label (same shape)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    label = label.long()
    pred = pred.long()
    if reduce_zero_label:
        label = torch.where(label == 0, 255, label - 1)
        label = torch.where(label == 254, 255, label)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    bad = label[(label < 0) | (label >= num_classes)]
    if bad.numel():
        raise ValueError(f"label value {int(bad[0])} is outside 0..{num_classes - 1} and not {ignore_index}")
    area_inter = torch.bincount(label[pred == label], minlength=num_classes)[:num_classes]
    in_range = (pred >= 0) & (pred < num_classes)  # mmseg's histc(min=0, max=C-1) drops other values
    area_pred = torch.bincount(pred[in_range], minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return area_inter, area_pred + area_label - area_inter, area_pred, area_label


class SegmentationMetric:
    """Accumulates the areas over a data set; :meth:`compute` gives ``{"aAcc", "mIoU", "mAcc", "IoU",
    "Acc"}`` (fractions in [0, 1]; ``IoU`` / ``Acc`` per class, NaN where undefined)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        self.num_classes, self.ignore_index, self.reduce_zero_label = int(num_classes), ignore_index, reduce_zero_label
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """One image (``[H, W]``) or a batch (``[B, H, W]``) of predicted class ids and labels."""
        areas = intersect_and_union(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index,
                                    self.reduce_zero_label)
        self.areas += torch.stack(areas).double()

    def compute(self) -> dict:
        inter, union, _, label = self.areas
        total = float(label.sum())
        iou = inter / union  # 0/0 -> NaN (absent class), as numpy in mmseg
        acc = inter / label
        return {"aAcc": float(inter.sum()) / total if total else math.nan,
                "mIoU": float(torch.nanmean(iou)), "mAcc": float(torch.nanmean(acc)),
                "IoU": iou.tolist(), "Acc": acc.tolist()}
