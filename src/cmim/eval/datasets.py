"""The datasets of every evaluation: deterministic eval splits, the un-augmented train split with a label
fraction, transforms for trained probes and fine-tuning, and the checks that the data fits the encoder."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from cmim.core.errors import ConfigError
from cmim.data.base import needs_float_pixels
from cmim.data.factory import build_base_dataset
from cmim.data.views import build_eval_dataset
from cmim.eval.loading import EncoderSource

__all__ = ["TransformDataset", "base_train_dataset", "check_data_fits", "eval_dataset", "evenly_spaced",
           "label_subset", "num_classes_of", "seed_augmentation", "split_name"]


def evenly_spaced(dataset: Dataset, n: int | None) -> Dataset:
    """``n`` samples spread evenly over ``dataset`` (all of it for None or ``n >= len``): deterministic, and, unlike
    the first ``n``, keeps the class mix of datasets stored class by class (sorted folders)."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    step = len(dataset) / n  # type: ignore[arg-type]
    return Subset(dataset, [int(i * step) for i in range(n)])


def check_data_fits(src: EncoderSource, data: DictConfig) -> None:
    """The eval images must match what the encoder's fixed position tables and patch embedding expect."""
    kw = src.encoder.timm_kwargs
    size, chans = int(kw.get("img_size", data.img_size)), int(kw.get("in_chans", data.in_chans))
    if int(data.img_size) != size:
        raise ConfigError(f"data.img_size: {data.img_size} differs from the encoder's input size {size}")
    if int(data.in_chans) != chans:
        raise ConfigError(f"data.in_chans: {data.in_chans} differs from the encoder's {chans} input channels")


def split_name(cfg: DictConfig, part: str) -> str:
    return str(cfg.data.train_split if part == "train" else cfg.data.eval_split)


def eval_dataset(cfg: DictConfig, part: str) -> Dataset:
    """The deterministic (centre-crop) dataset of ``part`` ("train" | "test"), eval subset applied."""
    try:
        ds = build_eval_dataset(cfg.data, split_name(cfg, part))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    return evenly_spaced(ds, cfg.train_subset if part == "train" else cfg.test_subset)


def base_train_dataset(cfg: DictConfig) -> Dataset:
    """The un-augmented train split (PIL images or uint8 arrays), with the eval train subset and the label
    fraction applied."""
    if needs_float_pixels(int(cfg.data.in_chans), str(cfg.data.get("bit_depth", "auto"))):
        raise ConfigError(f"data: fine-tuning and linear.mode=reference augment with timm's PIL transforms, which "
                          f"take 8-bit 1- or 3-channel images, not data.in_chans={cfg.data.in_chans} / "
                          f"data.bit_depth={cfg.data.get('bit_depth', 'auto')}; k-NN and linear.mode=cached work")
    try:
        ds = build_base_dataset(cfg.data, split_name(cfg, "train"))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    sub = evenly_spaced(ds, cfg.train_subset)
    if cfg.label_fraction is None:
        return sub
    from cmim.eval.baselines import balanced_label_indices

    indices = np.asarray(sub.indices) if isinstance(sub, Subset) else np.arange(len(ds))  # type: ignore[arg-type]
    keep = balanced_label_indices(np.asarray(ds.targets)[indices], float(cfg.label_fraction), int(cfg.seed))
    return Subset(ds, indices[keep].tolist())


def label_subset(feats: Tensor, labels: Tensor, cfg: DictConfig) -> tuple[Tensor, Tensor]:
    """The class-balanced ``label_fraction`` of cached train features (all of them when it is null)."""
    if cfg.label_fraction is None:
        return feats, labels
    from cmim.eval.baselines import balanced_label_indices

    idx = torch.from_numpy(balanced_label_indices(labels, float(cfg.label_fraction), int(cfg.seed)))
    return feats[idx], labels[idx]


def num_classes_of(cfg: DictConfig) -> int:
    """Number of classes of the eval dataset (from its class list; labels-only sets fall back to max + 1)."""
    try:
        base = build_base_dataset(cfg.data, split_name(cfg, "train"))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    n = len(getattr(base, "classes", []) or [])
    if n == 0:
        targets = getattr(base, "targets", None)
        n = int(max(targets)) + 1 if targets is not None and len(targets) and max(targets) >= 0 else 0
    if n < 2:
        raise ConfigError(f"data: {cfg.data.name} at {cfg.data.root} has no class labels to evaluate with")
    return n


def seed_augmentation(seed: int) -> None:
    """Seed torch, numpy and Python's global generators. timm's transforms draw from Python's (in the main
    process when num_workers=0; DataLoader workers are seeded from torch) and its Mixup from numpy's, so a
    training run on :class:`TransformDataset` repeats exactly only when all three are seeded."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class TransformDataset(Dataset):
    """(image, label) items of a base dataset through a PIL transform (timm's training transforms)."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.base[index]
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        return self.transform(pil), int(label)
