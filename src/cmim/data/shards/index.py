"""The shard index (``index.json`` beside the shards) and the member table of one tar shard.

The index is what lets a reader know the whole data set before it opens any shard: each shard's sample count
(so sample ``i`` maps to a shard and a position in it), its labels (a dataset's ``targets``), its byte size and
SHA-256 (a download is checked against them), and the class names. ``cmim shards`` also keeps what it needs to
resume in it (which source files each finished shard consumed, and which it skipped).

A shard is a WebDataset tar: the members of one sample are consecutive and share a *key* (the member name up to
the first dot of its base name); the rest is the member's extension (``png``, ``cls``, ``path.txt``). The member
table of a shard is read from its tar headers (no member data is read), once per process.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmim.core.errors import ConfigError
from cmim.core.io import atomic_write_text

__all__ = [
    "IMAGE_EXTS",
    "INDEX_NAME",
    "INDEX_FORMAT",
    "ShardTable",
    "read_index",
    "scan_shard",
    "split_member",
    "write_index",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = "cmim-shards/1"
#: member extensions read as the sample's image (WebDataset's image extensions), first found wins
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
LABEL_EXT = "cls"
PATH_EXT = "path.txt"


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), WebDataset's rule (a name without a dot: ext "")."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


@dataclass
class ShardTable:
    """Where each sample's members lie in one shard: (offset, size) of the image, label and path members
    (-1, -1 where a sample has none), in the order the samples appear."""

    keys: list[str]
    image_ext: list[str]
    image: np.ndarray  # int64 (n, 2)
    label: np.ndarray  # int64 (n, 2)
    path: np.ndarray  # int64 (n, 2)

    def __len__(self) -> int:
        return len(self.keys)


def scan_shard(path: str | os.PathLike) -> ShardTable:
    """The member table of a local tar shard, from its headers alone. Raises ``tarfile.TarError`` / ``OSError``
    for a file that is not a readable tar."""
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member(info.name)
            if not keys or keys[-1] != key:
                keys.append(key)
                members.append({})
            members[-1][ext] = (info.offset_data, info.size)
    none = (-1, -1)
    image_ext, image, label, path_ = [], [], [], []
    for m in members:
        ext = next((e for e in IMAGE_EXTS if e in m), "")
        image_ext.append(ext)
        image.append(m.get(ext, none))
        label.append(m.get(LABEL_EXT, none))
        path_.append(m.get(PATH_EXT, none))

    def arr(rows: list[tuple[int, int]]) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    return ShardTable(keys, image_ext, arr(image), arr(label), arr(path_))


def _check(index: Any, where: str) -> dict[str, Any]:
    """The index, after the checks that keep a bad file to one line."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{where}: not a cmim shard index (format {INDEX_FORMAT!r}; write one with cmim shards)")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
        and isinstance(s.get("labels"), list) and len(s["labels"]) == s["samples"] for s in shards
    ):
        raise ConfigError(f"{where}: malformed shard index (each shard needs a name, samples and as many labels)")
    if not isinstance(index.get("classes", []), list):
        raise ConfigError(f"{where}: malformed shard index (classes must be a list)")
    return index


def read_index(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse and check an index (``where`` names it in errors)."""
    try:
        index = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not a JSON shard index ({e})") from None
    return _check(index, where)


def write_index(path: str | os.PathLike, index: dict[str, Any]) -> None:
    """Atomically (a reader or a resumed writer sees the old index or the new one, never half of one)."""
    atomic_write_text(path, json.dumps(_check(index, str(path)), indent=1) + "\n")
