"""Data: image folders, samples, JPEG decoding, masking, transforms and the GPU input pipeline."""
