"""Frozen features of datasets (encoders and raw pixels) and the k-NN evaluations on them; the k-NN math
itself is :mod:`cmim.core.knn`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from cmim.core.knn import knn_accuracy
from cmim.core.precision import autocast
from cmim.data.augment import normalize
from cmim.models import MaskedEncoder


def extract_features(encoder: MaskedEncoder, dataset: Dataset, *, feature: str = "mean", mean=(0.5,),
                     std=(0.5,), device: torch.device | str = "cpu", batch_size: int = 256,
                     num_workers: int = 0, precision: str = "bf16") -> tuple[Tensor, Tensor]:
    """Pooled features (float32, CPU) and labels of every sample of an :class:`EvalDataset`."""
    feats, labels = extract_pooled(encoder, dataset, (feature,), mean=mean, std=std, device=device,
                                   batch_size=batch_size, num_workers=num_workers, precision=precision)
    return feats[feature], labels


def extract_pooled(encoder: MaskedEncoder, dataset: Dataset, features: tuple[str, ...], *, mean=(0.5,),
                   std=(0.5,), device: torch.device | str = "cpu", batch_size: int = 256,
                   num_workers: int = 0, precision: str = "bf16") -> tuple[dict[str, Tensor], Tensor]:
    """Several pooled features of every sample in one encoder pass: {feature: (N, D) float32 CPU}, labels.
    The one feature extractor of k-NN, the linear probe's cache, the monitor, the pipeline and the plots."""
    feats: dict[str, list[Tensor]] = {f: [] for f in features}
    labels = []
    for pooled, batch in pooled_batches(encoder, dataset, features, mean=mean, std=std, device=device,
                                        batch_size=batch_size, num_workers=num_workers, precision=precision):
        for f in features:
            feats[f].append(pooled[f])
        labels.append(batch["label"])
    return {f: torch.cat(v) for f, v in feats.items()}, torch.cat(labels)


def pooled_batches(encoder: MaskedEncoder, dataset: Dataset, features: tuple[str, ...], *, mean=(0.5,),
                   std=(0.5,), device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                   precision: str = "bf16") -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Batch by batch, in dataset order: ({feature: (B, D) float32 CPU}, the batch as loaded). The loop under
    :func:`extract_pooled`, also used where results are written as they come (``cmim embed``'s chunks)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    mixed_precision = autocast(device, precision)
    try:
        for batch in loader:
            with torch.no_grad():
                x = normalize(batch["image"].to(device, non_blocking=True), mean, std)
                with mixed_precision:
                    tokens = encoder(x)
                pooled = {f: MaskedEncoder.pool(tokens, f).float().cpu() for f in features}
            yield pooled, batch
    finally:
        encoder.train(was_training)


def first_n(dataset: Dataset, n: int | None) -> Dataset:
    """A deterministic subset of a dataset: evenly spaced samples (keeps the class mix of sorted folders)."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    step = len(dataset) / n  # type: ignore[arg-type]
    return Subset(dataset, [int(i * step) for i in range(n)])


def online_knn(encoder: MaskedEncoder, train_set: Dataset, test_set: Dataset, cfg: Any,
               device: torch.device) -> dict[str, float]:
    """The training monitor: k-NN top-1 of ``encoder`` on labeled subsets, with the monitor config."""
    mon, d = cfg.monitor, cfg.data
    kw = dict(feature=mon.feature, mean=d.mean, std=d.std, device=device, batch_size=mon.batch_size,
              precision=cfg.train.precision)
    trf, trl = extract_features(encoder, first_n(train_set, mon.train_subset), **kw)
    tef, tel = extract_features(encoder, first_n(test_set, mon.test_subset), **kw)
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


@torch.no_grad()
def pixel_features(dataset: Dataset, *, mean=(0.5,), std=(0.5,), batch_size: int = 256,
                   num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """The raw-pixel baseline's features: each eval image normalized with the data's mean/std and flattened,
    the same images the encoders see (float32, CPU), and the labels."""
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        feats.append(normalize(batch["image"], list(mean), list(std)).flatten(1))
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def pixel_knn(train_set: Dataset, test_set: Dataset, cfg: Any) -> dict[str, float]:
    """The monitor's raw-pixel baseline: the same k-NN, subsets and normalization, on the flattened images."""
    mon, d = cfg.monitor, cfg.data
    kw = dict(mean=d.mean, std=d.std, batch_size=mon.batch_size)
    trf, trl = pixel_features(first_n(train_set, mon.train_subset), **kw)
    tef, tel = pixel_features(first_n(test_set, mon.test_subset), **kw)
    return _probes(trf, trl, tef, tel, mon)
