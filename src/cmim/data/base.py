"""What every base dataset is: ``(image, label)`` items with no augmentation, and the rule for float pixels.

In-memory sets (Fashion-MNIST, CIFAR, synthetic) return uint8 numpy arrays (H, W) or (H, W, 3) so the view
pipeline can skip any decoding; folder sets return PIL images already converted to ``"L"``/``"RGB"``
(:mod:`cmim.data.folder`). Every dataset delivers exactly ``in_chans`` channels, so downstream code never
converts modes.

Other channel counts and full bit depth (``data.in_chans`` not 1 or 3, or ``data.bit_depth=full``): a dataset
with :attr:`BaseImageDataset.float_pixels` set is turned into float32 views; its folder items are float32
arrays (H, W, C) in [0, 1] read at the file's full depth (:func:`cmim.data.pixels.load_pixels`), and its 8-bit
items are divided by 255 by the view stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from cmim.core.choices import Choice

__all__ = ["BaseImageDataset", "BitDepth", "DecodeMode", "EncodedJpeg", "ImageLike", "ImageView", "SkipRecord",
           "check_in_chans", "find_base", "needs_float_pixels"]


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes and header facts, for decoding on the device (``data.decode=device``): the worker
    reads the file and draws the crop boxes; the pixels are decoded in the training step."""

    data: np.ndarray  # uint8 (num_bytes,)
    width: int
    height: int


ImageLike = Image.Image | np.ndarray | EncodedJpeg


class BaseImageDataset(Dataset):
    """Common interface: ``(img, label)`` items plus ``classes``/``targets``/``num_skipped`` metadata.

    ``img`` is a PIL image (mode ``"L"``/``"RGB"``) or a uint8 array (H, W) / (H, W, 3); ``label`` is an
    int, -1 for unlabeled data. ``targets`` is an int64 array of all labels (-1 when unlabeled).
    """

    classes: list[str]
    targets: np.ndarray
    in_chans: int
    #: the view stage makes float32 views: items may be float32 (H, W, C) arrays in [0, 1] (8-bit items are / 255)
    float_pixels: bool = False

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[ImageLike, int]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far (always 0 for in-memory sets)."""
        return 0

    @property
    def skipped_paths(self) -> list[str]:
        return []

    def selection(self) -> tuple[BaseImageDataset, np.ndarray] | None:
        """``(source, indices)`` when item ``i`` is item ``indices[i]`` of ``source`` (a subset); None when the
        dataset holds its own samples. Skip accounting follows it down to the files (:mod:`cmim.data.folder`)."""
        return None

    def decoding_on_cpu(self) -> BaseImageDataset:
        """The same samples with every file decoded on the CPU (what the device decoder falls back to for a file
        it cannot decode); itself for datasets that never hand out undecoded files."""
        return self


class ImageView(Dataset):
    """A dataset whose item ``i`` is made from item ``i`` of :attr:`base` (crops, an eval resize): the same
    samples in the same order, so skip accounting looks through it to ``base``."""

    base: BaseImageDataset


class SkipRecord:
    """What a dataset of files or samples that may be unreadable shares: a uint8 flag per sample (1: skipped) in
    shared memory, set by whichever loader worker met it and merged over processes, so the run lists each
    unreadable sample once (``skipped.txt``). Subclasses set ``_bad`` and say how a sample is named and why it
    was skipped; listed before :class:`BaseImageDataset` in their bases, whose counts (none) it replaces."""

    _bad: torch.Tensor
    targets: np.ndarray

    @property
    def skip_flags(self) -> torch.Tensor:
        """The uint8 flag per sample (1: unreadable) in shared memory, which multi-process runs merge."""
        return self._bad

    def skipped_indices(self) -> np.ndarray:
        return torch.nonzero(self._bad).flatten().numpy()

    def is_skipped(self, index: int) -> bool:
        return bool(self._bad[index])

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    def first_readable(self, order: Iterable[int], requested: int) -> tuple[Any, int]:
        """(item, label) of the first readable sample of ``order``; only a failure of ``requested`` itself is
        recorded (the others are met again as themselves)."""
        for i in order:
            if self._bad[i]:
                continue
            item = self.try_load(i, record=i == requested)
            if item is not None:
                return item, int(self.targets[i])
        raise RuntimeError(self.nothing_readable())

    def try_load(self, index: int, record: bool = True) -> Any:
        """The decoded sample, or None when it is unreadable (flagged when ``record``)."""
        raise NotImplementedError

    def nothing_readable(self) -> str:
        """The error when no sample is readable."""
        raise NotImplementedError

    @property
    def skipped_paths(self) -> list[str]:
        return [self.sample_name(i) for i in self.skipped_indices().tolist()]

    def sample_name(self, index: int) -> str:
        """How lists and warnings name sample ``index`` (a file's path)."""
        raise NotImplementedError

    def why_unreadable(self, index: int) -> str:
        """The reason sample ``index`` is skipped, found again (the worker that met it kept no text)."""
        raise NotImplementedError


T = TypeVar("T")


def find_base(dataset: Any, kind: type[T]) -> tuple[T, list[int] | None] | None:
    """The dataset of type ``kind`` under any wrappers and the selection of it (None: all of it); None when there
    is none. Wrappers are looked through by what they declare: an :class:`ImageView` has its base's samples, a
    :meth:`BaseImageDataset.selection` or a torch ``Subset`` picks some of them."""
    obj, indices = dataset, None
    while not isinstance(obj, kind):
        if isinstance(obj, ImageView):
            obj = obj.base
            continue
        if isinstance(obj, Subset):
            source, sel = obj.dataset, [int(i) for i in obj.indices]
        elif isinstance(obj, BaseImageDataset) and (picked := obj.selection()) is not None:
            source, sel = picked[0], picked[1].tolist()
        else:
            return None
        indices = sel if indices is None else [sel[i] for i in indices]
        obj = source
    return obj, indices


def check_in_chans(in_chans: int) -> int:
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return int(in_chans)


# ``data.bit_depth``: "auto" (8 bits for 1- and 3-channel runs, 16-bit files rounded; full depth otherwise), "8",
# or "full" (every file at its own depth, scaled to [0, 1])
BitDepth = Choice("BitDepth", ["auto", "8", "full"])


def needs_float_pixels(in_chans: int, bit_depth: str = "auto") -> bool:
    """Whether a run's views are float32 from float items instead of uint8 images: any channel count but 1 or 3
    (PIL has no such modes), or ``data.bit_depth=full`` (16-bit files keep their depth)."""
    return int(in_chans) not in (1, 3) or BitDepth(bit_depth) is BitDepth.full


class DecodeMode(Choice):
    """``data.decode``: where pre-training decodes a folder's JPEG files. "cpu": PIL in the loader workers;
    "device": the workers hand over the bytes (:class:`EncodedJpeg`) and the step decodes them
    (:mod:`cmim.data.decode`)."""

    cpu = "cpu"
    device = "device"
