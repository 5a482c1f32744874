"""Base image datasets: items are ``(image, label)`` with no augmentation.

In-memory sets (Fashion-MNIST, CIFAR, synthetic) return uint8 numpy arrays (H, W) or (H, W, 3) so the
view pipeline can skip any decoding; folder sets return PIL images already converted to ``"L"``/``"RGB"``.
Every dataset delivers exactly ``in_chans`` channels, so downstream code never converts modes.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMG_EXTENSIONS",
    "CIFAR",
    "BaseImageDataset",
    "FashionMNIST",
    "ImageFolderDataset",
    "SubsetDataset",
    "SyntheticDataset",
    "build_base_dataset",
    "load_image",
    "scan_unreadable",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

ImageLike = Image.Image | np.ndarray


class BaseImageDataset(Dataset):
    """Common interface: ``(img, label)`` items plus ``classes``/``targets``/``num_skipped`` metadata.

    ``img`` is a PIL image (mode ``"L"``/``"RGB"``) or a uint8 array (H, W) / (H, W, 3); ``label`` is an
    int, -1 for unlabeled data. ``targets`` is an int64 array of all labels (-1 when unlabeled).
    """

    classes: list[str]
    targets: np.ndarray
    in_chans: int

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


def _check_in_chans(in_chans: int) -> int:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    return in_chans


def rgb_to_luma_u8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → (...) uint8 luma in PIL's fixed point, so arrays match ``Image.convert("L")``."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


class _ArrayDataset(BaseImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, 3); 1 → 3 channels is replicated per item."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], in_chans: int) -> None:
        _check_in_chans(in_chans)
        if images.ndim == 4 and in_chans == 1:
            images = rgb_to_luma_u8(images)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.in_chans = in_chans
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
        self, root: str | os.PathLike | None = None, split: str = "train", in_chans: int = 1
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
        super().__init__(images, labels, list(FASHION_MNIST_CLASSES), in_chans)
        self.root, self.split = root_p, split


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR python batch (official pickle format) with str keys. Only use trusted files."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


class CIFAR(_ArrayDataset):
    """CIFAR-10/100 from the python pickle batches (root may also be the parent of the extracted folder).

    CIFAR-100 uses the fine labels. Images are held as (N, 32, 32, 3) uint8, converted to luma if in_chans=1.
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train", num_classes: int = 10, in_chans: int = 3
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
        super().__init__(images, labels, classes, in_chans)
        self.root, self.split = root_p, split


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Rescale I;16 / I / F images to 8-bit "L" (PIL's own conversion clips everything above 255)."""
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0
    elif a.size and a.max() > 255:
        a = a / 257.0  # assume 16-bit data in a 32-bit container
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def convert_mode(im: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to "L" (in_chans=1) or "RGB" (in_chans=3); alpha is dropped, palettes expanded."""
    target = "L" if in_chans == 1 else "RGB"
    if im.mode == target:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_bit_depth_to_l(im)
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "La":  # premultiplied alpha converts only via "LA"
        im = im.convert("LA")
    if im.mode in ("LA", "L", "1"):
        im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return im.convert(target) if im.mode != target else im


def load_image(path: str | os.PathLike, in_chans: int) -> Image.Image:
    """Open, fully decode (so truncated files fail here) and convert an image file."""
    with Image.open(path) as im:
        im.load()
        out = convert_mode(im, in_chans)
        if out is im:
            out = im.copy()
    return out


def _list_images(folder: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return out


class ImageFolderDataset(BaseImageDataset):
    """A tree of image files; class sub-folders (sorted) give labels, a flat folder gives labels -1.

    Unreadable files (corrupt, truncated, not an image) never crash loading: the item falls through to
    the next readable index ``(i + 1) % len`` and the file is recorded once (one warning per file). The
    record is a uint8 flag per sample in *shared memory*, so files found bad inside DataLoader workers
    (fork or spawn) are counted in the main process's :attr:`num_skipped` too, each file once, and are not
    re-opened by later epochs.
    """

    def __init__(self, root: str | os.PathLike, in_chans: int = 3) -> None:
        self.root = str(root)
        self.in_chans = _check_in_chans(in_chans)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        subdirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        samples: list[tuple[str, int]] = []
        if subdirs:
            self.classes = subdirs
            for label, name in enumerate(subdirs):
                samples.extend((p, label) for p in _list_images(os.path.join(self.root, name)))
            loose = [
                e.name
                for e in os.scandir(self.root)
                if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
            ]
            if loose:
                log.warning("%s: ignoring %d image(s) outside the class sub-folders", self.root, len(loose))
        else:
            self.classes = []
            samples = [(p, -1) for p in _list_images(self.root)]
        if not samples:
            raise ValueError(
                f"no image files ({'/'.join(e[1:] for e in IMG_EXTENSIONS)}) found under {self.root}"
            )
        self.paths = [p for p, _ in samples]
        self.targets = np.array([t for _, t in samples], dtype=np.int64)
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()

    def _mark_bad(self, index: int, err: BaseException) -> None:
        if not self._bad[index]:
            log.warning("skipping unreadable image %s (%s: %s)", self.paths[index], type(err).__name__, err)
            self._bad[index] = 1

    def try_load(self, index: int) -> Image.Image | None:
        """Load sample ``index``, or record it as unreadable and return None."""
        try:
            return load_image(self.paths[index], self.in_chans)
        except Exception as err:  # decoders raise many exception types for broken files
            self._mark_bad(index, err)
            return None

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.paths)
        for k in range(n):
            i = (index + k) % n
            if self._bad[i]:
                continue
            img = self.try_load(i)
            if img is not None:
                return img, int(self.targets[i])
        raise RuntimeError(f"no readable image left in {self.root}")

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    @property
    def skipped_paths(self) -> list[str]:
        return [self.paths[i] for i in torch.nonzero(self._bad).flatten().tolist()]


# ----------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------


class SyntheticDataset(BaseImageDataset):
    """Procedural, learnable images: class = (bar orientation, number of parallel bars).

    Nuisances per image: position, scale, small rotation, bar thickness, intensities, a background gradient,
    pixel noise and (RGB) a colour tint. Up to 8 orientations × 1-3 bars keep ≤ 24 classes well separated
    (more classes still work, with more bars). Item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, in_chans: int = 1, seed: int = 0) -> None:
        if size <= 0 or num_classes <= 0 or img_size <= 0:
            raise ValueError("synthetic size, num_classes and img_size must be positive")
        self.in_chans = _check_in_chans(in_chans)
        self.img_size, self.seed = img_size, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]
        perm = np.random.default_rng([seed, 0x5EED]).permutation(size)
        self.targets = (perm % num_classes).astype(np.int64)
        self._n_orient = min(num_classes, 8)
        ax = (np.arange(img_size, dtype=np.float32) + 0.5) / img_size * 2.0 - 1.0
        self._yy, self._xx = np.meshgrid(ax, ax, indexing="ij")

    def render(self, index: int) -> np.ndarray:
        """Draw image ``index`` as uint8 (H, W) or (H, W, 3)."""
        c = int(self.targets[index])
        rng = np.random.default_rng([self.seed, 1, index])
        u = rng.random(12)
        theta = math.pi * (c % self._n_orient) / self._n_orient + 0.12 * (u[0] - 0.5)
        n_bars = 1 + c // self._n_orient
        scale = 0.8 + 0.3 * u[1]
        cx, cy = 0.3 * (u[2] - 0.5), 0.3 * (u[3] - 0.5)
        width = scale * (0.22 + 0.08 * u[4]) / math.sqrt(n_bars)
        spacing = 2.2 * width
        length = scale * 1.4
        x, y = self._xx - cx, self._yy - cy
        cos, sin = math.cos(theta), math.sin(theta)
        along, across = x * cos + y * sin, -x * sin + y * cos
        offsets = (np.arange(n_bars, dtype=np.float32) - (n_bars - 1) / 2) * spacing
        dist = np.abs(across[..., None] - offsets).min(axis=-1)
        soft = 2.0 / self.img_size  # ~1 pixel anti-aliased edge
        mask = np.clip((width / 2 - dist) / soft + 0.5, 0, 1) * np.clip(
            (length / 2 - np.abs(along)) / soft + 0.5, 0, 1
        )
        bg = (
            0.05
            + 0.2 * u[5]
            + 0.1 * (u[6] - 0.5) * (self._xx * math.cos(6.3 * u[7]) + self._yy * math.sin(6.3 * u[7]))
        )
        fg = 0.65 + 0.35 * u[8]
        img = bg + mask * (fg - bg)
        if self.in_chans == 3:
            tint = 0.75 + 0.25 * rng.random(3)
            img = img[..., None] * tint
        img = img + rng.normal(0.0, 0.04, size=img.shape)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self.targets):
            raise IndexError(index)
        return self.render(index), int(self.targets[index])


