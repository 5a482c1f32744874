"""Patch-mask generators for masked image modeling.

Generators are plain, picklable objects called once per sample (inside a dataset's ``__getitem__``)
with a :class:`numpy.random.Generator`, so that masks are reproducible per worker seed and never touch
Python's global RNG. They return a boolean array of shape ``(gh, gw)`` where ``True`` marks a masked patch.
"""

from __future__ import annotations

import math

import numpy as np

from cmim.core.choices import Choice

__all__ = ["BlockMaskGenerator", "MaskKind", "RandomGridMaskGenerator", "build_mask_generator"]


class MaskKind(Choice):
    """``mask.kind``: "block" (BEiT's block-wise masking) | "random" (random cells of a coarse grid)."""

    block = "block"
    random = "random"

_MAX_ATTEMPTS_PER_BLOCK = 10


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2:
        raise ValueError(f"grid must be (height, width) in patches, got {grid!r}")
    gh, gw = int(grid[0]), int(grid[1])
    if gh != grid[0] or gw != grid[1] or gh < 1 or gw < 1:
        raise ValueError(f"grid must hold two positive integers, got {grid!r}")
    return gh, gw


class BlockMaskGenerator:
    """Block-wise masking as in BEiT: masks are unions of random rectangles.

    Rectangles are drawn one after another with a target area ``U(min_num_patches, max_mask_patches)``
    (``max_mask_patches = min(remaining, max_num_patches)``) and a log-uniform aspect ratio. A rectangle is
    kept only if it adds between 1 and ``max_mask_patches`` new patches, so the total never exceeds
    ``num_masking_patches``. Like BEiT's generator, it gives up after 10 failed attempts for one block, so a
    mask can end slightly *below* the target (rarely, and by a few patches); callers must not assume an exact
    count. Because of rounding of ``h`` and ``w``, and because the last blocks are capped by the remaining
    budget, individual blocks may be smaller than ``min_num_patches``.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        gh, gw = _check_grid(grid)
        if not 0 < num_masking_patches < gh * gw:
            raise ValueError(
                f"num_masking_patches must be in (0, {gh * gw}) for grid {gh}x{gw}, got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if max_num_patches is None:
            max_num_patches = num_masking_patches
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")

        self.grid = (gh, gw)
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g}))"
        )

    def _place_block(self, mask: np.ndarray, rng: np.random.Generator, max_mask_patches: int) -> int:
        """Try to add one rectangle to ``mask`` in place; return the number of newly masked patches."""
        gh, gw = self.grid
        # BEiT's random.uniform(a, b) accepts a > b (remaining budget below min_num_patches); keep that.
        lo, hi = sorted((float(self.min_num_patches), float(max_mask_patches)))
        log_lo, log_hi = math.log(self.min_aspect), math.log(self.max_aspect)
        for _ in range(_MAX_ATTEMPTS_PER_BLOCK):
            target_area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if h < gh and w < gw:
                top = int(rng.integers(0, gh - h + 1))
                left = int(rng.integers(0, gw - w + 1))
                window = mask[top : top + h, left : left + w]
                delta = h * w - int(window.sum())
                if 0 < delta <= max_mask_patches:
                    window[...] = True
                    return delta
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, rng, max_mask_patches)
            if delta == 0:
                break
            count += delta
        return mask


class RandomGridMaskGenerator:
    """Uniform random masking of ``cell x cell`` groups of patches (SimMIM-style coarse masking).

    Exactly ``ceil(num_cells * ratio)`` cells are masked (the count of the reference's SimMIM-style mask
    generator, e.g. 30 of 49 cells at 0.6), chosen without replacement, so the masked-patch count is constant
    across samples, which keeps per-batch loss normalization stable.
    """

    def __init__(self, grid: tuple[int, int], ratio: float, cell: int = 1) -> None:
        gh, gw = _check_grid(grid)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        if cell < 1:
            raise ValueError(f"cell must be >= 1, got {cell}")
        if gh % cell or gw % cell:
            raise ValueError(f"grid {gh}x{gw} is not divisible by cell size {cell}")
        self.grid = (gh, gw)
        self.ratio = float(ratio)
        self.cell = int(cell)
        self.cell_grid = (gh // cell, gw // cell)
        self.num_cells = self.cell_grid[0] * self.cell_grid[1]
        self.num_masked_cells = int(math.ceil(self.num_cells * self.ratio))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid}, ratio={self.ratio}, cell={self.cell})"

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        cells = np.zeros(self.num_cells, dtype=bool)
        cells[rng.choice(self.num_cells, size=self.num_masked_cells, replace=False)] = True
        cells = cells.reshape(self.cell_grid)
        return cells.repeat(self.cell, axis=0).repeat(self.cell, axis=1)


def build_mask_generator(
    kind: str,
    grid: tuple[int, int],
    *,
    ratio: float,
    cell: int = 1,
    min_num_patches: int = 16,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> BlockMaskGenerator | RandomGridMaskGenerator:
    """Build a mask generator from config values.

    ``kind="block"`` masks ``round(ratio * gh * gw)`` patches block-wise (``cell`` is ignored);
    ``kind="random"`` masks cells uniformly (the block-shape arguments are ignored).
    """
    if kind == MaskKind.block:
        gh, gw = _check_grid(grid)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        return BlockMaskGenerator(
            (gh, gw),
            num_masking_patches=int(round(ratio * gh * gw)),
            min_num_patches=min_num_patches,
            min_aspect=min_aspect,
            max_aspect=max_aspect,
        )
    if kind == MaskKind.random:
        return RandomGridMaskGenerator(grid, ratio=ratio, cell=cell)
    raise ValueError(f"unknown mask kind {kind!r}; expected 'block' or 'random'")
