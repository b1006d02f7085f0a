"""The embedded default data set: real photographs bundled inside scikit-image.

``python -m beit_fast.pretrain`` with no data path trains on these. Only images whose files ship inside the
installed ``skimage/data`` folder are used; they are read straight from that folder with Pillow, so loading
them never touches the network (several ``skimage.data`` functions fetch their files with pooch; none of
those is used here). Photographs of scikit-image 0.26 (width x height, Pillow mode of the file):

=====================  ========================  ==========  ===============================================
name                   file                      size        content
=====================  ========================  ==========  ===============================================
astronaut              astronaut.png             512x512     RGB, astronaut Eileen Collins (NASA)
camera                 camera.png                512x512     L, man with a camera on a tripod
chelsea                chelsea.png               451x300     RGB, Chelsea the cat
coffee                 coffee.png                600x400     RGB, cup of coffee
coins                  coins.png                 384x303     L, Greek coins
hubble_deep_field      hubble_deep_field.jpg     1000x872    RGB, Hubble eXtreme Deep Field (NASA)
immunohistochemistry   ihc.png                   512x512     RGB, immunohistochemistry stained tissue
motorcycle             motorcycle_left.png       741x500     RGB, motorcycle (Middlebury stereo, left view)
retina                 retina.jpg                1411x1411   RGB, human retina fundus photograph
rocket                 rocket.jpg                640x427     RGB, SpaceX Falcon 9 on the launch pad
moon                   moon.png                  512x512     L, surface of the moon
brick                  brick.png                 512x512     L, brick wall texture photograph
grass                  grass.png                 512x512     L, grass texture photograph
gravel                 gravel.png                512x512     L, gravel texture photograph
cell                   cell.png                  550x660     L, cell, light microscopy
clock                  clock_motion.png          400x300     L, wall clock (motion blurred)
=====================  ========================  ==========  ===============================================

Synthetic images (checkerboards, phantom, logo, horse silhouette, colour wheel), scanned text (page, text),
the tiny microaneurysms crop and the near-duplicate right motorcycle view are left out; the colour wheel
(``colorwheel``, color.png, 371x370) can be asked for by name (``EXTRA_IMAGES``). Greyscale photographs
are replicated to three channels. Photographs that a given install lacks are skipped with a warning; with
none at all a ``RuntimeError`` is raised.

``SampleImages(num_samples)`` is a ``Dataset`` whose item ``i`` is photograph ``i % n_photos``; the variety
comes from the two-view transform's random crops (scale 0.08..1, so many distinct crops per photograph).
Both ``sample_photographs`` and ``SampleImages`` can keep a subset of the photographs (``names=``, e.g. the
tokenizer CLI holds out ``coffee`` and ``clock`` for evaluation) and cap their size (``max_side=``).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Iterable

from PIL import Image
from torch.utils.data import Dataset

from .image_folder import ImageFolderDataset

__all__ = ["PHOTOGRAPHS", "EXTRA_IMAGES", "SampleImages", "sample_photographs", "skimage_data_dir"]

#: (name, file inside skimage/data) in the order used by ``SampleImages``.
PHOTOGRAPHS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("camera", "camera.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
    ("moon", "moon.png"),
    ("brick", "brick.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("cell", "cell.png"),
    ("clock", "clock_motion.png"),
)

#: Synthetic images used only when named (``names=``). The colour wheel (every hue at full saturation)
#: balances the tokenizer CLI's training set, half of whose photographs are greyscale: without it the tiny
#: dVAE sometimes ends up with no saturated colour among its codes.
EXTRA_IMAGES: tuple[tuple[str, str], ...] = (("colorwheel", "color.png"),)


def skimage_data_dir() -> str:
    """The ``data`` folder inside the installed scikit-image package (no download cache involved)."""
    import skimage.data  # local import: scikit-image is only needed for the sample data

    return os.path.dirname(os.path.abspath(skimage.data.__file__))


@functools.lru_cache(maxsize=None)
def _load_photographs(table: tuple[tuple[str, str], ...] = PHOTOGRAPHS) -> tuple[tuple[str, Image.Image], ...]:
    root = skimage_data_dir()
    loaded = []
    missing = []
    for name, fname in table:
        path = os.path.join(root, fname)
        if not os.path.isfile(path):
            missing.append(fname)
            continue
        try:
            img = ImageFolderDataset.load_image(path)
        except Exception as e:  # a broken install: keep going with what is there
            missing.append(f"{fname} ({type(e).__name__}: {e})")
            continue
        loaded.append((name, img))
    if missing:
        warnings.warn(
            f"beit_fast.data.samples: {len(missing)} bundled scikit-image photograph(s) unavailable in {root}: "
            + ", ".join(missing),
            RuntimeWarning,
            stacklevel=3,
        )
    return tuple(loaded)


def sample_photographs(
    with_names: bool = False, names: Iterable[str] | None = None, max_side: int | None = None
) -> list:
    """The bundled photographs as RGB PIL images (loaded once per process, then cached).

    With ``with_names=True`` returns ``[(name, image), ...]``. ``names`` keeps only those images, in
    ``PHOTOGRAPHS`` then ``EXTRA_IMAGES`` order (an unknown name raises ``ValueError``; one this install
    lacks is skipped with the loader's warning; none left at all raises ``RuntimeError``). ``max_side``
    shrinks larger images (Lanczos, aspect ratio kept) so that neither side exceeds it, e.g. the 1411x1411
    retina: random crops of it then need far less resampling work. The unshrunk images are shared by all
    callers: do not modify them in place (the transforms never do).
    """
    photos = _load_photographs()
    if names is not None:
        wanted = set(names)
        known = [name for name, _ in PHOTOGRAPHS + EXTRA_IMAGES]
        if wanted - set(known):
            raise ValueError(f"unknown sample photograph(s) {sorted(wanted - set(known))}; known: {known}")
        extras = tuple(entry for entry in EXTRA_IMAGES if entry[0] in wanted)
        photos = tuple((name, img) for name, img in photos + _load_photographs(extras) if name in wanted)
    if not photos:
        which = "photograph" if names is None else f"image of {sorted(wanted)}"
        raise RuntimeError(f"no scikit-image sample {which} could be read from {skimage_data_dir()}; "
                           "pass a data folder instead")
    if max_side is not None:
        photos = tuple((name, _shrink(img, max_side)) for name, img in photos)
    if with_names:
        return list(photos)
    return [img for _, img in photos]


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if max(img.size) <= max_side:
        return img
    small = img.copy()
    small.thumbnail((max_side, max_side), Image.LANCZOS)
    return small


class SampleImages(Dataset):
    """``num_samples`` items; item ``i`` is photograph ``i % n_photos`` (an RGB PIL image).

    ``names`` / ``max_side``: a subset of the photographs / a size cap (see :func:`sample_photographs`).
    """

    def __init__(self, num_samples: int = 2048, names: Iterable[str] | None = None,
                 max_side: int | None = None) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        named = sample_photographs(with_names=True, names=names, max_side=max_side)
        self.photos = [img for _, img in named]
        self.names = [name for name, _ in named]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Image.Image:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return self.photos[index % self.num_samples % len(self.photos)]

    def __repr__(self) -> str:
        return f"SampleImages(num_samples={self.num_samples}, photographs={len(self.photos)}: {', '.join(self.names)})"