# ----------------------------------------------------------------------------------------------------
# Subsets, scanning, factory
# ----------------------------------------------------------------------------------------------------


class SubsetDataset(BaseImageDataset):
    """A fixed selection of a base dataset's samples, keeping its metadata and skip accounting."""

    def __init__(self, base: BaseImageDataset, indices: Sequence[int] | np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = base.targets[self.indices]
        self.classes = base.classes
        self.in_chans = base.in_chans

    def __getitem__(self, index: int) -> tuple[ImageLike, int]:
        return self.base[int(self.indices[index])]

    @property
    def num_skipped(self) -> int:
        return self.base.num_skipped

    @property
    def skipped_paths(self) -> list[str]:
        return self.base.skipped_paths


def scan_unreadable(dataset: BaseImageDataset) -> list[str]:
    """Decode every file of a folder dataset now; return (and record as skipped) the unreadable paths.

    Costs one full pass over the files, so it is meant for small data and tests. In-memory sets return [].
    """
    if isinstance(dataset, SubsetDataset):
        base = dataset.base
        indices = dataset.indices.tolist()
    else:
        base, indices = dataset, list(range(len(dataset)))
    if not isinstance(base, ImageFolderDataset):
        return []
    bad = [base.paths[i] for i in indices if base._bad[i] or base.try_load(i) is None]
    return sorted(set(bad))


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def build_base_dataset(cfg: Any, split: str) -> BaseImageDataset:
    """Build the un-augmented dataset of ``split`` (a split name such as ``cfg.train_split``) from ``cfg``.

    ``cfg.subset`` keeps the first ``subset`` samples; for folder trees with class sub-folders (stored
    sorted by class) it keeps ``subset`` evenly spaced samples instead so every class stays represented.
    """
    name = str(cfg.name).lower()
    in_chans = int(_cfg(cfg, "in_chans", 3))
    root = getattr(cfg, "root", None)
    ds: BaseImageDataset
    if name == "fashion-mnist":
        ds = FashionMNIST(root, split, in_chans=in_chans)
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"data.root must be set for {name}")
        ds = CIFAR(root, split, num_classes=10 if name == "cifar10" else 100, in_chans=in_chans)
    elif name == "folder":
        if root is None:
            raise ValueError("data.root must be set for the folder dataset")
        ds = ImageFolderDataset(os.path.join(str(root), split) if split else str(root), in_chans=in_chans)
    elif name == "synthetic":
        seed = zlib.crc32(str(split).encode())  # different, fixed images per split
        ds = SyntheticDataset(
            int(_cfg(cfg, "synthetic_size", 1000)),
            int(_cfg(cfg, "synthetic_classes", 10)),
            int(cfg.img_size),
            in_chans,
            seed=seed,
        )
    else:
        raise ValueError(
            f"unknown dataset name {cfg.name!r} (fashion-mnist, folder, synthetic, cifar10, cifar100)"
        )
    subset = getattr(cfg, "subset", None)
    if subset is not None and int(subset) < len(ds):
        n, m = len(ds), int(subset)
        if isinstance(ds, ImageFolderDataset) and ds.classes:
            indices = (np.arange(m) * n) // m
        else:
            indices = np.arange(m)
        ds = SubsetDataset(ds, indices)
    return ds
