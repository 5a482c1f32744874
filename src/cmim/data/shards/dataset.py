"""``data.name: shards``: a map-style dataset over WebDataset tar shards, with random access through the index.

Sample ``i`` is found by the index's counts (shard ``k``, position ``j`` in it) and read by seeking in the
shard's local file (a remote shard is fetched whole into the cache first: :mod:`cmim.data.shards.fetch`). Being
map-style is what keeps everything the folder dataset has: :class:`~cmim.engine.sampler.GlobalBatchSampler` splits
each global batch over processes and loader workers without overlap or loss, a resumed run skips exactly the
batches it had done (also on another world size or worker count), and every random draw of a sample comes from
(seed, epoch, index) in :class:`~cmim.data.views.PretrainDataset`. WebDataset's streaming pipeline gives up all
three (it has no exact mid-epoch position, and processes with uneven shard lists stall DDP).

Images are decoded as the folder dataset decodes files (pixel limit from the header, full decode, transparency
over ``data.background``, ``data.in_chans`` channels). An unreadable sample is skipped like an unreadable file: it
falls through to the next readable one, and is recorded once in shared memory (:attr:`num_skipped`).

``data.root`` is a folder written by ``cmim shards`` (its ``index.json``; ``root/<split>`` when that has one), an
index file or URL (``.json``), or a brace pattern of shard sources whose index is looked for beside the first
shard (without one, every shard is fetched and scanned when the dataset is built). ``{split}`` in it is replaced
by the split's name (``data.train_split`` / ``data.eval_split``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmim.core.errors import ConfigError
from cmim.data.base import BaseImageDataset, SkipRecord
from cmim.data.cache import default_cache_dir
from cmim.data.folder import skip_reason
from cmim.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_IMAGE_PIXELS, convert_mode, open_checked
from cmim.data.shards.fetch import expand, fetch_shard, is_remote, read_source, shard_name, sibling
from cmim.data.shards.index import INDEX_NAME, ShardTable, read_index, scan_shard

__all__ = ["ShardDataset", "build_shard_dataset", "decode_image", "resolve_shards"]

log = logging.getLogger(__name__)


def decode_image(data: bytes, in_chans: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 background: Sequence[int] = DEFAULT_BACKGROUND) -> Image.Image:
    """A sample's image bytes as the folder dataset would decode the file: raises for unreadable data."""
    with open_checked(io.BytesIO(data), max_pixels) as im:
        im.load()
        out = convert_mode(im, in_chans, background)
        if out is im:
            out = im.copy()
    return out


