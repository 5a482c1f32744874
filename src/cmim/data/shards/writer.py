"""``cmim shards SRC OUT``: an image folder as WebDataset tar shards, deterministic and resumable.

Samples are the folder dataset's files in its order (the same walk, class labels and readable-image rules:
:class:`~cmim.data.folder.ImageFolderDataset`); each becomes the members ``KEY.<ext>`` (the image),
``KEY.cls`` (the label, ``-1`` in a folder without class sub-folders) and ``KEY.path.txt`` (the file's path
relative to SRC), with ``KEY`` the sample's number over all shards. The image bytes are the file's own, unless
``max_side`` shrinks it: then it is re-encoded, PNG (lossless, alpha kept; the reader composites it over
``data.background`` as the folder does) or JPEG at quality 95 for a JPEG source. Unreadable files are skipped and
listed in ``OUT/skipped.txt``, each with its reason.

Same input, same bytes (with the same Pillow and zlib): the tar headers are fixed (mtime 0, owner cmim, mode
0444, USTAR), written by ``webdataset.TarWriter``, which takes all of them as arguments. Resumable: a shard is
written under a temporary name and renamed when complete, then ``index.json`` is rewritten atomically with it and
with how far into the folder's listing it got; a re-run with the same arguments continues after the last shard of
the index (a shard file the index does not list is written again, to the same bytes).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cmim.core.errors import ConfigError
from cmim.data.folder import ImageFolderDataset, skip_reason
from cmim.data.images import DEFAULT_MAX_IMAGE_PIXELS, convert_mode, has_alpha, open_checked
from cmim.data.pixels import needs_arrays
from cmim.data.shards.index import INDEX_FORMAT, INDEX_NAME, LABEL_EXT, PATH_EXT, read_index, write_index
from cmim.data.skips import write_skip_list

__all__ = ["SHARD_NAME", "prepare_image", "write_shards"]

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
SKIP_LIST = "skipped.txt"
JPEG_QUALITY = 95
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0  # as the decoded-image cache: an integer box reduction first, then Lanczos on the rest
_PARTIAL = ".partial"


def _resizable(im: Image.Image) -> Image.Image:
    """``im`` in a mode that resizes correctly and keeps what the reader needs: transparency as an alpha channel
    (Pillow resizes RGBA premultiplied), high bit depths as 8-bit grey (what the folder's 8-bit path makes of
    them), palettes and other modes as RGB."""
    if im.mode.startswith("I") or im.mode == "F":
        return convert_mode(im, 1)
    if has_alpha(im):
        if im.mode in ("LA", "RGBA"):
            return im
        return (im.convert("LA") if im.mode == "La" else im).convert("RGBA")
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("L" if im.mode == "1" else "RGB")


def prepare_image(path: str, max_side: int | None, max_pixels: int | None) -> tuple[bytes | None, str, str]:
    """(bytes, extension, "") of a file's sample image, or (None, "", reason) for a file the folder dataset would
    skip. The file is fully decoded either way (a truncated file fails here, not in training)."""
    try:
        if needs_arrays(path):
            return None, "", "array or multi-band TIFF file: not written to shards (read it with data.name=folder)"
        with open_checked(path, max_pixels) as im:
            im.load()
            fmt, (w, h) = im.format, im.size
            if not max_side or max(w, h) <= max_side:
                ext = Path(path).suffix.lower().lstrip(".")
                return Path(path).read_bytes(), ext, ""
            scale = max_side / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = _resizable(im).resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
        buf = io.BytesIO()
        if fmt == "JPEG" and small.mode in ("L", "RGB"):
            small.save(buf, "JPEG", quality=JPEG_QUALITY)
            return buf.getvalue(), "jpg", ""
        small.save(buf, "PNG")
        return buf.getvalue(), "png", ""
    except Exception as err:  # noqa: BLE001 - decoders raise many types for broken files; each is a skip
        return None, "", skip_reason(err)


@dataclass
class _Shard:
    """One shard being written: under a temporary name until :meth:`finish` renames it."""

    final: Path
    first_file: int
    samples: int = 0
    labels: list[int] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import webdataset

        self.tmp = self.final.with_name(f".{self.final.name}{_PARTIAL}")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish / abort
        self._tar = webdataset.TarWriter(self._file, user="cmim", group="cmim", mode=0o444, mtime=0.0,
                                         encoder=False)

    def add(self, key: str, ext: str, data: bytes, label: int, rel: str) -> None:
        self._tar.write({"__key__": key, ext: data, LABEL_EXT: str(label).encode(), PATH_EXT: rel.encode()})
        self.samples += 1
        self.labels.append(label)

    def finish(self, files_end: int) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        digest = hashlib.sha256()
        with open(self.final, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"name": self.final.name, "samples": self.samples, "bytes": self.final.stat().st_size,
                "sha256": digest.hexdigest(), "labels": self.labels, "files": [self.first_file, files_end],
                "skipped": self.skipped}

    def abort(self) -> None:
        try:
            self._tar.close()  # (to the file about to be removed: else the tar stream flushes into a closed file)
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def _plan(rel: list[str], sizes: list[int], labels: list[int], classes: list[str], shard_size: int,
          max_side: int | None, max_pixels: int | None) -> str:
    """What decides every byte of the output: a resumed run must have the same."""
    text = json.dumps([INDEX_FORMAT, shard_size, max_side, max_pixels, classes, rel, sizes, labels])
    return hashlib.sha256(text.encode()).hexdigest()


def _finished_shards(out: Path, index: dict[str, Any]) -> list[dict[str, Any]]:
    """The index's shards whose files are there with their recorded size (a prefix: writing resumes after it)."""
    done = []
    for entry in index["shards"]:
        p = out / entry["name"]
        if not p.is_file() or p.stat().st_size != entry.get("bytes"):
            break
        done.append(entry)
    return done


