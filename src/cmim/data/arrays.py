"""Image sets held in memory as one uint8 array: Fashion-MNIST (IDX files) and CIFAR-10/100 (python batches,
read by an unpickler that refuses everything but arrays and containers)."""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cmim.data.base import BaseImageDataset, BitDepth, needs_float_pixels

__all__ = ["CIFAR", "DEFAULT_FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "FashionMNIST", "rgb_to_luma_u8"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip




def rgb_to_luma_u8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → (...) uint8 luma in PIL's fixed point, so arrays match ``Image.convert("L")``."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


class _ArrayDataset(BaseImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, 3); 1 → 3 channels is replicated per item."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], in_chans: int,
                 bit_depth: str = BitDepth.auto) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"{type(self).__name__} images have 1 or 3 channels, not data.in_chans={in_chans} "
                             "(other channel counts: data.name=folder)")
        if images.ndim == 4 and in_chans == 1:
            images = rgb_to_luma_u8(images)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.in_chans = in_chans
        self.float_pixels = needs_float_pixels(in_chans, bit_depth)  # data.bit_depth=full: float views of them
        self._replicate = self.images.ndim == 3 and in_chans == 3

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        img = self.images[index]
        if self._replicate:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return img, int(self.targets[index])


def _find_file(root: Path, name: str) -> Path:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in {root}")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian header, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{path}: IDX payload has {arr.size} bytes, header says {shape}")
    return arr.reshape(shape)


class FashionMNIST(_ArrayDataset):
    """Fashion-MNIST from the four IDX files (``.gz`` or uncompressed) in ``root``; split "train"/"test"."""

    def __init__(
        self, root: str | os.PathLike | None = None, split: str = "train", in_chans: int = 1,
        bit_depth: str = BitDepth.auto,
    ) -> None:
        root_p = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT)
        if not root_p.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST directory not found: {root_p}")
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        images = _read_idx(_find_file(root_p, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_file(root_p, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"Fashion-MNIST files in {root_p} have inconsistent shapes")
        super().__init__(images, labels, list(FASHION_MNIST_CLASSES), in_chans, bit_depth)
        self.root, self.split = root_p, split


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a CIFAR batch needs nothing else, and a file that asks
    for any other global (which is how a pickle runs code) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: the file references {module}.{name}, which a CIFAR batch never "
                                     "does (unpickling it could run code)")


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR python batch (official pickle format) with str keys; only arrays and containers."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({str(e) or type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (no dict inside)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


class CIFAR(_ArrayDataset):
    """CIFAR-10/100 from the python pickle batches (root may also be the parent of the extracted folder).

    CIFAR-100 uses the fine labels. Images are held as (N, 32, 32, 3) uint8, converted to luma if in_chans=1.
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train", num_classes: int = 10, in_chans: int = 3,
        bit_depth: str = BitDepth.auto,
    ) -> None:
        if num_classes not in (10, 100):
            raise ValueError(f"CIFAR num_classes must be 10 or 100, got {num_classes}")
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
        root_p = Path(root)
        if not root_p.is_dir():
            raise FileNotFoundError(f"CIFAR directory not found: {root_p}")
        sub = root_p / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
        if sub.is_dir():
            root_p = sub
        if num_classes == 10:
            names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
            label_key, meta_name, meta_key = "labels", "batches.meta", "label_names"
        else:
            names = [split]
            label_key, meta_name, meta_key = "fine_labels", "meta", "fine_label_names"
        missing = [n for n in names if not (root_p / n).is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-{num_classes} batch file(s) {missing} not found in {root_p}")
        batches = [_unpickle(root_p / n) for n in names]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        classes = [str(k) for k in range(num_classes)]
        if (root_p / meta_name).is_file():
            raw = _unpickle(root_p / meta_name).get(meta_key)
            if raw is not None and len(raw) == num_classes:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
        super().__init__(images, labels, classes, in_chans, bit_depth)
        self.root, self.split = root_p, split
