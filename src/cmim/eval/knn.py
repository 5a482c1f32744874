"""The k-NN probe of the training monitor (:mod:`cmim.eval.monitor`): k-NN top-1/top-5 of an encoder, and of the
raw pixels, on evenly spaced labeled subsets, with the quick linear probe beside it when asked. The k-NN math is
:mod:`cmim.core.knn`; ``cmim eval knn`` runs the same math on cached features (:mod:`cmim.eval.run`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cmim.core.knn import knn_accuracy
from cmim.eval.datasets import evenly_spaced
from cmim.eval.extract import extract_features, pixel_features
from cmim.models import MaskedEncoder

__all__ = ["online_knn", "pixel_knn"]


def online_knn(encoder: MaskedEncoder, train_set: Dataset, test_set: Dataset, cfg: Any,
               device: torch.device) -> dict[str, float]:
    """The training monitor: k-NN top-1 of ``encoder`` on labeled subsets, with the monitor config."""
    mon, d = cfg.monitor, cfg.data
    kw = dict(feature=mon.feature, mean=d.mean, std=d.std, device=device, batch_size=mon.batch_size,
              precision=cfg.train.precision)
    trf, trl = extract_features(encoder, evenly_spaced(train_set, mon.train_subset), **kw)
    tef, tel = extract_features(encoder, evenly_spaced(test_set, mon.test_subset), **kw)
    return _probes(trf, trl, tef, tel, mon)


def _probes(trf: Tensor, trl: Tensor, tef: Tensor, tel: Tensor, mon: Any) -> dict[str, float]:
    """k-NN top-1/top-5 and, with ``monitor.linear_epochs``, the quick linear probe's top-1 (``linear_top1``)."""
    if (trl < 0).all():
        return {}
    res = knn_accuracy(trf, trl, tef, tel, k=mon.k, temperature=mon.temperature)
    if int(getattr(mon, "linear_epochs", 0)) > 0:
        from cmim.eval.linear import quick_linear

        res["linear_top1"] = quick_linear(trf, trl, tef, tel, int(mon.linear_epochs))
    return res


def pixel_knn(train_set: Dataset, test_set: Dataset, cfg: Any) -> dict[str, float]:
    """The monitor's raw-pixel baseline: the same k-NN, subsets and normalization, on the flattened images."""
    mon, d = cfg.monitor, cfg.data
    kw = dict(mean=d.mean, std=d.std, batch_size=mon.batch_size)
    trf, trl = pixel_features(evenly_spaced(train_set, mon.train_subset), **kw)
    tef, tel = pixel_features(evenly_spaced(test_set, mon.test_subset), **kw)
    return _probes(trf, trl, tef, tel, mon)
