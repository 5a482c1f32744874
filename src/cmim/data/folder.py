"""A folder of image files as a dataset, whose unreadable files are skipped and recorded, never fatal.

Class sub-folders give labels. A file that cannot be read (empty, corrupt, truncated, not an image, over
``data.max_image_pixels``) is recorded in a flag per file in shared memory, so DataLoader workers and the main
process agree on what was skipped (:class:`ImageFolderDataset`); :func:`folder_parts` finds the folder and its
selection under any wrapper, for the skip reports (:mod:`cmim.data.skips`) and the early channel check.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmim.data.base import (
    BaseImageDataset,
    BitDepth,
    DecodeMode,
    EncodedJpeg,
    ImageLike,
    SkipRecord,
    check_in_chans,
    find_base,
    needs_float_pixels,
)
from cmim.data.cache import DecodedCache
from cmim.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, read_jpeg
from cmim.data.pixels import channel_mismatch, channels_fit, image_channels, load_image, load_pixels

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "check_folder_channels", "folder_parts", "skip_reason"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".npy")


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


class ImageFolderDataset(SkipRecord, BaseImageDataset):
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
        bit_depth: str = BitDepth.auto,
        decode_mode: str = DecodeMode.cpu,
    ) -> None:
        self.root = str(root)
        self.cache = cache
        self.in_chans = check_in_chans(in_chans)
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
        # data.decode=device: JPEG files come back undecoded (EncodedJpeg), for the training step to decode
        self.decode_mode = DecodeMode(decode_mode)
        # full depth, any channel count: items are float32 (H, W, C) arrays (load_pixels)
        self.float_pixels = needs_float_pixels(self.in_chans, bit_depth)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        if not self._bad[index]:
            log.warning("skipping unreadable image %s (%s)", self.paths[index], skip_reason(err))
            self._bad[index] = 1

    def load(self, index: int) -> ImageLike:
        """Decode sample ``index``, or with :attr:`decode_mode` "device" read a JPEG's bytes (raises for unreadable
        files; records nothing); with :attr:`float_pixels` a float32 (H, W, C) array at the file's full depth."""
        if self.float_pixels:
            return load_pixels(self.paths[index], self.in_chans, self.max_image_pixels, self.background)
        if self.decode_mode is DecodeMode.device:
            encoded = read_jpeg(self.paths[index], self.max_image_pixels)
            if encoded is not None:
                return encoded
        if self.cache is not None and self.cache.keep_images:
            return self.cache.get(self.paths[index], functools.partial(self.decode, index))
        return self.decode(index)

    def with_decode_mode(self, decode_mode: str) -> ImageFolderDataset:
        """This folder (the same listing, cache and shared skip record) read with another decode mode; itself
        when the mode is its own. A new object, so datasets already built over this one keep theirs."""
        if DecodeMode(decode_mode) is self.decode_mode:
            return self
        twin = copy.copy(self)
        twin.decode_mode = DecodeMode(decode_mode)
        return twin

    def decoding_on_cpu(self) -> ImageFolderDataset:
        return self.with_decode_mode(DecodeMode.cpu)

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

    def nothing_readable(self) -> str:
        return f"no readable image left in {self.root}"

    def __getitem__(self, index: int) -> tuple[Image.Image | EncodedJpeg, int]:
        n = len(self.paths)
        index = int(index) % n
        return self.first_readable(((index + k) % n for k in range(n)), requested=index)

    def sample_name(self, index: int) -> str:
        return self.paths[index]

    def why_unreadable(self, index: int) -> str:
        """The reason sample ``index`` is skipped, found again (the worker that met it kept no text)."""
        try:
            self.load(index)
        except Exception as err:  # noqa: BLE001 - the reason is the message
            return skip_reason(err)
        return "unreadable when first loaded (reads now; a transient I/O error?)"


def folder_parts(dataset: Any) -> tuple[ImageFolderDataset, list[int] | None] | None:
    """The folder under any wrappers and the selection of it (None: all of it); None when there is no folder.

    Wrappers are looked through by what they declare: an :class:`~cmim.data.base.ImageView` has its base's
    samples, a :meth:`~cmim.data.base.BaseImageDataset.selection` or a torch ``Subset`` picks some of them."""
    return find_base(dataset, ImageFolderDataset)


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
        if not channels_fit(channels, alpha, folder.in_chans):
            raise channel_mismatch(folder.paths[i], channels, alpha, folder.in_chans)
        return
