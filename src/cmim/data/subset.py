"""A fixed selection of a base dataset's samples (``data.subset``, the parts of a split folder)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmim.data.base import BaseImageDataset, ImageLike
from cmim.data.folder import ImageFolderDataset

__all__ = ["SubsetDataset"]


class SubsetDataset(BaseImageDataset):
    """A fixed selection of a base dataset's samples, keeping its metadata and skip accounting.

    Folder items fall through to the next readable file *of the selection*, so a train partition never
    serves a held-out file; skip counts cover the selection's own files.
    """

    def __init__(self, base: BaseImageDataset, indices: Sequence[int] | np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(base, SubsetDataset):  # flatten, so the folder is always one level down
            base, indices = base.base, base.indices[indices]
        self.base = base
        self.indices = indices
        self.targets = base.targets[self.indices]
        self.classes = base.classes
        self.in_chans = base.in_chans

    @property
    def float_pixels(self) -> bool:  # type: ignore[override]
        return self.base.float_pixels

    def selection(self) -> tuple[BaseImageDataset, np.ndarray]:
        return self.base, self.indices

    def decoding_on_cpu(self) -> BaseImageDataset:
        base = self.base.decoding_on_cpu()
        return self if base is self.base else SubsetDataset(base, self.indices)

    def __getitem__(self, index: int) -> tuple[ImageLike, int]:
        if isinstance(self.base, ImageFolderDataset):
            n = len(self.indices)
            index = int(index) % n
            order = (int(self.indices[(index + k) % n]) for k in range(n))
            return self.base.first_readable(order, requested=int(self.indices[index]))
        return self.base[int(self.indices[index])]

    def _skipped_indices(self) -> list[int]:
        if not isinstance(self.base, ImageFolderDataset):
            return []
        return sorted(set(self.base.skipped_indices().tolist()) & set(self.indices.tolist()))

    @property
    def num_skipped(self) -> int:
        return len(self._skipped_indices())

    @property
    def skipped_paths(self) -> list[str]:
        return [self.base.paths[i] for i in self._skipped_indices()]  # type: ignore[attr-defined]