def _pread(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``; opened per read, so thousands of shards never exhaust file descriptors and
    forked loader workers share nothing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: cut short ({len(data)} of {size} bytes at {offset})")
    return data


class ShardDataset(SkipRecord, BaseImageDataset):
    """Items ``(PIL image, label)`` from tar shards (see the module doc). ``counts[k]`` samples in shard
    ``sources[k]``; ``labels`` for all samples in order; ``sizes``/``sha256`` (per shard, None: unknown) check
    downloads."""

    def __init__(self, sources: Sequence[str], counts: Sequence[int], labels: np.ndarray, classes: list[str],
                 in_chans: int = 3, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 background: Sequence[int] = DEFAULT_BACKGROUND, cache_dir: str | os.PathLike | None = None,
                 sizes: Sequence[int | None] | None = None, sha256: Sequence[str | None] | None = None) -> None:
        if int(in_chans) not in (1, 3):
            raise ConfigError(f"data.name=shards holds 8-bit images: data.in_chans must be 1 or 3, not {in_chans}")
        if len(sources) != len(counts) or int(sum(counts)) != len(labels):
            raise ValueError("shards: sources, counts and labels disagree")
        if not len(labels):
            raise ConfigError(f"no samples in the shards {sources[0] if sources else ''}...")
        self.sources = list(sources)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.in_chans = int(in_chans)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.background = tuple(int(v) for v in background)
        self.cache_dir = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
        self.sizes = list(sizes) if sizes is not None else [None] * len(self.sources)
        self.sha256 = list(sha256) if sha256 is not None else [None] * len(self.sources)
        self._bad = torch.zeros(len(self.targets), dtype=torch.uint8).share_memory_()
        self._tables: dict[int, tuple[str, ShardTable]] = {}  # per process: shard -> (local path, member table)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = {}  # rebuilt where it is used (a spawned loader worker scans what it reads)
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """Sample ``index`` -> (shard, position in it)."""
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return k, int(index - self.starts[k])

    def shard(self, k: int) -> tuple[str, ShardTable]:
        """Shard ``k``'s local path and member table (fetched and scanned once per process)."""
        if k not in self._tables:
            path = fetch_shard(self.sources[k], self.cache_dir, self.sizes[k], self.sha256[k])
            try:
                table = scan_shard(path)
            except Exception as e:  # noqa: BLE001 - tarfile raises several types for a broken archive
                raise ConfigError(f"shard {self.sources[k]}: not a readable tar ({skip_reason(e)})") from None
            expected = int(self.starts[k + 1] - self.starts[k])
            if len(table) != expected:
                raise ConfigError(f"shard {self.sources[k]} has {len(table)} samples, its index says {expected}")
            self._tables[k] = (path, table)
        return self._tables[k]

    def member(self, index: int, which: str = "image") -> bytes | None:
        """The bytes of sample ``index``'s ``image`` / ``label`` / ``path`` member (None: it has none)."""
        k, j = self.locate(index)
        path, table = self.shard(k)
        offset, size = getattr(table, which)[j].tolist()
        return None if offset < 0 else _pread(path, offset, size)

    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` (raises when it cannot be read; records nothing)."""
        return self._decode(self.member(index))

    def _decode(self, data: bytes | None) -> Image.Image:
        if data is None:
            raise ValueError("the sample has no image member (.jpg, .png, .webp, ...)")
        return decode_image(data, self.in_chans, self.max_image_pixels, self.background)

    def name(self, index: int) -> str:
        """``shard#key (original path)``: how skip warnings and lists name a sample."""
        k, j = self.locate(index)
        _, table = self.shard(k)
        path = self.member(index, "path")
        return f"{shard_name(self.sources[k])}#{table.keys[j]}" + (f" ({path.decode(errors='replace')})"
                                                                     if path else "")

    def try_load(self, index: int, record: bool = True) -> Image.Image | None:
        """Sample ``index``'s image, or (``record``: record it as unreadable and) None. A shard that cannot be
        fetched, found or read raises: that is an error of the run, not of one sample."""
        data = self.member(index)
        try:
            return self._decode(data)
        except Exception as err:  # noqa: BLE001 - decoders raise many exception types for broken data
            if record and not self._bad[index]:
                log.warning("skipping unreadable sample %s (%s)", self.name(index), skip_reason(err))
                self._bad[index] = 1
            return None

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Sample ``index``, or (unreadable) the next readable one, as the folder dataset does."""
        n = len(self.targets)
        index = int(index) % n
        return self.first_readable(((index + k) % n for k in range(n)), requested=index)

    def nothing_readable(self) -> str:
        return f"no readable sample left in the shards {self.sources[0]}..."

    def sample_name(self, index: int) -> str:
        return self.name(index)

    def why_unreadable(self, index: int) -> str:
        try:
            self._decode(self.member(index))
        except Exception as err:  # noqa: BLE001 - the reason is the message
            return skip_reason(err)
        return "unreadable when first loaded (reads now; a transient I/O error?)"


def _local(spec: str) -> str:
    return spec[len("file://"):] if spec.startswith("file://") else spec


def resolve_shards(spec: str, split: str = "") -> tuple[list[str], dict[str, Any] | None]:
    """``data.root`` -> (shard sources, the index or None when there is none to be found)."""
    spec = spec.replace("{split}", split)
    if not is_remote(spec) and os.path.isdir(_local(spec)):
        folder = Path(_local(spec))
        if split and (folder / split / INDEX_NAME).is_file():
            folder = folder / split
        if (folder / INDEX_NAME).is_file():
            index = read_index((folder / INDEX_NAME).read_bytes(), str(folder / INDEX_NAME))
            return [str(folder / s["name"]) for s in index["shards"]], index
        tars = sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))
        if not tars:
            raise FileNotFoundError(f"no {INDEX_NAME} and no .tar shards in {folder}")
        return tars, None
    if spec.split("?", 1)[0].endswith(".json"):
        text = read_source(spec)
        if text is None:
            raise FileNotFoundError(f"shard index not found: {spec}")
        index = read_index(text, spec)
        return [sibling(spec, s["name"]) for s in index["shards"]], index
    sources = expand(spec)
    text = read_source(sibling(sources[0], INDEX_NAME))
    if text is None:
        return sources, None
    index = read_index(text, sibling(sources[0], INDEX_NAME))
    by_name = {s["name"]: s for s in index["shards"]}
    entries = [by_name.get(shard_name(s)) for s in sources]
    if any(e is None for e in entries):
        log.info("%s does not list every shard of %s: the shards are scanned instead", INDEX_NAME, spec)
        return sources, None
    return sources, {**index, "shards": entries}


def _scan_counts(sources: list[str], cache_dir: str) -> tuple[list[int], np.ndarray]:
    """Without an index: fetch and scan every shard for its sample count and labels (``cls`` members)."""
    counts, labels = [], []
    for source in sources:
        path = fetch_shard(source, cache_dir)
        table = scan_shard(path)
        counts.append(len(table))
        for offset, size in table.label.tolist():
            text = _pread(path, offset, size).decode(errors="replace").strip() if offset >= 0 else ""
            labels.append(int(text) if text.lstrip("-").isdigit() else -1)
    return counts, np.asarray(labels, dtype=np.int64)


def build_shard_dataset(cfg: Any, split: str, in_chans: int) -> ShardDataset:
    """The ``data.name=shards`` dataset of ``split`` from the data config (``root``, ``cache_dir``,
    ``max_image_pixels``, ``background``)."""
    root = cfg.root
    if not root:
        raise ConfigError("data.root must name the shards for data.name=shards (a folder, an index or a pattern)")
    cache_dir = cfg.cache_dir or str(default_cache_dir())
    max_pixels, background = cfg.max_image_pixels, cfg.background
    sources, index = resolve_shards(str(root), split)
    if index is None:
        counts, labels = _scan_counts(sources, cache_dir)
        known = labels[labels >= 0]
        classes = [str(c) for c in range(int(known.max()) + 1)] if known.size else []
        return ShardDataset(sources, counts, labels, classes, in_chans, max_pixels, background, cache_dir)
    shards = index["shards"]
    labels = np.asarray([label for s in shards for label in s["labels"]], dtype=np.int64)
    return ShardDataset(sources, [s["samples"] for s in shards], labels, [str(c) for c in index.get("classes", [])],
                        in_chans, max_pixels, background, cache_dir, sizes=[s.get("bytes") for s in shards],
                        sha256=[s.get("sha256") for s in shards])
