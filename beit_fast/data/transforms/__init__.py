"""Image transforms of the data stage.

* :mod:`.two_view` - pretraining: the BEiT two-view transform (patch view + tokenizer view of one crop box),
  its tokenizer-view-only variant, RGB conversion, DALL-E's pixel mapping.
* :mod:`.classification` - fine-tuning and linear probing: the official train / eval transforms and
  mixup / cutmix soft targets (torchvision ``transforms.v2``).
"""
from .classification import (
    IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, build_mixup, build_transforms, parse_randaug,
)
from .two_view import *  # noqa: F401,F403 (its __all__)
from .two_view import BRIGHTNESS, CONTRAST, HUE, SATURATION, __all__ as _two_view_all

__all__ = [*_two_view_all, "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "build_transforms", "build_mixup",
           "parse_randaug", "INCEPTION_MEAN", "INCEPTION_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
