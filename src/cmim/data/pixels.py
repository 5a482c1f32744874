"""Reading an image file's pixels: as an 8-bit ``"L"``/``"RGB"`` image (:func:`load_image`) or at full depth with
any channel count (:func:`load_pixels`: multi-band TIFF, 16-bit PNG, ``.npy``), and the rule for which files fit
a run's ``data.in_chans``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmim.core.errors import ConfigError
from cmim.data.images import (
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    convert_mode,
    has_alpha,
    open_checked,
)

__all__ = ["TIFF_EXTENSIONS", "ChannelMismatch", "channels_fit", "check_channels", "channel_mismatch",
           "fit_channels", "image_channels", "load_image", "load_pixels"]

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


def channels_fit(channels: int, alpha: bool, in_chans: int) -> bool:
    """The channel rule: a file with exactly ``in_chans`` channels is used as it is (an alpha channel included);
    1- and 3-channel runs also take grey or colour files with or without alpha (composited, converted)."""
    colour = channels - 1 if alpha else channels
    return channels == in_chans or (in_chans in (1, 3) and colour in (1, 3))


def channel_mismatch(path: str | os.PathLike, channels: int, alpha: bool, in_chans: int) -> ChannelMismatch:
    what = f"{channels} channels" + (" (the last is alpha)" if alpha else "")
    return ChannelMismatch(f"{path} has {what} but data.in_chans={in_chans}: set data.in_chans={channels} "
                           "(every image of a run needs the same channels)")


def fit_channels(px: _Pixels, in_chans: int, background: Sequence[int] = DEFAULT_BACKGROUND,
                 path: str | os.PathLike = "image") -> np.ndarray:
    """``px`` as float32 (H, W, in_chans) by :func:`channels_fit`: as it is, or alpha composited over ``background`` and
    grey/colour converted (PIL's luma weights) like the 8-bit path does; else :class:`ChannelMismatch`."""
    a = px.data
    c = a.shape[2]
    if c == in_chans:
        return a
    if not channels_fit(c, px.alpha, in_chans):
        raise channel_mismatch(path, c, px.alpha, in_chans)
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
    with open_checked(path, max_pixels) as im:
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
    with open_checked(path, None) as im:
        alpha = has_alpha(im)
        colour = 1 if im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16") else 3
    return colour + int(alpha), alpha


def check_channels(path: str | os.PathLike, in_chans: int) -> None:
    """Raise :class:`ChannelMismatch` when the file's channels cannot become ``in_chans`` (header only)."""
    channels, alpha = image_channels(path)
    if not channels_fit(channels, alpha, in_chans):
        raise channel_mismatch(path, channels, alpha, in_chans)


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
            open_checked(path, max_pixels).close()  # the pixel limit, from the header
            px = _read_png16(path)
    if px is None:
        px = _read_pil(path, in_chans, max_pixels, background)
    return fit_channels(px, in_chans, background, path)


def needs_arrays(path: str | os.PathLike) -> bool:
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



def load_image(
    path: str | os.PathLike,
    in_chans: int,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    background: Sequence[int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Open (size checked from the header), fully decode (so truncated files fail here) and convert. ``.npy`` files
    and TIFFs PIL would misread (bands as pages, multi-band samples) go through :func:`load_pixels`, rounded to 8
    bits; a file whose channels do not fit raises :class:`ChannelMismatch`."""
    if needs_arrays(path):
        return _quantize(load_pixels(path, in_chans, max_pixels, background))
    with open_checked(path, max_pixels) as im:
        im.load()
        out = convert_mode(im, in_chans, background)
        if out is im:
            out = im.copy()
    return out

