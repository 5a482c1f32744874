"""PIL images as a run wants them: opened under a pixel limit, transparency composited over a background, any
mode converted to ``"L"``/``"RGB"``; and a JPEG's bytes read undecoded for the device decoder."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cmim.data.base import EncodedJpeg

__all__ = ["DEFAULT_BACKGROUND", "DEFAULT_MAX_IMAGE_PIXELS", "ImageTooLarge", "composite_on", "convert_mode",
           "has_alpha", "open_checked", "read_jpeg"]

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


def open_checked(path: str | os.PathLike, max_pixels: int | None) -> Image.Image:
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



def read_jpeg(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> EncodedJpeg | None:
    """The file as :class:`EncodedJpeg` when the device decoder can take it (a JPEG of mode L or RGB, within
    ``max_pixels``), None for anything else (PNG, CMYK JPEG, ...: decoded on the CPU as usual). Raises, like
    :func:`load_image`, for files that cannot be read, including a JPEG cut short (no end-of-image marker):
    the cheap checks that let a broken file be skipped in the worker instead of failing the device batch."""
    with open_checked(path, max_pixels) as im:
        if im.format != "JPEG" or im.mode not in ("L", "RGB"):
            return None
        width, height = im.size
    with open(path, "rb") as f:
        data = f.read()
    if b"\xff\xd9" not in data[-64:]:
        raise OSError("truncated JPEG (no end-of-image marker)")
    return EncodedJpeg(np.frombuffer(data, dtype=np.uint8), width, height)
