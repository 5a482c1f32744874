"""The one prediction loop of evaluation: a dataset in order, each batch normalized on the device and sent through
a model without gradients under the run's autocast.

Feature extraction (:mod:`cmim.eval.extract`: k-NN, the linear probe's cache, the monitors, ``cmim embed``), the
linear probe's and fine-tuning's test passes and the raw-pixel baseline all run it, so they read the same images
in the same order with the same normalization and precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cmim.core.precision import autocast
from cmim.data.augment import normalize

__all__ = ["eval_mode", "predict", "predict_batches"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode for the block, each back in its own mode afterwards."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was):
            m.train(mode)


def predict_batches(forward: Callable[[Tensor], Any], dataset: Dataset, *, mean: Sequence[float],
                    std: Sequence[float], device: torch.device | str = "cpu", precision: str = "bf16",
                    batch_size: int = 256, num_workers: int = 0) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Batch by batch, in dataset order: (``forward(images)``, the batch as loaded). The images are moved to
    ``device`` and normalized with ``mean``/``std``; ``forward`` runs under ``torch.no_grad`` and the autocast of
    ``precision`` (:func:`cmim.core.precision.autocast`). Whatever the caller does with an output happens
    outside both, in full precision (a probe's head, pooling several features, writing a chunk)."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    mixed_precision = autocast(device, precision)
    for batch in loader:
        with torch.no_grad():
            x = normalize(batch["image"].to(device, non_blocking=True), list(mean), list(std))
            with mixed_precision:
                out = forward(x)
        yield out, batch


@torch.no_grad()
def predict(forward: Callable[[Tensor], Tensor], dataset: Dataset, *, head: Callable[[Tensor], Tensor] | None = None,
            **loop: Any) -> tuple[Tensor, Tensor]:
    """Every output of :func:`predict_batches` (``loop``: its keyword arguments), through ``head`` (outside
    autocast) when given, as float32 on the CPU, and the labels: ((N, ...), (N,))."""
    outs, labels = [], []
    for out, batch in predict_batches(forward, dataset, **loop):
        outs.append((head(out) if head is not None else out).float().cpu())
        labels.append(batch["label"])
    return torch.cat(outs), torch.cat(labels)
