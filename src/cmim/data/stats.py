"""``data.mean/std=auto``: per-channel normalization estimated from the training images themselves.

Multi-band and high-bit-depth data has no ImageNet-style statistics to copy (a 12-bit sensor in a 16-bit
container spans [0, 0.0625]; a near-infrared band has its own range), so a run can ask for its own: the mean and
standard deviation of every channel over all pixels of a fixed sample of the training split (:data:`STATS_IMAGES`
images chosen with seed :data:`STATS_SEED`, so the numbers depend on the data alone, not on ``train.seed``), seen
through the eval transform (resize + centre crop) in [0, 1]. They are computed once when pre-training starts and
written into the run's config (``config.yaml`` and the checkpoint), so ``cmim eval`` and ``cmim export`` read
the numbers, never ``auto``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cmim.data.augment import to_unit
from cmim.data.views import build_eval_dataset

__all__ = ["STATS_IMAGES", "STATS_SEED", "estimate_mean_std", "resolve_auto_stats"]

log = logging.getLogger("cmim")

STATS_IMAGES = 512
STATS_SEED = 0
_MIN_STD = 1e-6  # below this a channel is constant in the sample: its std becomes 1 (a no-op), with a warning


def _sig(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits: readable YAML, far below any effect on training


@torch.no_grad()
def estimate_mean_std(dataset: Dataset, num_images: int = STATS_IMAGES, seed: int = STATS_SEED,
                      num_workers: int = 0, batch_size: int = 64) -> tuple[list[float], list[float], int]:
    """Per-channel (mean, std, images used) over every pixel of a seeded sample of an eval dataset's images
    (items ``{"image": (C, H, W)}``, uint8 or float in [0, 1]); sums in float64."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no images to estimate data.mean/std from")
    k = min(int(num_images), n)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).tolist()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total = total_sq = None
    count = 0
    for batch in loader:
        x = to_unit(batch["image"]).double()
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    assert total is not None and total_sq is not None
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_(min=0.0)
    std = var.sqrt()
    flat = [c for c, v in enumerate(std.tolist()) if v < _MIN_STD]
    if flat:
        log.warning("data.std=auto: channel(s) %s constant in the %d sampled images; their std is set to 1", flat, k)
    return [_sig(v) for v in mean.tolist()], [_sig(v if v >= _MIN_STD else 1.0) for v in std.tolist()], k


def resolve_auto_stats(data: Any, split: str | None = None, num_images: int = STATS_IMAGES) -> dict[str, Any] | None:
    """Replace ``data.mean`` / ``data.std`` given as ``"auto"`` (a DictConfig, changed in place) by the estimate
    from ``split`` (default ``data.train_split``); returns what was estimated (None when nothing was auto)."""
    auto = [k for k in ("mean", "std") if isinstance(data[k], str)]
    if not auto:
        return None
    split = str(data.train_split if split is None else split)
    mean, std, used = estimate_mean_std(build_eval_dataset(data, split), num_images,
                                        num_workers=int(getattr(data, "num_workers", 0) or 0))
    if "mean" in auto:
        data.mean = mean
    if "std" in auto:
        data.std = std
    if not all(math.isfinite(v) for v in mean + std):
        raise ValueError(f"data.mean/std=auto: the images of split {split!r} hold non-finite values")
    return {"mean": list(data.mean), "std": list(data.std), "estimated": auto, "images": used, "split": split,
            "seed": STATS_SEED}