def _prepared(paths: list[str], max_side: int | None, max_pixels: int | None,
              workers: int) -> Iterator[tuple[bytes | None, str, str]]:
    work = functools.partial(prepare_image, max_side=max_side, max_pixels=max_pixels)
    if workers <= 1:
        yield from map(work, paths)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(work, paths, chunksize=4)  # in order: the output does not depend on workers


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int, max_side: int | None = None,
                 workers: int = 1, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Write (or finish writing) the shards of the folder ``src`` into ``out``; returns a summary."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"--max-side must be >= 1, got {max_side}")
    folder = ImageFolderDataset(src, in_chans=3, max_image_pixels=max_pixels)
    root, out_p = Path(src), Path(out)
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in folder.paths]
    labels = [int(t) for t in folder.targets]
    plan = _plan(rel, [os.path.getsize(p) for p in folder.paths], labels, folder.classes, shard_size, max_side,
                 max_pixels)
    out_p.mkdir(parents=True, exist_ok=True)
    for stale in out_p.glob(f".*{_PARTIAL}"):  # a shard cut short by a killed run
        stale.unlink()
    index_path = out_p / INDEX_NAME
    done: list[dict[str, Any]] = []
    if index_path.is_file():
        old = read_index(index_path.read_bytes(), str(index_path))
        if old.get("writer", {}).get("plan") != plan:
            raise ConfigError(f"{out_p} holds shards of another folder or other settings; write into an empty folder")
        done = _finished_shards(out_p, old)
        if old.get("complete") and len(done) == len(old["shards"]):
            log.info("%s: complete already (%d shards)", out_p, len(done))
            return _summary(out_p, old)
    index: dict[str, Any] = {
        "format": INDEX_FORMAT, "classes": list(folder.classes), "shards": done, "complete": False,
        "writer": {"plan": plan, "source": str(root.resolve()), "files": len(rel), "shard_size": shard_size,
                   "max_side": max_side, "max_image_pixels": max_pixels, "tail_skipped": []},
    }
    position = done[-1]["files"][1] if done else 0
    if done:
        log.info("%s: resuming after %d finished shards (file %d of %d)", out_p, len(done), position, len(rel))
    number = sum(s["samples"] for s in done)
    shard: _Shard | None = None
    try:
        stream = _prepared(folder.paths[position:], max_side, max_pixels, workers)
        for f, (data, ext, why) in enumerate(stream, start=position):
            if shard is None:
                shard = _Shard(out_p / SHARD_NAME.format(len(index["shards"])), f)
            if data is None:
                log.warning("skipping unreadable image %s (%s)", folder.paths[f], why)
                shard.skipped.append([rel[f], why])
                continue
            shard.add(f"{number:09d}", ext, data, labels[f], rel[f])
            number += 1
            if shard.samples == shard_size:
                _close(shard, f + 1, index, index_path)
                shard = None
        if shard is not None and shard.samples:
            _close(shard, len(rel), index, index_path)
        elif shard is not None:  # only unreadable files after the last full shard
            shard.abort()
            index["writer"]["tail_skipped"] = shard.skipped
        shard = None
    finally:
        if shard is not None:
            shard.abort()
    if not index["shards"]:
        raise ConfigError(f"no readable image in {src}: nothing written (see the warnings above)")
    index["complete"] = True
    write_index(index_path, index)
    return _summary(out_p, index)


def _close(shard: _Shard, files_end: int, index: dict[str, Any], index_path: Path) -> None:
    entry = shard.finish(files_end)
    index["shards"].append(entry)
    write_index(index_path, index)
    log.info("%s: %d samples, %.1f MB", entry["name"], entry["samples"], entry["bytes"] / 1e6)


def _summary(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The counts, and the skip list written from the index (so a resumed run lists every skipped file)."""
    source = Path(index["writer"]["source"])
    skipped = [(str(source / r), why) for s in index["shards"] for r, why in s["skipped"]]
    skipped += [(str(source / r), why) for r, why in index["writer"]["tail_skipped"]]
    write_skip_list(out / SKIP_LIST, skipped)
    n = len(index["shards"])
    return {"out": str(out), "shards": n, "samples": sum(s["samples"] for s in index["shards"]),
            "skipped": len(skipped), "bytes": sum(s["bytes"] for s in index["shards"]),
            "pattern": str(out / (f"shard-{{{0:06d}..{n - 1:06d}}}.tar" if n > 1 else SHARD_NAME.format(0))),
            "skip_list": str(out / SKIP_LIST) if skipped else None}
