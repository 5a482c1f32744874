"""Figure helpers shared by the plots: a headless backend, flat axes arrays, atomic PNG writes, and turning
an eval-dataset item back into a displayable image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from cmim.core.io import atomic_path  # noqa: E402

__all__ = ["display_image", "new_figure", "save_figure"]


def new_figure(rows: int, cols: int, size: tuple[float, float],
               constrained: bool = False) -> tuple[Any, list[Any]]:
    """A figure and its axes as a flat list; ``constrained`` layout for figures with a shared colorbar."""
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False,
                             layout="constrained" if constrained else None)
    return fig, list(axes.flatten())


def save_figure(fig: Any, out: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` as PNG (through a temporary name, so a reader never sees half a file) and close it."""
    out = Path(out)
    if tight:
        fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return out


def display_image(img_u8: Tensor) -> tuple[np.ndarray, str | None]:
    """uint8 or float (C, H, W) -> an array for ``imshow`` plus the colormap it needs (gray for one channel).
    Float images (full bit depth) are clipped to [0, 1]; N bands other than 3 show as false colour: the first three
    (the first alone for 2), each stretched to its own range."""
    a = img_u8.cpu().numpy()
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.shape[0] not in (1, 3):
            a = a[:3] if a.shape[0] > 3 else a[:1]
            lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
            a = (a - lo) / np.maximum(hi - lo, 1e-12)
        a = np.clip(a, 0.0, 1.0)
    if a.shape[0] == 1:
        return a[0], "gray"
    return a.transpose(1, 2, 0), None
