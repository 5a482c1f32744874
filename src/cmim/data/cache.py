"""Decoded, downsized copies of folder images on disk, keyed by file content.

A 2-core loader cannot keep up with large PNGs: decoding an 8,000-image clip-art folder takes about 35 CPU
seconds per epoch, as much as the training step it feeds (BENCHMARKS.md, "decoded-image cache"). The first
read of a file decodes it once (mode conversion, alpha over the background), shrinks its shorter side to
``short_side`` and stores the pixels as a ``.npy`` array; later epochs, runs and evaluations read that array.
The same decode also stores the file's *fingerprint* (a 32x32 grey thumbnail) that the twin-aware split
compares (:mod:`cmim.data.splits`).

Entries are named by the SHA-1 of the file's bytes plus every setting that changes the pixels, so an edited
file, another background or another size never reads a stale entry, and one cache can serve every run on a
machine (as pip's or torch hub's caches do). Writes are atomic (temporary file + rename), so concurrent
loader workers or processes never see half an entry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cmim.core.io import atomic_path

__all__ = ["FINGERPRINT_SIDE", "DecodedCache", "content_key", "default_cache_dir", "fingerprint_of", "shrink"]

FINGERPRINT_SIDE = 32  # the thumbnail the twin check compares (the measurement in benchmarks/study_notes.md)
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0  # PIL first reduces by an integer factor (fast box filter), then resamples the rest


def default_cache_dir() -> Path:
    """``$CMIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmim``, else ``~/.cache/cmim``."""
    explicit = os.environ.get("CMIM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cmim"


def content_key(path: str | os.PathLike) -> str:
    """SHA-1 of the file's bytes (hex): the same picture under two names or folders shares its entries."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shrink(im: Image.Image, short_side: int) -> Image.Image:
    """``im`` with its shorter side brought down to ``short_side`` (aspect kept); smaller images unchanged."""
    w, h = im.size
    scale = short_side / min(w, h)
    if scale >= 1.0:
        return im
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def fingerprint_of(im: Image.Image) -> np.ndarray:
    """A (32, 32) uint8 grey thumbnail of the whole image (aspect ignored), what near-duplicates share."""
    grey = im.convert("L")
    return np.asarray(grey.resize((FINGERPRINT_SIDE,) * 2, _RESAMPLE, reducing_gap=_REDUCING_GAP), dtype=np.uint8)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def _load_npy(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, or cut short by a crash before the rename
        return None


class DecodedCache:
    """Entries of one setting (``short_side``, channels, background) under ``root``.

    ``get`` returns the shrunk image; ``fingerprint`` the thumbnail. Both decode the file at most once per
    cache: whichever is asked first stores the other too. Keys of a path are remembered per process with the
    file's size and modification time, so a loader worker hashes each file once, not once per epoch.
    """

    def __init__(self, root: str | os.PathLike, short_side: int, in_chans: int, background: Sequence[int],
                 keep_images: bool = True) -> None:
        if short_side < 1:
            raise ValueError(f"the cached images' shorter side must be >= 1, got {short_side}")
        self.root = Path(root)
        self.short_side = int(short_side)
        self.keep_images = keep_images
        self.setting = f"s{self.short_side}-c{int(in_chans)}-bg{'.'.join(str(int(v)) for v in background)}"
        self._keys: dict[str, tuple[int, int, str]] = {}

    def key(self, path: str) -> str:
        st = os.stat(path)
        known = self._keys.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        key = content_key(path)
        self._keys[path] = (st.st_size, st.st_mtime_ns, key)
        return key

    def _image_path(self, key: str) -> Path:
        return self.root / "images" / self.setting / key[:2] / f"{key}.npy"

    def _fingerprint_path(self, key: str) -> Path:
        # the thumbnail is taken before any shrinking, so it does not depend on short_side
        return self.root / "fingerprints" / self.setting.split("-", 1)[1] / key[:2] / f"{key}.npy"

    def _decode(self, key: str, loader: Callable[[], Image.Image]) -> Image.Image:
        full = loader()
        _save_npy(self._fingerprint_path(key), fingerprint_of(full))
        small = shrink(full, self.short_side)
        if self.keep_images:
            _save_npy(self._image_path(key), np.asarray(small))
        return small

    def get(self, path: str, loader: Callable[[], Image.Image]) -> Image.Image:
        """The image at ``path`` shrunk to ``short_side``; ``loader`` decodes the file on a miss (and raises
        for an unreadable one, which is never cached)."""
        key = self.key(path)
        if self.keep_images:
            array = _load_npy(self._image_path(key))
            if array is not None:
                return Image.fromarray(array)
        return self._decode(key, loader)

    def fingerprint(self, path: str, loader: Callable[[], Image.Image]) -> np.ndarray:
        key = self.key(path)
        array = _load_npy(self._fingerprint_path(key))
        if array is None:
            self._decode(key, loader)
            array = _load_npy(self._fingerprint_path(key))
        assert array is not None
        return array
