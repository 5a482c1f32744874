"""Frozen features, computed once and cached on disk.

A cache entry is keyed by the weights (content hash of the checkpoint or export, encoder, init), the pooled
feature, the split and everything about the data that changes pixels (dataset, root, size, normalization,
crop, subset). Re-running k-NN with other k, a linear probe, or a t-SNE plot costs no encoder forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from cmim.config import ConfigError
from cmim.core.io import atomic_torch_save
from cmim.data.datasets import build_base_dataset, skipped_files
from cmim.data.views import build_eval_dataset
from cmim.eval.knn import extract_features, first_n, pixel_features
from cmim.eval.loading import EncoderSource

__all__ = [
    "seed_augmentation",
    "TransformDataset",
    "base_train_dataset",
    "cache_dir",
    "cached_features",
    "check_data_fits",
    "eval_dataset",
    "num_classes_of",
    "resolve_device",
]

log = logging.getLogger("cmim")

# split name -> unreadable files skipped by the latest features of that split (fresh or from the cache), so
# a result file can report them: {"skipped_images": {split: len(paths)}}
SKIPPED: dict[str, list[str]] = {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def cache_dir(cfg: DictConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("CMIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cmim" / "features"


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
    return first_n(ds, cfg.train_subset if part == "train" else cfg.test_subset)


def base_train_dataset(cfg: DictConfig) -> Dataset:
    """The un-augmented train split (PIL images or uint8 arrays), with the eval train subset and the label
    fraction applied."""
    try:
        ds = build_base_dataset(cfg.data, split_name(cfg, "train"))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    sub = first_n(ds, cfg.train_subset)
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


def _key(src: EncoderSource, cfg: DictConfig, part: str, feature: str) -> dict[str, Any]:
    d = cfg.data
    root = str(Path(d.root).resolve()) if d.root else None
    return {
        "weights": src.tag, "feature": feature, "split": split_name(cfg, part), "dataset": d.name,
        "root": root,
        "img_size": d.img_size, "in_chans": d.in_chans, "mean": list(d.mean), "std": list(d.std),
        "eval_crop_pct": d.eval_crop_pct, "interpolation": d.interpolation, "subset": d.subset,
        "n": cfg.train_subset if part == "train" else cfg.test_subset,
        "synthetic": [d.synthetic_size, d.synthetic_classes] if d.name == "synthetic" else None,
        "precision": cfg.precision,
        **({"folder": {"val_fraction": d.val_fraction, "split_seed": d.split_seed, "background": list(d.background),
                       "max_image_pixels": d.max_image_pixels}} if d.name == "folder" else {}),
    }


def cached_features(src: EncoderSource, cfg: DictConfig, part: str, feature: str | None = None,
                    use_cache: bool = True) -> tuple[Tensor, Tensor, bool]:
    """(features float32 (N, D), labels (N,), was_cached) of the ``part`` split for ``src``'s encoder."""
    feature = feature or cfg.feature
    key = _key(src, cfg, part, feature)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cfg) / f"{src.tag}-{feature}-{key['split']}-{digest}.pt"
    if use_cache and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == json.loads(json.dumps(key)):
                SKIPPED[key["split"]] = list(blob.get("skipped", []))
                return blob["features"], blob["labels"], True
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    ds = eval_dataset(cfg, part)
    if src.kind == "pixels":
        feats, labels = pixel_features(ds, mean=list(cfg.data.mean), std=list(cfg.data.std),
                                       batch_size=cfg.batch_size, num_workers=int(cfg.data.num_workers))
    else:
        check_data_fits(src, cfg.data)
        device = resolve_device(cfg.device)
        enc = src.encoder.to(device)
        feats, labels = extract_features(enc, ds, feature=feature, mean=list(cfg.data.mean),
                                         std=list(cfg.data.std), device=device, batch_size=cfg.batch_size,
                                         num_workers=int(cfg.data.num_workers), precision=cfg.precision)
    skipped = skipped_files(ds)
    SKIPPED[key["split"]] = skipped
    if skipped:
        log.warning("data: %d unreadable image(s) skipped in split %r (each replaced by the next readable one)",
                    len(skipped), key["split"])
    if use_cache:
        atomic_torch_save({"features": feats, "labels": labels, "key": key, "skipped": skipped,
                           "config": OmegaConf.to_container(cfg.data, resolve=True)}, path)
    return feats, labels, False

