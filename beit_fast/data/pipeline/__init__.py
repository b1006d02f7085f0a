"""The device input pipeline (``--data_pipeline gpu``): workers read file bytes, the device decodes,
jitters, flips and resizes, reproducing the PIL pipeline (:mod:`beit_fast.data.transforms`) pixel for pixel
where the decoder is libjpeg-turbo (CPU tensors) and within nvJPEG's decoding differences on a GPU.

* :mod:`~beit_fast.data.pipeline.ops`: Pillow-exact colour jitter and resampling on ``uint8`` tensor batches.
* :mod:`~beit_fast.data.pipeline.encoded`: the worker side (bytes, sizes, the sample's draws and mask).
* :mod:`~beit_fast.data.pipeline.render`: decode + render a batch on the device.
* :mod:`~beit_fast.data.pipeline.device`: the prefetching loader around it.
"""
from .device import (
    DATA_PIPELINES, DevicePretrainLoader, DeviceTwoViewTransform, LoaderStats, build_device_pretrain_loader,
    build_loader_for, device_pipeline_problems,
)
from .encoded import EncodedBatch, EncodedPretrainDataset, EncodedSample, collate_encoded, read_encoded
from .ops import color_jitter, resample_weights, resize_crops, vertical_pass_first

__all__ = [
    "DATA_PIPELINES", "DevicePretrainLoader", "DeviceTwoViewTransform", "LoaderStats", "build_device_pretrain_loader",
    "build_loader_for", "device_pipeline_problems", "EncodedBatch", "EncodedPretrainDataset", "EncodedSample", "collate_encoded",
    "read_encoded", "color_jitter", "resample_weights", "resize_crops", "vertical_pass_first",
]
