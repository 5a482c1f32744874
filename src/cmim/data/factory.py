"""The base dataset a config names (``data.name``, ``data.root``, the split), built with the config's settings.

``cfg`` is the ``data`` section merged into its schema (:class:`cmim.data.config.DataConfig`), so every key
is there with its one default; nothing here restates one. Each ``data.name`` is a builder in :data:`DATASETS`;
a new kind of data registers one with :func:`register_dataset` (the config check takes the names from there).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cmim.core.cpus import loader_workers
from cmim.data.arrays import CIFAR, FashionMNIST
from cmim.data.base import BaseImageDataset, DecodeMode, needs_float_pixels
from cmim.data.cache import DecodedCache, default_cache_dir
from cmim.data.folder import ImageFolderDataset
from cmim.data.splits import split_part
from cmim.data.subset import SubsetDataset
from cmim.data.synthetic import SyntheticDataset

__all__ = ["DATASETS", "DatasetBuilder", "build_base_dataset", "folder_cache", "register_dataset"]

#: ``(data config, split, decode mode) -> dataset``: the builder of one ``data.name``
DatasetBuilder = Callable[[Any, str, DecodeMode], BaseImageDataset]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator: the builder of ``data.name=<name>``."""
    def add(builder: DatasetBuilder) -> DatasetBuilder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = builder
        return builder
    return add


def folder_cache(cfg: Any, in_chans: int, background: Sequence[int], keep_images: bool) -> DecodedCache:
    """The decoded-image cache of a folder recipe (:mod:`cmim.data.cache`); without ``keep_images`` it only
    keeps the split's fingerprints."""
    root = cfg.cache_dir or default_cache_dir()
    short_side = cfg.cache_short_side or 2 * int(cfg.img_size)
    return DecodedCache(root, int(short_side), in_chans, background, keep_images=keep_images)


@register_dataset("fashion-mnist")
def _fashion_mnist(cfg: Any, split: str, decode_mode: DecodeMode) -> BaseImageDataset:
    return FashionMNIST(cfg.root, split, in_chans=int(cfg.in_chans), bit_depth=cfg.bit_depth)


def _cifar(num_classes: int) -> DatasetBuilder:
    def build(cfg: Any, split: str, decode_mode: DecodeMode) -> BaseImageDataset:
        if cfg.root is None:
            raise ValueError(f"data.root must be set for {cfg.name}")
        return CIFAR(cfg.root, split, num_classes=num_classes, in_chans=int(cfg.in_chans), bit_depth=cfg.bit_depth)
    return build


register_dataset("cifar10")(_cifar(10))
register_dataset("cifar100")(_cifar(100))


@register_dataset("synthetic")
def _synthetic(cfg: Any, split: str, decode_mode: DecodeMode) -> BaseImageDataset:
    seed = zlib.crc32(str(split).encode())  # different, fixed images per split
    return SyntheticDataset(int(cfg.synthetic_size), int(cfg.synthetic_classes), int(cfg.img_size),
                            int(cfg.in_chans), seed=seed, bit_depth=cfg.bit_depth)


@register_dataset("folder")
def _folder(cfg: Any, split: str, decode_mode: DecodeMode) -> BaseImageDataset:
    """``root/split``, or with ``data.val_fraction > 0`` the train / held-out part of ``root`` itself."""
    if cfg.root is None:
        raise ValueError("data.root must be set for the folder dataset")
    root, in_chans, background = str(cfg.root), int(cfg.in_chans), cfg.background
    fraction = float(cfg.val_fraction)
    twins = bool(cfg.split_twins) and fraction > 0.0
    # the cache holds 8-bit images decoded on the CPU (data.decode=device decodes full-size files on the device)
    keep_images = (bool(cfg.cache_images) and not needs_float_pixels(in_chans, cfg.bit_depth)
                   and cfg.decode == DecodeMode.cpu)
    cache = folder_cache(cfg, in_chans, background, keep_images) if twins or keep_images else None
    if fraction <= 0.0:
        folder = os.path.join(root, split) if split else root
        return ImageFolderDataset(folder, in_chans, cfg.max_image_pixels, background,
                                  cache if keep_images else None, cfg.bit_depth, decode_mode)
    ds = ImageFolderDataset(root, in_chans, cfg.max_image_pixels, background, cache, cfg.bit_depth, decode_mode)
    return split_part(ds, split, fraction, int(cfg.split_seed), float(cfg.twin_cosine) if twins else None,
                      loader_workers(cfg.num_workers))


@register_dataset("shards")
def _shards(cfg: Any, split: str, decode_mode: DecodeMode) -> BaseImageDataset:
    """WebDataset tar shards written by ``cmim shards``, read by random access over their index."""
    from cmim.data.shards.dataset import build_shard_dataset  # the shard reader pulls in webdataset's tar I/O

    return build_shard_dataset(cfg, split, int(cfg.in_chans))


def build_base_dataset(cfg: Any, split: str, decode_mode: str = DecodeMode.cpu) -> BaseImageDataset:
    """Build the un-augmented dataset of ``split`` (a split name such as ``cfg.train_split``) from ``cfg``.

    ``cfg.subset`` keeps the first ``subset`` samples; for folder trees with class sub-folders (stored
    sorted by class) it keeps ``subset`` evenly spaced samples instead so every class stays represented.
    Folders: ``split`` is a sub-folder of ``cfg.root``, except with ``cfg.val_fraction > 0``, where "train"
    is the training part of ``cfg.root`` itself and "val"/"test" its held-out part (:func:`held_out_mask`).
    ``decode_mode`` "device" leaves a folder's JPEG files undecoded (pre-training with ``data.decode=device``).
    """
    builder = DATASETS.get(str(cfg.name))
    if builder is None:
        raise ValueError(f"unknown dataset name {cfg.name!r} ({', '.join(DATASETS)})")
    ds = builder(cfg, split, DecodeMode(decode_mode))
    if cfg.subset is not None and int(cfg.subset) < len(ds):
        n, m = len(ds), int(cfg.subset)
        picked = ds.selection()
        folder = isinstance(picked[0] if picked is not None else ds, ImageFolderDataset)
        indices = (np.arange(m) * n) // m if folder and ds.classes else np.arange(m)
        ds = SubsetDataset(ds, indices)
    return ds
