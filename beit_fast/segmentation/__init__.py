"""Semantic segmentation with BEiT (UperNet, the official mmseg recipe) on the project's engine.

Modules: :mod:`.model` (backbone + neck + UperNet + FCN heads, the loss), :mod:`.keys` (official mmseg and
HuggingFace ``BeitForSemanticSegmentation`` state-dict layouts), :mod:`.data` (ADE20K and image/mask folder
pairs, the official training pipeline), :mod:`.metrics` (mIoU / mAcc / aAcc as mmseg computes them),
:mod:`.inference` (whole-image, sliding window, flip, multi-scale), :mod:`.recipe` (training on
:class:`beit_fast.train.engine.Engine` and :class:`beit_fast.train.loop.TrainLoop`), :mod:`.demo`.
The command line is ``python -m beit_fast.segment``.
"""
from .model import (
    SEG_IGNORE_INDEX, BeitForSegmentation, BeitSegmentationBackbone, SegmentationHeadConfig, SegmentationLoss,
    build_segmentation_loss, build_segmenter, default_out_indices, segmentation_loss,
)

__all__ = ["SEG_IGNORE_INDEX", "BeitForSegmentation", "BeitSegmentationBackbone", "SegmentationHeadConfig",
           "SegmentationLoss", "build_segmentation_loss", "build_segmenter", "default_out_indices", "segmentation_loss"]
