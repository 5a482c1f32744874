"""Which global feature (CLS or the mean of the patch tokens) a row is probed on, chosen without the held-out
part: k-NN from most of the training part to a validation part of it, drawn the way cmim draws its folder
hold-out (:func:`cmim.data.splits.held_out_mask`, near-duplicates grouped) with another seed."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .design import GLOBAL_FEATURES

VAL_FRACTION = 0.2  # of the training part
SEED_OFFSET = 1000  # the validation draw's seed: the study seed + this (the folder split uses the study seed)
K = 20  # the k the study reports


def validation_mask(cfg: DictConfig, labels: np.ndarray, seed: int) -> np.ndarray:
    """Which items of the eval train split (``train_subset`` applied) are the validation part. A folder's files
    are drawn by their paths and grouped with their near-duplicates (as ``data.split_twins`` groups them);
    items of an in-memory dataset (Fashion-MNIST) by their index, each alone."""
    from cmim.data.folder import folder_parts
    from cmim.data.splits import held_out_mask, twin_groups
    from cmim.eval.datasets import eval_dataset

    parts = folder_parts(eval_dataset(cfg, "train"))
    groups = None
    if parts is None:
        names = [str(i) for i in range(len(labels))]
    else:
        base, sel = parts
        idx = list(range(len(base.paths))) if sel is None else sel
        names = [os.path.relpath(base.paths[i], cfg.data.root).replace(os.sep, "/") for i in idx]
        if cfg.data.split_twins and base.cache is not None:
            prints: list[Any] = []
            for i in idx:  # the thumbnails the split itself compared: read back from the decoded-image cache
                try:
                    prints.append(base.cache.fingerprint(base.paths[i], functools.partial(base.decode, i)))
                except Exception:  # noqa: BLE001 - an unreadable file has no twins
                    prints.append(None)
            groups = twin_groups(prints, float(cfg.data.twin_cosine))
    if len(names) != len(labels):
        raise ValueError(f"feature choice: {len(labels)} features for {len(names)} training items")
    return held_out_mask(names, labels, VAL_FRACTION, seed=SEED_OFFSET + seed, groups=groups)


def choose_global_feature(src: Any, cfg: DictConfig, seed: int) -> dict[str, Any]:
    """k-NN top-1 on the validation part for each of GLOBAL_FEATURES (features from cmim's feature cache, which
    the probes then read again) and the best of them (ties: the first)."""
    import torch

    from cmim.core.knn import knn_accuracy
    from cmim.eval.feature_cache import cached_features

    feats = {f: cached_features(src, cfg, "train", feature=f)[:2] for f in GLOBAL_FEATURES}
    labels = feats[GLOBAL_FEATURES[0]][1]
    val = torch.from_numpy(validation_mask(cfg, labels.numpy(), seed))
    num_classes = int(labels.max()) + 1
    scores = {f: knn_accuracy(x[~val], y[~val], x[val], y[val], k=K, temperature=float(cfg.knn.temperature),
                              num_classes=num_classes)["top1"] for f, (x, y) in feats.items()}
    best = max(GLOBAL_FEATURES, key=lambda f: (scores[f], -GLOBAL_FEATURES.index(f)))
    return {"choice": best, "val_top1": scores, "fit_samples": int((~val).sum()), "val_samples": int(val.sum()),
            "val_fraction": VAL_FRACTION, "val_seed": SEED_OFFSET + seed, "k": K}
