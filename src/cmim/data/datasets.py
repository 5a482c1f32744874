"""Base image datasets: items are ``(image, label)`` with no augmentation.

In-memory sets (Fashion-MNIST, CIFAR, synthetic) return uint8 numpy arrays (H, W) or (H, W, 3) so the
view pipeline can skip any decoding; folder sets return PIL images already converted to ``"L"``/``"RGB"``
(transparency composited over ``data.background``). Every dataset delivers exactly ``in_chans`` channels,
so downstream code never converts modes. Unreadable or oversized files of a folder are skipped and
recorded, never fatal (:class:`ImageFolderDataset`, :func:`skip_report`).

Other channel counts and full bit depth (``data.in_chans`` not 1 or 3, or ``data.bit_depth=full``): a dataset
with :attr:`BaseImageDataset.float_pixels` set is turned into float32 views; its folder items are float32
arrays (H, W, C) in [0, 1] read at the file's full depth (:func:`load_pixels`: multi-band TIFF, 16-bit PNG,
``.npy``), and its 8-bit items are divided by 255 by the view stage.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import pickle
import threading
import warnings
import weakref
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cmim.core.cpus import loader_workers
from cmim.core.errors import ConfigError
from cmim.core.io import atomic_write_text
from cmim.data.cache import DecodedCache, default_cache_dir
from cmim.data.splits import DEFAULT_TWIN_COSINE, held_out_mask, twin_groups

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EncodedJpeg",
    "IMG_EXTENSIONS",
    "CIFAR",
    "BaseImageDataset",
    "FashionMNIST",
    "ImageFolderDataset",
    "BIT_DEPTHS",
    "ChannelMismatch",
    "ImageTooLarge",
    "SubsetDataset",
    "SyntheticDataset",
    "all_reduce_skips",
    "build_base_dataset",
    "check_channels",
    "check_folder_channels",
    "composite_on",
    "convert_mode",
    "fit_channels",
    "needs_float_pixels",
    "image_channels",
    "load_image",
    "load_pixels",
    "read_skip_list",
    "scan_unreadable",
    "skip_report",
    "skipped_files",
    "write_skip_list",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".npy")
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


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


def _check_in_chans(in_chans: int) -> int:
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return int(in_chans)


BIT_DEPTHS = ("auto", "8", "full")


def needs_float_pixels(in_chans: int, bit_depth: str = "auto") -> bool:
    """Whether a run's views are float32 from float items instead of uint8 images: any channel count but 1 or 3
    (PIL has no such modes), or ``data.bit_depth=full`` (16-bit files keep their depth)."""
    if str(bit_depth) not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, got {bit_depth!r}")
    return int(in_chans) not in (1, 3) or str(bit_depth) == "full"


def rgb_to_luma_u8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → (...) uint8 luma in PIL's fixed point, so arrays match ``Image.convert("L")``."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


class _ArrayDataset(BaseImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, 3); 1 → 3 channels is replicated per item."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"{type(self).__name__} images have 1 or 3 channels, not data.in_chans={in_chans} "
                             "(other channel counts: data.name=folder)")
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

# PIL's own default (1024 * 1024 * 1024 // 4 // 3): a 3-channel 8-bit image of 256 MiB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Transparent pixels become this colour: most images with alpha (product photos, icons, logos) are made to
# be shown on a white page, so white keeps them looking as intended; black would turn them into silhouettes.
DEFAULT_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "RGBa", "La", "PA")
# guards the temporary change of PIL's process-wide pixel limit (threads sharing one process)
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLarge(ValueError):
    """The image header declares more pixels than ``data.max_image_pixels``; nothing was decoded."""


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


def has_alpha(im: Image.Image) -> bool:
    """An alpha channel, or a transparency entry (palette index, grey level or RGB colour of a PNG tRNS)."""
    return im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def composite_on(im: Image.Image, background: Sequence[int] = DEFAULT_BACKGROUND) -> Image.Image:
    """``im`` over an opaque ``background`` colour, as "RGB": transparent pixels become the background
    instead of whatever colour happens to be stored under alpha 0 (often black, or noise)."""
    if im.mode == "La":  # premultiplied alpha converts only via "LA"
        im = im.convert("LA")
    rgba = im.convert("RGBA")  # also un-premultiplies "RGBa" and applies palette / tRNS transparency
    bg = Image.new("RGBA", rgba.size, (*(int(v) for v in background), 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def convert_mode(im: Image.Image, in_chans: int, background: Sequence[int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any PIL mode to "L" (in_chans=1) or "RGB" (in_chans=3).

    Transparency (RGBA, LA, PA, premultiplied RGBa/La, palette or tRNS transparency) is composited over
    ``background`` first, so hidden colour under alpha 0 never reaches the model; high bit depths are
    rescaled, palettes expanded, CMYK/YCbCr/... converted through RGB.
    """
    target = "L" if in_chans == 1 else "RGB"
    if im.mode == target and not has_alpha(im):
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_bit_depth_to_l(im)
    elif has_alpha(im):
        im = composite_on(im, background)
    elif im.mode not in ("L", "RGB", "1"):
        im = im.convert("RGB")  # P, CMYK, YCbCr, HSV, ...
    return im if im.mode == target else im.convert(target)


