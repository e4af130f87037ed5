"""Block-wise (BEiT-style) patch mask generator used for the iBOT masked-token objective."""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    """Masks about `n` patches of an [h, w] grid as a union of random rectangles (Bao et al. 2021, BEiT).

    Each rectangle has an area in [min_num_patches, remaining budget] and a log-uniform aspect ratio in
    [min_aspect, max_aspect]; it is kept only if it adds between 1 and the remaining budget of new patches.
    Draws come from `rng` (default: Python's global `random`, as the official generator, so seeded runs give
    the same masks). `max_num_patches` defaults to `num_masking_patches`, or the whole grid when that is None.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: int | float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = self.num_patches if num_masking_patches is None else num_masking_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.rng = rng if rng is not None else random

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, patches per block {self.min_num_patches}.."
            f"{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f}.."
            f"{self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, budget: float) -> int:
        """Try up to 10 rectangles; paint the first adding 1..budget new patches; return how many it added."""
        for _ in range(10):
            area = self.rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:
                continue
            top = self.rng.randint(0, self.height - h)
            left = self.rng.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """A bool [h, w] mask with at most `num_masking_patches` True (fewer only if no block fits)."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches))
            if added == 0:
                break
            count += added
        return mask
