"""Procedural images that a small encoder can learn from: tests, smoke runs and the bench, with no files."""

from __future__ import annotations

import math

import numpy as np

from cmim.data.base import BaseImageDataset, BitDepth, check_in_chans, needs_float_pixels

__all__ = ["SyntheticDataset"]


class SyntheticDataset(BaseImageDataset):
    """Procedural, learnable images: class = (bar orientation, number of parallel bars).

    Nuisances per image: position, scale, small rotation, bar thickness, intensities, a background gradient,
    pixel noise and (more than one channel) a tint per channel. Up to 8 orientations × 1-3 bars keep ≤ 24
    classes well separated (more classes still work, with more bars). Item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, in_chans: int = 1, seed: int = 0,
                 bit_depth: str = BitDepth.auto) -> None:
        if size <= 0 or num_classes <= 0 or img_size <= 0:
            raise ValueError("synthetic size, num_classes and img_size must be positive")
        self.in_chans = check_in_chans(in_chans)
        self.float_pixels = needs_float_pixels(self.in_chans, bit_depth)  # uint8 items the views divide by 255
        self.img_size, self.seed = img_size, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]
        perm = np.random.default_rng([seed, 0x5EED]).permutation(size)
        self.targets = (perm % num_classes).astype(np.int64)
        self._n_orient = min(num_classes, 8)
        ax = (np.arange(img_size, dtype=np.float32) + 0.5) / img_size * 2.0 - 1.0
        self._yy, self._xx = np.meshgrid(ax, ax, indexing="ij")

    def render(self, index: int) -> np.ndarray:
        """Draw image ``index`` as uint8 (H, W) or (H, W, C)."""
        c = int(self.targets[index])
        rng = np.random.default_rng([self.seed, 1, index])
        u = rng.random(12)
        theta = math.pi * (c % self._n_orient) / self._n_orient + 0.12 * (u[0] - 0.5)
        n_bars = 1 + c // self._n_orient
        scale = 0.8 + 0.3 * u[1]
        cx, cy = 0.3 * (u[2] - 0.5), 0.3 * (u[3] - 0.5)
        width = scale * (0.22 + 0.08 * u[4]) / math.sqrt(n_bars)
        spacing = 2.2 * width
        length = scale * 1.4
        x, y = self._xx - cx, self._yy - cy
        cos, sin = math.cos(theta), math.sin(theta)
        along, across = x * cos + y * sin, -x * sin + y * cos
        offsets = (np.arange(n_bars, dtype=np.float32) - (n_bars - 1) / 2) * spacing
        dist = np.abs(across[..., None] - offsets).min(axis=-1)
        soft = 2.0 / self.img_size  # ~1 pixel anti-aliased edge
        mask = np.clip((width / 2 - dist) / soft + 0.5, 0, 1) * np.clip(
            (length / 2 - np.abs(along)) / soft + 0.5, 0, 1
        )
        bg = (
            0.05
            + 0.2 * u[5]
            + 0.1 * (u[6] - 0.5) * (self._xx * math.cos(6.3 * u[7]) + self._yy * math.sin(6.3 * u[7]))
        )
        fg = 0.65 + 0.35 * u[8]
        img = bg + mask * (fg - bg)
        if self.in_chans > 1:
            tint = 0.75 + 0.25 * rng.random(self.in_chans)
            img = img[..., None] * tint
        img = img + rng.normal(0.0, 0.04, size=img.shape)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self.targets):
            raise IndexError(index)
        return self.render(index), int(self.targets[index])