def _open_checked(path: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (lazy: header only) with our pixel limit instead of PIL's warning.

    PIL warns (``DecompressionBombWarning``, printed for every image in every epoch) above its limit and
    raises above twice that; we open with PIL's check off and reject over ``max_pixels`` ourselves, before
    anything is decoded, so an oversized file is one recorded skip. When ``max_pixels`` is above PIL's limit
    (or None), PIL's limit is raised to it for the process, else PIL would warn again on crops of the images
    we accepted.
    """
    with _PIL_LIMIT_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is not None and (max_pixels is None or max_pixels > pil_limit):
            pil_limit = max_pixels
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise ImageTooLarge(f"over data.max_image_pixels ({width} x {height})")
    return im


def load_image(
    path: str | os.PathLike,
    in_chans: int,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    background: Sequence[int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Open (size checked from the header), fully decode (so truncated files fail here) and convert. ``.npy`` files
    and TIFFs PIL would misread (bands as pages, multi-band samples) go through :func:`load_pixels`, rounded to 8
    bits; a file whose channels do not fit raises :class:`ChannelMismatch`."""
    if _needs_arrays(path):
        return _quantize(load_pixels(path, in_chans, max_pixels, background))
    with _open_checked(path, max_pixels) as im:
        im.load()
        out = convert_mode(im, in_chans, background)
        if out is im:
            out = im.copy()
    return out


def read_jpeg(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> EncodedJpeg | None:
    """The file as :class:`EncodedJpeg` when the device decoder can take it (a JPEG of mode L or RGB, within
    ``max_pixels``), None for anything else (PNG, CMYK JPEG, ...: decoded on the CPU as usual). Raises, like
    :func:`load_image`, for files that cannot be read, including a JPEG cut short (no end-of-image marker):
    the cheap checks that let a broken file be skipped in the worker instead of failing the device batch."""
    with _open_checked(path, max_pixels) as im:
        if im.format != "JPEG" or im.mode not in ("L", "RGB"):
            return None
        width, height = im.size
    with open(path, "rb") as f:
        data = f.read()
    if b"\xff\xd9" not in data[-64:]:
        raise OSError("truncated JPEG (no end-of-image marker)")
    return EncodedJpeg(np.frombuffer(data, dtype=np.uint8), width, height)


# ----------------------------------------------------------------------------------------------------
# Any channel count, full bit depth
# ----------------------------------------------------------------------------------------------------

TIFF_EXTENSIONS = (".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> (channels, alpha); palette files (3) are expanded to RGB, their transparency found on decoding
_PNG_COLOUR_TYPES = {0: (1, False), 2: (3, False), 3: (3, False), 4: (2, True), 6: (4, True)}


class ChannelMismatch(ConfigError):
    """A file whose channels cannot become ``data.in_chans`` channels (e.g. a 4-band TIFF in an RGB run): a
    setting to change, which the one-line message names; recorded as a skip when only some files differ."""


@dataclass(frozen=True)
class _Pixels:
    """Decoded pixels before they are fitted to ``in_chans``: float32 (H, W, C) in [0, 1]; an alpha channel, when
    there is one, is the last."""

    data: np.ndarray
    alpha: bool = False
    premultiplied: bool = False


def _unit_scale(dtype: np.dtype, bits: int | None = None) -> float | None:
    """The stored value that becomes 1.0: the largest value of ``bits`` (a TIFF's BitsPerSample, e.g. 12 for
    12-bit data unpacked into uint16) or else of the unsigned type; None for floats (taken as they are: expected in
    [0, 1]) and booleans."""
    if dtype.kind == "u":
        width = np.iinfo(dtype).bits
        return float(2 ** (bits if bits and 0 < bits < width else width) - 1)
    if dtype.kind in "fb":
        return None
    raise ValueError(f"{dtype} pixels are not supported (store unsigned integers, or floats in [0, 1])")


def _to_unit(a: np.ndarray, bits: int | None = None) -> np.ndarray:
    scale = _unit_scale(a.dtype, bits)
    out = np.array(a, dtype=np.float32)  # always a copy: memory maps and shared arrays stay untouched
    if scale is not None:
        out /= np.float32(scale)
    return out if out.ndim == 3 else out[:, :, None]


def _check_pixels(path: str | os.PathLike, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLarge(f"over data.max_image_pixels ({width} x {height})")


def _fits(channels: int, alpha: bool, in_chans: int) -> bool:
    """The channel rule: a file with exactly ``in_chans`` channels is used as it is (an alpha channel included);
    1- and 3-channel runs also take grey or colour files with or without alpha (composited, converted)."""
    colour = channels - 1 if alpha else channels
    return channels == in_chans or (in_chans in (1, 3) and colour in (1, 3))


def _mismatch(path: str | os.PathLike, channels: int, alpha: bool, in_chans: int) -> ChannelMismatch:
    what = f"{channels} channels" + (" (the last is alpha)" if alpha else "")
    return ChannelMismatch(f"{path} has {what} but data.in_chans={in_chans}: set data.in_chans={channels} "
                           "(every image of a run needs the same channels)")


def fit_channels(px: _Pixels, in_chans: int, background: Sequence[int] = DEFAULT_BACKGROUND,
                 path: str | os.PathLike = "image") -> np.ndarray:
    """``px`` as float32 (H, W, in_chans) by :func:`_fits`: as it is, or alpha composited over ``background`` and
    grey/colour converted (PIL's luma weights) like the 8-bit path does; else :class:`ChannelMismatch`."""
    a = px.data
    c = a.shape[2]
    if c == in_chans:
        return a
    if not _fits(c, px.alpha, in_chans):
        raise _mismatch(path, c, px.alpha, in_chans)
    colour = c - 1 if px.alpha else c
    col = a[:, :, :colour]
    if px.alpha:
        alpha = a[:, :, colour:]
        col = np.repeat(col, 3, axis=2) if colour == 1 else col
        bg = np.asarray(background, dtype=np.float32) / np.float32(255.0)
        col = col + bg * (1.0 - alpha) if px.premultiplied else col * alpha + bg * (1.0 - alpha)
        colour = 3
    if in_chans == 1 and colour == 3:
        col = (col @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    elif in_chans == 3 and colour == 1:
        col = np.repeat(col, 3, axis=2)
    return np.ascontiguousarray(col, dtype=np.float32)


def _npy_shape(path: str | os.PathLike) -> tuple[int, ...]:
    return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)


def _read_npy(path: str | os.PathLike, max_pixels: int | None) -> _Pixels:
    """An ``.npy`` array (H, W) or (H, W, C), never unpickled (``allow_pickle=False``): every channel is data."""
    shape = _npy_shape(path)
    if len(shape) not in (2, 3):
        raise ValueError(f"a .npy image must be (H, W) or (H, W, C), not {shape}")
    _check_pixels(path, shape[0], shape[1], max_pixels)
    return _Pixels(_to_unit(np.load(path, allow_pickle=False)))


@dataclass(frozen=True)
class _TiffLayout:
    """What the header of a TIFF's first series says: channels, where they are, and how to read them."""

    shape: tuple[int, ...]
    channel_axis: int | None  # None: one 2-D plane
    channels: int
    alpha: bool
    premultiplied: bool
    bits: int
    direct: bool  # plain grey/RGB/multi-band samples (tifffile); False: palette, YCbCr, CMYK, ... (PIL reads them)
    one_page: bool  # a single page (with or without samples): PIL reads the same pixels

    @property
    def standard(self) -> bool:
        """What PIL reads correctly, so the 8-bit path keeps reading it with PIL: one page of grey or colour."""
        colour = self.channels - 1 if self.alpha else self.channels
        return not self.direct or (self.one_page and colour in (1, 3))


def _tiff_layout(tif: Any) -> _TiffLayout:
    """The layout rule: a 2-D series is one channel; in a 3-D series the samples-per-pixel axis holds the channels
    when the file has one, else the first or last axis, whichever is smaller (ties: the last), so (C, H, W) pages
    and (H, W, C) arrays (which tifffile writes as H pages of W x C) both give C channels."""
    import tifffile

    series, page = tif.series[0], tif.pages[0]
    shape, axes = tuple(int(n) for n in series.shape), str(series.axes)
    ph = tifffile.PHOTOMETRIC
    direct = page.photometric in (ph.MINISBLACK, ph.RGB) or (page.photometric == ph.SEPARATED
                                                             and page.samplesperpixel != 4)
    extras = [int(e) for e in (page.extrasamples or ())]
    if len(shape) == 2:
        axis = None
    elif len(shape) == 3:
        axis = axes.index("S") if "S" in axes else (0 if shape[0] < shape[2] else 2)
    else:
        raise ValueError(f"a TIFF image must be 2-D or 3-D, not {shape} (axes {axes})")
    channels = 1 if axis is None else shape[axis]
    alpha = axis is not None and "S" in axes and bool(extras) and extras[-1] in (1, 2)  # associated / unassociated
    return _TiffLayout(shape, axis, channels, alpha, alpha and extras[-1] == 1, int(page.bitspersample), direct,
                       axis is None or "S" in axes)


def _read_tiff(path: str | os.PathLike, max_pixels: int | None) -> _Pixels | None:
    """A TIFF of plain samples at full depth (tifffile), scaled by its BitsPerSample; None when PIL should read it
    (palette, YCbCr, CMYK, ..., or one page compressed in a way tifffile needs the imagecodecs package for)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        lay = _tiff_layout(tif)
        if not lay.direct:
            return None
        plane = [n for k, n in enumerate(lay.shape) if k != lay.channel_axis]
        _check_pixels(path, plane[0], plane[1], max_pixels)
        try:
            data = tif.series[0].asarray()
        except ValueError:  # e.g. LZW / JPEG without imagecodecs: PIL decodes a single page as before
            if lay.one_page:
                return None
            raise
    if lay.channel_axis is not None:
        data = np.moveaxis(data, lay.channel_axis, -1)
    return _Pixels(_to_unit(data, lay.bits), lay.alpha, lay.premultiplied)


def _png_header(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, None for other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_png16(path: str | os.PathLike) -> _Pixels:
    """A 16-bit PNG at full depth (PIL keeps 16 bits for grey only), scaled by 65535."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision >= 0.29 deprecation
        t = decode_png(read_file(str(path)), ImageReadMode.UNCHANGED)
    return _Pixels(_to_unit(t.permute(1, 2, 0).numpy()), alpha=t.shape[0] in (2, 4))


def _read_pil(path: str | os.PathLike, in_chans: int, max_pixels: int | None,
              background: Sequence[int]) -> _Pixels:
    """Any other file through PIL: 16-bit and float grey at full depth (I;16 / 65535, F as it is), 8-bit files as
    the 8-bit path reads them (1/3-channel runs: the same conversion) / 255."""
    with _open_checked(path, max_pixels) as im:
        im.load()
        if im.mode.startswith("I;16") or im.mode == "I":
            return _Pixels(np.asarray(im).astype(np.float32)[:, :, None] / np.float32(65535.0))
        if im.mode == "F":
            return _Pixels(np.array(im, dtype=np.float32)[:, :, None])
        if in_chans in (1, 3):
            return _Pixels(_to_unit(np.asarray(convert_mode(im, in_chans, background))))
        alpha = has_alpha(im)
        grey = im.mode in ("1", "L", "LA", "La")
        target = ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")
        return _Pixels(_to_unit(np.asarray(im if im.mode == target else im.convert(target))), alpha=alpha)


def image_channels(path: str | os.PathLike) -> tuple[int, bool]:
    """(channels, last one is alpha) of a file from its header alone (the early check of a run's data)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        shape = _npy_shape(path)
        return (shape[2] if len(shape) == 3 else 1), False
    if suffix in TIFF_EXTENSIONS:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            lay = _tiff_layout(tif)
        if lay.direct:
            return lay.channels, lay.alpha
    png = _png_header(path)
    if png is not None and png[1] in _PNG_COLOUR_TYPES:
        return _PNG_COLOUR_TYPES[png[1]]
    with _open_checked(path, None) as im:
        alpha = has_alpha(im)
        colour = 1 if im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16") else 3
    return colour + int(alpha), alpha


def check_channels(path: str | os.PathLike, in_chans: int) -> None:
    """Raise :class:`ChannelMismatch` when the file's channels cannot become ``in_chans`` (header only)."""
    channels, alpha = image_channels(path)
    if not _fits(channels, alpha, in_chans):
        raise _mismatch(path, channels, alpha, in_chans)


def load_pixels(path: str | os.PathLike, in_chans: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                background: Sequence[int] = DEFAULT_BACKGROUND) -> np.ndarray:
    """The full-depth reader (``data.bit_depth=full``, or ``data.in_chans`` not 1 or 3): float32 (H, W, in_chans).

    Integer data is scaled to [0, 1] by its bit depth: 8-bit by 255, 16-bit by 65535 (also 12-bit data in a 16-bit
    PNG: the PNG standard has such data scaled up to 16 bits; raw 12-bit values then span [0, 0.0625], which
    ``data.mean/std=auto`` normalizes), a TIFF by its BitsPerSample (12 -> 4095); floats are taken as they are.
    ``.npy`` arrays are (H, W) or (H, W, C); TIFF layouts: :func:`_tiff_layout`; channels: :func:`fit_channels`.
    """
    suffix = Path(path).suffix.lower()
    px: _Pixels | None = None
    if suffix == ".npy":
        px = _read_npy(path, max_pixels)
    elif suffix in TIFF_EXTENSIONS:
        px = _read_tiff(path, max_pixels)
    else:
        png = _png_header(path)
        if png is not None and png[0] == 16:
            _open_checked(path, max_pixels).close()  # the pixel limit, from the header
            px = _read_png16(path)
    if px is None:
        px = _read_pil(path, in_chans, max_pixels, background)
    return fit_channels(px, in_chans, background, path)


def _needs_arrays(path: str | os.PathLike) -> bool:
    """Whether the 8-bit path reads this file through :func:`load_pixels` instead of PIL: ``.npy`` files, and TIFFs
    PIL would misread (bands stored as pages, or other than grey/colour samples)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return True
    if suffix not in TIFF_EXTENSIONS:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return not _tiff_layout(tif).standard
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: PIL decides, as before
        return False


def _quantize(a: np.ndarray) -> Image.Image:
    """float (H, W, 1|3) in [0, 1] -> an 8-bit "L"/"RGB" image (rounded, clipped)."""
    u8 = np.clip(np.rint(a * np.float32(255.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(u8[:, :, 0], mode="L") if u8.shape[2] == 1 else Image.fromarray(u8, mode="RGB")


def skip_reason(err: BaseException) -> str:
    return str(err) if isinstance(err, ImageTooLarge) else f"{type(err).__name__}: {err}"


def _list_images(folder: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return out


class _SkipRecord:
    """Which files of one folder listing are unreadable: a uint8 flag per file, in shared memory."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.flags = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()


# (real root, pixel limit) -> the record of the datasets alive over that listing (see ImageFolderDataset)
_RECORDS: weakref.WeakValueDictionary[tuple[str, int | None], _SkipRecord] = weakref.WeakValueDictionary()


def _shared_record(root: str, max_pixels: int | None, paths: list[str]) -> _SkipRecord:
    key = (os.path.realpath(root), max_pixels)
    rec = _RECORDS.get(key)
    if rec is None or rec.paths != paths:
        rec = _SkipRecord(paths)
        _RECORDS[key] = rec
    return rec


class ImageFolderDataset(BaseImageDataset):
    """A tree of image files; class sub-folders (sorted) give labels, a flat folder gives labels -1.

    Unreadable files (empty, corrupt, truncated, not an image, over ``max_image_pixels``) never crash
    loading: the item falls through to the next readable index ``(i + 1) % len`` and the file is recorded
    with one warning. The record is a uint8 flag per file in *shared memory*, so files found bad inside
    DataLoader workers (fork or spawn) are counted in the main process's :attr:`num_skipped` and are not
    re-opened by later epochs. Datasets built over the same listing in one process (the training set and
    the k-NN monitor's copy of it) share one record, so they warn about a file once between them.

    Exactly one warning per file: only the worker that was *asked* for index ``i`` records it; a worker that
    falls through to a bad file it was not asked for skips it silently. Samplers that ask for each index
    at most once per pass (every sampler cmim uses) therefore never race two workers on one file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        in_chans: int = 3,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        background: Sequence[int] = DEFAULT_BACKGROUND,
        cache: DecodedCache | None = None,
    ) -> None:
        self.root = str(root)
        self.cache = cache
        self.in_chans = _check_in_chans(in_chans)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.background = tuple(int(v) for v in background)
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(f"background must be 3 values in 0..255, got {list(background)}")
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
        self._record = _shared_record(self.root, self.max_image_pixels, self.paths)
        self._bad = self._record.flags
        self.keep_jpeg = False  # data.decode=device: JPEG files come back undecoded (EncodedJpeg)
        # full depth, any channel count: items are float32 (H, W, C) arrays (load_pixels); set by data.bit_depth
        self.float_pixels = self.in_chans not in (1, 3)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        if not self._bad[index]:
            log.warning("skipping unreadable image %s (%s)", self.paths[index], skip_reason(err))
            self._bad[index] = 1

    def load(self, index: int) -> ImageLike:
        """Decode sample ``index``, or with :attr:`keep_jpeg` read a JPEG's bytes (raises for unreadable files;
        records nothing); with :attr:`float_pixels` a float32 (H, W, C) array at the file's full depth."""
        if self.float_pixels:
            return load_pixels(self.paths[index], self.in_chans, self.max_image_pixels, self.background)
        if self.keep_jpeg:
            encoded = read_jpeg(self.paths[index], self.max_image_pixels)
            if encoded is not None:
                return encoded
        if self.cache is not None and self.cache.keep_images:
            return self.cache.get(self.paths[index], functools.partial(self.decode, index))
        return self.decode(index)

    def decode(self, index: int) -> Image.Image:
        """Decode sample ``index`` from its file, at full size."""
        return load_image(self.paths[index], self.in_chans, self.max_image_pixels, self.background)

    def preview(self, index: int) -> Image.Image:
        """Sample ``index`` as an 8-bit image for the twin check: the decoded image, or for float pixels (any
        channel count, full depth) the mean of the channels."""
        if not self.float_pixels:
            return self.decode(index)
        pixels = load_pixels(self.paths[index], self.in_chans, self.max_image_pixels, self.background)
        return Image.fromarray((np.clip(pixels.mean(-1), 0.0, 1.0) * 255).round().astype(np.uint8))

    def try_load(self, index: int, record: bool = True) -> Image.Image | EncodedJpeg | None:
        """Load sample ``index``, or (``record``: record it as unreadable and) return None."""
        try:
            return self.load(index)
        except Exception as err:  # decoders raise many exception types for broken files
            if record:
                self._mark_bad(index, err)
            return None

    def first_readable(self, order: Iterable[int], requested: int) -> tuple[Image.Image | EncodedJpeg, int]:
        """The first readable sample of ``order``; only a failure of ``requested`` itself is recorded."""
        for i in order:
            if self._bad[i]:
                continue
            img = self.try_load(i, record=i == requested)
            if img is not None:
                return img, int(self.targets[i])
        raise RuntimeError(f"no readable image left in {self.root}")

    def __getitem__(self, index: int) -> tuple[Image.Image | EncodedJpeg, int]:
        n = len(self.paths)
        index = int(index) % n
        return self.first_readable(((index + k) % n for k in range(n)), requested=index)

    def skipped_indices(self) -> np.ndarray:
        return torch.nonzero(self._bad).flatten().numpy()

    def why_unreadable(self, index: int) -> str:
        """The reason sample ``index`` is skipped, found again (the worker that met it kept no text)."""
        try:
            self.load(index)
        except Exception as err:  # noqa: BLE001 - the reason is the message
            return skip_reason(err)
        return "unreadable when first loaded (reads now; a transient I/O error?)"

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    @property
    def skipped_paths(self) -> list[str]:
        return [self.paths[i] for i in self.skipped_indices().tolist()]


# ----------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------


class SyntheticDataset(BaseImageDataset):
    """Procedural, learnable images: class = (bar orientation, number of parallel bars).

    Nuisances per image: position, scale, small rotation, bar thickness, intensities, a background gradient,
    pixel noise and (more than one channel) a tint per channel. Up to 8 orientations × 1-3 bars keep ≤ 24
    classes well separated (more classes still work, with more bars). Item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, in_chans: int = 1, seed: int = 0) -> None:
        if size <= 0 or num_classes <= 0 or img_size <= 0:
            raise ValueError("synthetic size, num_classes and img_size must be positive")
        self.in_chans = _check_in_chans(in_chans)
        self.float_pixels = self.in_chans not in (1, 3)  # uint8 (H, W, C) items the views divide by 255
        self.img_size, self.seed = img_size, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]
        perm = np.random.default_rng([seed, 0x5EED]).permutation(size)
        self.targets = (perm % num_classes).astype(np.int64)
        self._n_orient = min(num_classes, 8)
        ax = (np.arange(img_size, dtype=np.float32) + 0.5) / img_size * 2.0 - 1.0
        self._yy, self._xx = np.meshgrid(ax, ax, indexing="ij")

    def render(self, index: int) -> np.ndarray:
        """Draw image ``index`` as uint8 (H, W) or (H, W, C)."""
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
        if self.in_chans > 1:
            tint = 0.75 + 0.25 * rng.random(self.in_chans)
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


def folder_parts(dataset: Any) -> tuple[ImageFolderDataset, list[int] | None] | None:
    """The folder under any wrappers (views, Subset, SubsetDataset) and the selection of it (None: all)."""
    obj, indices = dataset, None
    for _ in range(8):
        if isinstance(obj, ImageFolderDataset):
            return obj, indices
        if isinstance(obj, SubsetDataset):
            sel = obj.indices.tolist()
            indices = sel if indices is None else [sel[i] for i in indices]
            obj = obj.base
        elif isinstance(obj, torch.utils.data.Subset):
            sel = [int(i) for i in obj.indices]
            indices = sel if indices is None else [sel[i] for i in indices]
            obj = obj.dataset
        elif hasattr(obj, "base"):  # PretrainDataset, EvalDataset, ... : same indices as their base
            obj = obj.base
        else:
            return None
    return None


def check_folder_channels(dataset: Any, tries: int = 16) -> None:
    """Fail early, in one line, when a folder's images do not have ``in_chans`` channels (e.g. a 4-band TIFF in a
    3-channel run): the first file whose header reads decides (later odd files are skipped and listed)."""
    parts = folder_parts(dataset)
    if parts is None:
        return
    folder, sel = parts
    for i in (sel if sel is not None else range(len(folder.paths)))[:tries]:
        try:
            channels, alpha = image_channels(folder.paths[i])
        except Exception:  # noqa: BLE001 - an unreadable file is the skip logic's business
            continue
        if not _fits(channels, alpha, folder.in_chans):
            raise _mismatch(folder.paths[i], channels, alpha, folder.in_chans)
        return


def _skipped(datasets: Sequence[Any]) -> dict[str, tuple[ImageFolderDataset, int]]:
    found: dict[str, tuple[ImageFolderDataset, int]] = {}
    for ds in datasets:
        parts = folder_parts(ds)
        if parts is None:
            continue
        base, sel = parts
        bad = base.skipped_indices().tolist()
        if sel is not None:
            bad = sorted(set(bad) & set(sel))
        for i in bad:
            found.setdefault(base.paths[i], (base, i))
    return found


def skipped_files(*datasets: Any) -> list[str]:
    """Every unreadable file met so far in ``datasets`` (through any wrappers), sorted, once each."""
    return sorted(_skipped(datasets))


def skip_report(*datasets: Any) -> list[tuple[str, str]]:
    """``(path, reason)`` for :func:`skipped_files`. Reasons are found again by re-opening those files (the
    workers that met them kept no text), so call it once, at the end of a run."""
    return [(p, base.why_unreadable(i)) for p, (base, i) in sorted(_skipped(datasets).items())]


def all_reduce_skips(dataset: Any, device: torch.device | str = "cpu") -> None:
    """Multi-process runs: merge every process's skip flags into each one's (a collective: call it on all
    processes), so the main process reports files that only another process met."""
    import torch.distributed as dist

    parts = folder_parts(dataset)
    if parts is None or not (dist.is_available() and dist.is_initialized()):
        return
    flags = parts[0]._bad
    merged = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    flags.copy_(merged.cpu().to(torch.uint8))


def write_skip_list(path: str | os.PathLike, items: Sequence[tuple[str, str]]) -> None:
    """``path\\treason`` lines (the file is removed when nothing was skipped, so no stale list remains)."""
    p = Path(path)
    if not items:
        p.unlink(missing_ok=True)
        return
    atomic_write_text(p, "".join(f"{f}\t{why}\n" for f, why in items))


def read_skip_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        return []
    items = []
    for line in p.read_text().splitlines():
        if line:
            path_, _, why = line.partition("\t")
            items.append((path_, why))
    return items


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def folder_cache(cfg: Any, in_chans: int, background: Sequence[int], keep_images: bool) -> DecodedCache:
    """The decoded-image cache of a folder recipe (:mod:`cmim.data.cache`); without ``keep_images`` it only
    keeps the split's fingerprints."""
    root = _cfg(cfg, "cache_dir", None) or default_cache_dir()
    short_side = _cfg(cfg, "cache_short_side", None) or 2 * int(_cfg(cfg, "img_size", 224))
    return DecodedCache(root, int(short_side), in_chans, background, keep_images=keep_images)


class _Fingerprints(Dataset):
    """Index -> the file's thumbnail or None (unreadable), computed in DataLoader workers."""

    def __init__(self, ds: ImageFolderDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.paths)

    def __getitem__(self, index: int) -> np.ndarray | None:
        cache = self.ds.cache
        assert cache is not None
        try:
            return cache.fingerprint(self.ds.paths[index], functools.partial(self.ds.preview, index))
        except Exception:  # noqa: BLE001 - an unreadable file has no twins; the training loader skips it
            return None


# (real root, listing, setting, threshold) -> group ids: the train and val parts of one run group once
_GROUPS: dict[tuple, np.ndarray] = {}
_SAID: set[tuple] = set()  # splits already described in the log (once per process)


def _twin_groups(ds: ImageFolderDataset, threshold: float, workers: int) -> np.ndarray:
    assert ds.cache is not None
    key = (os.path.realpath(ds.root), tuple(ds.paths), ds.cache.root, ds.cache.setting, threshold)
    if key not in _GROUPS:
        loader = torch.utils.data.DataLoader(_Fingerprints(ds), batch_size=64, num_workers=workers,
                                             collate_fn=list)
        prints = [f for batch in loader for f in batch]
        _GROUPS[key] = twin_groups(prints, threshold)
    return _GROUPS[key]


HELD_OUT_SPLITS = ("val", "test")


def _folder_dataset(cfg: Any, root: str, split: str, in_chans: int) -> BaseImageDataset:
    """``root/split``, or with ``data.val_fraction > 0`` the train / held-out part of ``root`` itself."""
    max_pixels = getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    background = _cfg(cfg, "background", DEFAULT_BACKGROUND)
    fraction = float(_cfg(cfg, "val_fraction", 0.0))
    twins = bool(_cfg(cfg, "split_twins", True)) and fraction > 0.0
    float_pixels = needs_float_pixels(in_chans, str(_cfg(cfg, "bit_depth", "auto")))
    # the cache holds 8-bit images decoded on the CPU (data.decode=device decodes full-size files on the device)
    keep_images = bool(_cfg(cfg, "cache_images", True)) and not float_pixels and _cfg(cfg, "decode", "cpu") == "cpu"
    cache = folder_cache(cfg, in_chans, background, keep_images) if twins or keep_images else None
    if fraction <= 0.0:
        folder = os.path.join(root, split) if split else root
        return ImageFolderDataset(folder, in_chans, max_pixels, background, cache if keep_images else None)
    if split != "train" and split not in HELD_OUT_SPLITS:
        raise ValueError(f"with data.val_fraction > 0 the folder split is 'train' or 'val'/'test', not {split!r}")
    ds = ImageFolderDataset(root, in_chans, max_pixels, background, cache)
    ds.float_pixels = float_pixels
    if "train" in ds.classes and any(s in ds.classes for s in HELD_OUT_SPLITS):
        raise ValueError(f"data.val_fraction splits {root} itself, but it has train/ and val/ sub-folders; "
                         "set data.val_fraction=0 to use them")
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in ds.paths]
    groups = None
    if twins:
        threshold = float(_cfg(cfg, "twin_cosine", DEFAULT_TWIN_COSINE))
        groups = _twin_groups(ds, threshold, loader_workers(_cfg(cfg, "num_workers", 0)))
    held = held_out_mask(rel, ds.targets, fraction, int(_cfg(cfg, "split_seed", 0)), groups)
    said = (os.path.realpath(root), len(rel), fraction, int(_cfg(cfg, "split_seed", 0)))
    if groups is not None and said not in _SAID:
        _SAID.add(said)
        sizes = np.bincount(groups)
        with_twin = int((sizes[groups] > 1).sum())
        log.info("split of %s: %d files; %d have near-duplicates, in %d groups kept on one side; %d held out",
                 root, len(rel), with_twin, int((sizes > 1).sum()), int(held.sum()))
    return SubsetDataset(ds, np.flatnonzero(held if split in HELD_OUT_SPLITS else ~held))


def build_base_dataset(cfg: Any, split: str) -> BaseImageDataset:
    """Build the un-augmented dataset of ``split`` (a split name such as ``cfg.train_split``) from ``cfg``.

    ``cfg.subset`` keeps the first ``subset`` samples; for folder trees with class sub-folders (stored
    sorted by class) it keeps ``subset`` evenly spaced samples instead so every class stays represented.
    Folders: ``split`` is a sub-folder of ``cfg.root``, except with ``cfg.val_fraction > 0``, where "train"
    is the training part of ``cfg.root`` itself and "val"/"test" its held-out part (:func:`held_out_mask`).
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
        ds = _folder_dataset(cfg, str(root), split, in_chans)
    elif name == "shards":  # WebDataset tar shards with an index (cmim.data.shards)
        from cmim.data.shards.dataset import build_shard_dataset

        ds = build_shard_dataset(cfg, split, in_chans)
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
            f"unknown dataset name {cfg.name!r} (fashion-mnist, folder, shards, synthetic, cifar10, cifar100)"
        )
    if needs_float_pixels(in_chans, str(_cfg(cfg, "bit_depth", "auto"))):  # data.bit_depth=full: on the base itself
        base = ds.base if isinstance(ds, SubsetDataset) else ds
        base.float_pixels = True
    subset = getattr(cfg, "subset", None)
    if subset is not None and int(subset) < len(ds):
        n, m = len(ds), int(subset)
        folder = isinstance(ds, ImageFolderDataset) or (
            isinstance(ds, SubsetDataset) and isinstance(ds.base, ImageFolderDataset)
        )
        if folder and ds.classes:
            indices = (np.arange(m) * n) // m
        else:
            indices = np.arange(m)
        ds = SubsetDataset(ds, indices)
    return ds
