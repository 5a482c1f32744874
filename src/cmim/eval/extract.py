"""Frozen features of a dataset: the pooled features of an encoder, or the raw pixels of the baseline.

The one feature extractor of k-NN, the linear probe's cache (:mod:`cmim.eval.feature_cache`), the training
monitors, ``cmim embed``, the pipeline and the plots; each batch goes through the one prediction loop
(:mod:`cmim.eval.predict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cmim.eval.predict import eval_mode, predict, predict_batches
from cmim.models import MaskedEncoder

__all__ = ["extract_features", "extract_pooled", "pixel_features", "pooled_batches"]


def extract_features(encoder: MaskedEncoder, dataset: Dataset, *, feature: str = "mean",
                     mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                     device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                     precision: str = "bf16") -> tuple[Tensor, Tensor]:
    """Pooled features (float32, CPU) and labels of every sample of an :class:`EvalDataset`."""
    feats, labels = extract_pooled(encoder, dataset, (feature,), mean=mean, std=std, device=device,
                                   batch_size=batch_size, num_workers=num_workers, precision=precision)
    return feats[feature], labels


def extract_pooled(encoder: MaskedEncoder, dataset: Dataset, features: tuple[str, ...], *,
                   mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                   device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                   precision: str = "bf16") -> tuple[dict[str, Tensor], Tensor]:
    """Several pooled features of every sample in one encoder pass: {feature: (N, D) float32 CPU}, labels."""
    feats: dict[str, list[Tensor]] = {f: [] for f in features}
    labels = []
    for pooled, batch in pooled_batches(encoder, dataset, features, mean=mean, std=std, device=device,
                                        batch_size=batch_size, num_workers=num_workers, precision=precision):
        for f in features:
            feats[f].append(pooled[f])
        labels.append(batch["label"])
    return {f: torch.cat(v) for f, v in feats.items()}, torch.cat(labels)


def pooled_batches(encoder: MaskedEncoder, dataset: Dataset, features: tuple[str, ...], *,
                   mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                   device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                   precision: str = "bf16") -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Batch by batch, in dataset order: ({feature: (B, D) float32 CPU}, the batch as loaded). The loop under
    :func:`extract_pooled`, also used where results are written as they come (``cmim embed``'s chunks). The
    tokens come out of autocast; they are pooled outside it."""
    with eval_mode(encoder):
        for tokens, batch in predict_batches(encoder, dataset, mean=mean, std=std, device=device,
                                             precision=precision, batch_size=batch_size, num_workers=num_workers):
            with torch.no_grad():
                pooled = {f: MaskedEncoder.pool(tokens, f).float().cpu() for f in features}
            yield pooled, batch


def pixel_features(dataset: Dataset, *, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                   batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """The raw-pixel baseline's features: each eval image normalized with the data's mean/std and flattened,
    the same images the encoders see (float32, CPU), and the labels."""
    return predict(lambda x: x.flatten(1), dataset, mean=mean, std=std, device="cpu", precision="fp32",
                   batch_size=batch_size, num_workers=num_workers)
