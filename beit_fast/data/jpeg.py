"""JPEG decoding with Pillow's pixels, faster: :func:`decode_like_pillow` and the ``jpeg_decoder`` setting.

``jpeg_decoder`` (``--jpeg_decoder``): ``"simplejpeg"`` decodes baseline / progressive JPEGs in YCbCr
(4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1) or greyscale with simplejpeg (libjpeg-turbo's TurboJPEG API: the decode
alone about 1.5x faster than Pillow's, a whole sample a few percent: see the README), which gives exactly
Pillow's ``decode + convert("RGB")`` pixels for them (tests check each kind bit for bit); every other file
(CMYK/YCCK, Adobe-marked, arithmetic-coded, lossless, not JPEG, ...) and every file simplejpeg reports any
problem with (truncated, corrupt data it would patch over) is decoded by Pillow exactly as with ``"pil"``,
so bad files fail, and are skipped, as before.
``"auto"`` (the default) is ``"simplejpeg"`` where the package is installed, else ``"pil"``.
"""
from __future__ import annotations

import functools
from typing import BinaryIO

from PIL import Image

from ..utils.options import JPEG_DECODERS

__all__ = ["resolve_jpeg_decoder", "decode_like_pillow"]


@functools.lru_cache(maxsize=1)
def _simplejpeg():
    """The simplejpeg module, or None where it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def resolve_jpeg_decoder(jpeg_decoder: str) -> str:
    """``"pil"`` or ``"simplejpeg"`` for a ``jpeg_decoder`` setting (``"auto"``: simplejpeg where installed).
    ValueError for an unknown name, or for ``"simplejpeg"`` where it is not installed."""
    if jpeg_decoder not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {jpeg_decoder!r} "
                         "(CLI: --jpeg_decoder)")
    if jpeg_decoder == "pil" or (jpeg_decoder == "auto" and _simplejpeg() is None):
        return "pil"
    if _simplejpeg() is None:
        raise ValueError("jpeg_decoder 'simplejpeg' needs the simplejpeg package (pip install simplejpeg); "
                         "'auto' or 'pil' decodes with Pillow (CLI: --jpeg_decoder)")
    return "simplejpeg"


#: Start-of-frame markers simplejpeg decodes here: baseline, extended sequential and progressive, Huffman-coded.
_SIMPLEJPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: (colour space, chroma subsampling) as ``simplejpeg.decode_jpeg_header`` names them, for which simplejpeg's
#: RGB equals Pillow's ``decode + convert("RGB")`` bit for bit (tests/test_jpeg_decode.py checks each one).
_SIMPLEJPEG_SAME_PIXELS = frozenset({("Gray", "Gray"), ("YCbCr", "444"), ("YCbCr", "422"), ("YCbCr", "420"),
                                     ("YCbCr", "440"), ("YCbCr", "411")})


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The start-of-frame marker's second byte (0xC0 baseline, 0xC2 progressive, ...) of JPEG ``data``; None
    when the segments before the first scan hold none or do not parse."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            return marker
        elif marker == 0xDA:  # start of scan: no frame header before it
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2: pos + 4], "big")
    return None


def decode_like_pillow(im: Image.Image, f: BinaryIO) -> Image.Image | None:
    """Pillow's RGB pixels of the opened (not yet decoded) JPEG ``im`` read from ``f``, decoded by simplejpeg;
    None when the file is not one of the kinds where that is bit-identical, or simplejpeg reports any problem
    (``strict``: it would patch over truncated or corrupt data): the caller then lets Pillow decide."""
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or "adobe" in im.info:
        return None  # not JPEG, MPO, CMYK/YCCK, Adobe colour transform: Pillow's conversions
    f.seek(0)
    data = f.read()
    if _jpeg_frame_marker(data) not in _SIMPLEJPEG_FRAMES:
        return None  # arithmetic-coded, lossless, hierarchical, or a frame header this parser cannot find
    simplejpeg = _simplejpeg()
    try:
        height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
        if ((colorspace, subsampling) not in _SIMPLEJPEG_SAME_PIXELS or (width, height) != im.size
                or (colorspace == "Gray") != (im.mode == "L")):
            return None
        # RGBX: Pillow keeps RGB pixels in 4 bytes, so this is a plain copy into the image (RGB would be unpacked)
        arr = simplejpeg.decode_jpeg(data, colorspace="RGBX", strict=True)
    except Exception:  # noqa: BLE001 - any libjpeg error or warning (ValueError), or anything else: Pillow decides
        return None
    if arr.shape != (height, width, 4):
        return None
    return Image.frombytes("RGB", (width, height), arr, "raw", "RGBX")
