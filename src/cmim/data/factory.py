"""The base dataset a config names (``data.name``, ``data.root``, the split), built with the config's settings."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmim.core.cpus import loader_workers
from cmim.data.arrays import CIFAR, FashionMNIST
from cmim.data.base import BaseImageDataset, needs_float_pixels
from cmim.data.cache import DecodedCache, default_cache_dir
from cmim.data.folder import ImageFolderDataset
from cmim.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_IMAGE_PIXELS
from cmim.data.splits import DEFAULT_TWIN_COSINE, split_part
from cmim.data.subset import SubsetDataset
from cmim.data.synthetic import SyntheticDataset

__all__ = ["build_base_dataset", "folder_cache"]


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def folder_cache(cfg: Any, in_chans: int, background: Sequence[int], keep_images: bool) -> DecodedCache:
    """The decoded-image cache of a folder recipe (:mod:`cmim.data.cache`); without ``keep_images`` it only
    keeps the split's fingerprints."""
    root = _cfg(cfg, "cache_dir", None) or default_cache_dir()
    short_side = _cfg(cfg, "cache_short_side", None) or 2 * int(_cfg(cfg, "img_size", 224))
    return DecodedCache(root, int(short_side), in_chans, background, keep_images=keep_images)


def _folder_dataset(cfg: Any, root: str, split: str, in_chans: int) -> BaseImageDataset:
    """``root/split``, or with ``data.val_fraction > 0`` the train / held-out part of ``root`` itself."""
    max_pixels = getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    background = _cfg(cfg, "background", DEFAULT_BACKGROUND)
    fraction = float(_cfg(cfg, "val_fraction", 0.0))
    twins = bool(_cfg(cfg, "split_twins", True)) and fraction > 0.0
    float_pixels = needs_float_pixels(in_chans, str(_cfg(cfg, "bit_depth", "auto")))
    # the cache holds 8-bit images decoded on the CPU (data.decode=device decodes full-size files on the device)
    keep_images = bool(_cfg(cfg, "cache_images", True)) and not float_pixels and _cfg(cfg, "decode", "cpu") == "cpu"
    cache = folder_cache(cfg, in_chans, background, keep_images) if twins or keep_images else None
    if fraction <= 0.0:
        folder = os.path.join(root, split) if split else root
        return ImageFolderDataset(folder, in_chans, max_pixels, background, cache if keep_images else None)
    ds = ImageFolderDataset(root, in_chans, max_pixels, background, cache)
    ds.float_pixels = float_pixels
    threshold = float(_cfg(cfg, "twin_cosine", DEFAULT_TWIN_COSINE)) if twins else None
    return split_part(ds, split, fraction, int(_cfg(cfg, "split_seed", 0)), threshold,
                      loader_workers(_cfg(cfg, "num_workers", 0)))


def build_base_dataset(cfg: Any, split: str) -> BaseImageDataset:
    """Build the un-augmented dataset of ``split`` (a split name such as ``cfg.train_split``) from ``cfg``.

    ``cfg.subset`` keeps the first ``subset`` samples; for folder trees with class sub-folders (stored
    sorted by class) it keeps ``subset`` evenly spaced samples instead so every class stays represented.
    Folders: ``split`` is a sub-folder of ``cfg.root``, except with ``cfg.val_fraction > 0``, where "train"
    is the training part of ``cfg.root`` itself and "val"/"test" its held-out part (:func:`held_out_mask`).
    """
    name = str(cfg.name).lower()
    in_chans = int(_cfg(cfg, "in_chans", 3))
    root = getattr(cfg, "root", None)
    ds: BaseImageDataset
    if name == "fashion-mnist":
        ds = FashionMNIST(root, split, in_chans=in_chans)
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"data.root must be set for {name}")
        ds = CIFAR(root, split, num_classes=10 if name == "cifar10" else 100, in_chans=in_chans)
    elif name == "folder":
        if root is None:
            raise ValueError("data.root must be set for the folder dataset")
        ds = _folder_dataset(cfg, str(root), split, in_chans)
    elif name == "synthetic":
        seed = zlib.crc32(str(split).encode())  # different, fixed images per split
        ds = SyntheticDataset(
            int(_cfg(cfg, "synthetic_size", 1000)),
            int(_cfg(cfg, "synthetic_classes", 10)),
            int(cfg.img_size),
            in_chans,
            seed=seed,
        )
    else:
        raise ValueError(
            f"unknown dataset name {cfg.name!r} (fashion-mnist, folder, synthetic, cifar10, cifar100)"
        )
    if needs_float_pixels(in_chans, str(_cfg(cfg, "bit_depth", "auto"))):  # data.bit_depth=full: on the base itself
        base = ds.base if isinstance(ds, SubsetDataset) else ds
        base.float_pixels = True
    subset = getattr(cfg, "subset", None)
    if subset is not None and int(subset) < len(ds):
        n, m = len(ds), int(subset)
        folder = isinstance(ds, ImageFolderDataset) or (
            isinstance(ds, SubsetDataset) and isinstance(ds.base, ImageFolderDataset)
        )
        if folder and ds.classes:
            indices = (np.arange(m) * n) // m
        else:
            indices = np.arange(m)
        ds = SubsetDataset(ds, indices)
    return ds
