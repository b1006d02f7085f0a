"""Blockwise masking (BEiT, Algorithm 1).

The official generator draws rectangular blocks of at least ``min_num_patches`` patches with a
log-uniform aspect ratio until about ``num_masking_patches`` patches are masked. It never exceeds the
target but sometimes stops short of it (mean about 74.5 of 75 on a 14x14 grid). Compiled training code
wants the same number of masked patches in every image; ``fixed_count=True`` tops each mask up to
exactly the target with patches adjacent to the masked region, so the blocks stay blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MaskingConfig", "MaskingGenerator"]


@dataclass
class MaskingConfig:
    """Settings of :class:`MaskingGenerator`; defaults are the official BEiT pretraining ones."""

    input_size: tuple[int, int] = (14, 14)
    num_masking_patches: int = 75
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    fixed_count: bool = False


class MaskingGenerator:
    """Blockwise mask generator.

    ``gen(rng)`` returns a ``bool`` numpy array of shape ``input_size`` (rows, cols). All randomness comes
    from the ``numpy.random.Generator`` passed in, so a mask is a pure function of that generator's state.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        fixed_count: bool = False,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask grid must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        if num_masking_patches < 0:
            raise ValueError(f"num_masking_patches must be >= 0, got {num_masking_patches}")
        if num_masking_patches > self.num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} is larger than the {self.height}x{self.width} "
                f"grid ({self.num_patches} patches)"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.fixed_count = bool(fixed_count)

    @classmethod
    def from_config(cls, cfg: MaskingConfig) -> "MaskingGenerator":
        return cls(
            cfg.input_size, cfg.num_masking_patches, cfg.min_num_patches, cfg.max_num_patches,
            cfg.min_aspect, cfg.max_aspect, cfg.fixed_count,
        )

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(grid={self.height}x{self.width}, target={self.num_masking_patches}, "
            f"min_block={self.min_num_patches}, max_block={self.max_num_patches}, "
            f"log_aspect=({self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}), "
            f"fixed_count={self.fixed_count})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    @staticmethod
    def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
        # Python's random.uniform(a, b) formula: also defined when b < a (few patches left to mask).
        return a + (b - a) * rng.random()

    def _try_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        delta = 0
        for _ in range(10):
            target_area = self._uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self._uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                box = mask[top: top + h, left: left + w]
                newly = h * w - int(box.sum())
                if 0 < newly <= max_mask_patches:
                    box[...] = True
                    delta += newly
            if delta > 0:
                break
        return delta

    def _top_up(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        """Mask ``missing`` more patches, each next to the masked region where possible."""
        for _ in range(missing):
            free = ~mask
            border = np.zeros_like(mask)
            border[1:, :] |= mask[:-1, :]
            border[:-1, :] |= mask[1:, :]
            border[:, 1:] |= mask[:, :-1]
            border[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(border & free)
            if candidates.size == 0:
                candidates = np.flatnonzero(free)
            mask.flat[int(rng.choice(candidates))] = True

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """Return a new mask, ``bool[height, width]``; ``rng`` defaults to a fresh unseeded generator."""
        if rng is None:
            rng = np.random.default_rng()
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._try_block(mask, max_mask_patches, rng)
            if delta == 0:
                break
            count += delta
        if self.fixed_count and count < self.num_masking_patches:
            self._top_up(mask, self.num_masking_patches - count, rng)
        return mask

    gen = __call__
