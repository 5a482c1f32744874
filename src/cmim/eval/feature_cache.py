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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from cmim.core.cpus import loader_workers
from cmim.core.distributed import resolve_device
from cmim.core.errors import ConfigError
from cmim.core.io import atomic_torch_save
from cmim.core.weights import read_weights
from cmim.data.skips import skipped_files
from cmim.engine.memory import host_available_bytes
from cmim.eval.datasets import check_data_fits, eval_dataset, split_name
from cmim.eval.extract import extract_features, pixel_features
from cmim.eval.loading import EncoderSource

__all__ = ["SKIPPED", "cache_dir", "cached_features"]

log = logging.getLogger("cmim")

# split name -> unreadable files skipped by the latest features of that split (fresh or from the cache), so
# a result file can report them: {"skipped_images": {split: len(paths)}}
SKIPPED: dict[str, list[str]] = {}


def cache_dir(cfg: DictConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("CMIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cmim" / "features"


def _key(src: EncoderSource, cfg: DictConfig, part: str, feature: str) -> dict[str, Any]:
    d = cfg.data
    root = str(Path(d.root).resolve()) if d.root else None
    # JSON values only: the key is saved with the features and read back weights-only (config choices as str)
    return json.loads(json.dumps({
        "weights": src.tag, "feature": feature, "split": split_name(cfg, part), "dataset": d.name,
        "root": root,
        "img_size": d.img_size, "in_chans": d.in_chans, "mean": list(d.mean), "std": list(d.std),
        "eval_crop_pct": d.eval_crop_pct, "interpolation": d.interpolation, "subset": d.subset,
        "n": cfg.train_subset if part == "train" else cfg.test_subset,
        "synthetic": [d.synthetic_size, d.synthetic_classes] if d.name == "synthetic" else None,
        "precision": cfg.precision,
        **({"bit_depth": d.bit_depth} if d.get("bit_depth", "auto") != "auto" else {}),  # full depth: other pixels
        **({"folder": {"val_fraction": d.val_fraction, "split_seed": d.split_seed, "background": list(d.background),
                       "max_image_pixels": d.max_image_pixels, "split_twins": d.split_twins,
                       "twin_cosine": d.twin_cosine, "cache_images": d.cache_images,
                       "cache_short_side": d.cache_short_side}} if d.name == "folder" else {}),
    }))


def check_pixel_memory(num_images: int, data: DictConfig) -> None:
    """Refuse, in one line, raw-pixel features that cannot fit in memory (they are held as float32), instead of
    being killed by the kernel half-way."""
    need = num_images * int(data.in_chans) * int(data.img_size) ** 2 * 4
    free = host_available_bytes()
    if free is not None and need > 0.8 * free:
        raise ConfigError(f"raw-pixel features of {num_images} images at {data.in_chans}x{data.img_size}x"
                          f"{data.img_size} need {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                          "available: set train_subset / test_subset, or a smaller data.img_size")


def cached_features(src: EncoderSource, cfg: DictConfig, part: str, feature: str | None = None,
                    use_cache: bool = True) -> tuple[Tensor, Tensor, bool]:
    """(features float32 (N, D), labels (N,), was_cached) of the ``part`` split for ``src``'s encoder."""
    feature = feature or cfg.feature
    key = _key(src, cfg, part, feature)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cfg) / f"{src.tag}-{feature}-{key['split']}-{digest}.pt"
    if use_cache and path.is_file():
        try:
            blob = read_weights(path, what="feature cache")
            if blob.get("key") == key:
                SKIPPED[key["split"]] = list(blob.get("skipped", []))
                return blob["features"], blob["labels"], True
        except Exception as e:  # noqa: BLE001 - a broken cache file is recomputed
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    ds = eval_dataset(cfg, part)
    if src.kind == "pixels":
        check_pixel_memory(len(ds), cfg.data)
        feats, labels = pixel_features(ds, mean=list(cfg.data.mean), std=list(cfg.data.std),
                                       batch_size=cfg.batch_size, num_workers=loader_workers(cfg.data.num_workers))
    else:
        check_data_fits(src, cfg.data)
        device = resolve_device(cfg.device, key="device")
        enc = src.encoder.to(device)
        feats, labels = extract_features(enc, ds, feature=feature, mean=list(cfg.data.mean),
                                         std=list(cfg.data.std), device=device, batch_size=cfg.batch_size,
                                         num_workers=loader_workers(cfg.data.num_workers), precision=cfg.precision)
    skipped = skipped_files(ds)
    SKIPPED[key["split"]] = skipped
    if skipped:
        log.warning("data: %d unreadable image(s) skipped in split %r (each replaced by the next readable one)",
                    len(skipped), key["split"])
    if use_cache:
        atomic_torch_save({"features": feats, "labels": labels, "key": key, "skipped": skipped,
                           "config": OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)}, path)
    return feats, labels, False

