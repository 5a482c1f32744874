"""The reference points every result is read against, as evaluation sources of their own.

- *raw pixels*: the normalized image, flattened, is the feature. k-NN and the linear probe on it use exactly
  the protocol, splits, subsets and seeds of the encoders, so "the encoder beats the pixels" is like for like.
- *an architecture from a recipe*: the encoder a pre-training recipe would build, freshly initialized, without
  any checkpoint. Fine-tuned, it is the *supervised from scratch* baseline; probed, the *random init* one.
- *class-balanced label subsets*: the few-labels setting (1%, 10% of the train labels), the same indices for
  every source at a given seed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from cmim.eval.loading import EncoderSource

__all__ = ["PIXELS", "PixelSource", "balanced_label_indices", "pixel_source", "recipe_source"]

PIXELS = "pixels"  # the feature name of the raw-pixel baseline


class PixelSource(EncoderSource):
    """No encoder: the (normalized, flattened) pixels are the features."""

    def describe(self) -> dict[str, Any]:
        return {"path": None, "sha256": None, "kind": "pixels", "encoder": PIXELS, "method": None,
                "init": self.init, "timm_name": None, "timm_kwargs": None}


def pixel_source(data: dict[str, Any]) -> PixelSource:
    return PixelSource(encoder=None, path="raw pixels", sha256=PIXELS * 4, kind="pixels",  # type: ignore[arg-type]
                       which=PIXELS, method=None, data=dict(data), init="none")


def recipe_source(recipe: str | os.PathLike, overrides: list[str] | None = None, seed: int = 0) -> EncoderSource:
    """The encoder of a pre-training recipe (model + data sections), freshly initialized with ``seed``."""
    from cmim.config import load_config
    from cmim.models import build_encoder

    cfg = load_config(recipe, list(overrides or []))
    torch.manual_seed(seed)
    enc = build_encoder(cfg.model, cfg.data.img_size, cfg.data.in_chans)
    text = Path(recipe).read_bytes() + "\n".join(overrides or []).encode()
    data = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)
    return EncoderSource(enc.eval(), str(recipe), hashlib.sha256(text).hexdigest(), "recipe", "teacher",
                         str(cfg.method), dict(data), cfg, init=f"random-s{seed}")  # type: ignore[arg-type]


def balanced_label_indices(labels: np.ndarray | Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced share of labeled samples: from each class, ``round(fraction * n_c)``
    samples (at least one), drawn by a permutation seeded with ``seed`` (the same for every source)."""
    y = labels.numpy() if torch.is_tensor(labels) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(idx))))
        keep.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
