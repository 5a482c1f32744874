"""The held-out part of a folder (``data.val_fraction``), kept free of near-duplicates of the training part.

Real folders hold the same picture more than once: the same file under two names or categories, or variants a
few pixels apart. Scored on a hold-out whose images have a twin in training, k-NN measures memorization, which
flatters raw pixels and hides what pre-training learns (on Debian's clip-art, 370 of 784 held-out images had a
twin; benchmarks/study_notes.md). So files are grouped, and a group is held out whole or not at all.

Twins: two files whose 32x32 grey thumbnails (:func:`cmim.data.cache.fingerprint_of`), mean-centred, have a
cosine similarity above ``threshold`` (0.99 by default, the criterion the leak was measured with). Groups are
the connected components of that relation. The comparison is all pairs in blocks: about a second for 10k
files, a few minutes for 200k.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.utils.data import Dataset

from cmim.data.folder import ImageFolderDataset
from cmim.data.subset import SubsetDataset

__all__ = ["DEFAULT_TWIN_COSINE", "HELD_OUT_SPLITS", "held_out_mask", "split_part", "twin_groups", "unit_hash"]

log = logging.getLogger(__name__)

DEFAULT_TWIN_COSINE = 0.99


def unit_hash(relpath: str, seed: int) -> float:
    """SHA-1 of ``f"{seed}:{relpath}"`` read as a number in [0, 1): a file's fixed draw for the split."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{relpath}".encode()).digest()[:8], "big") / 2.0**64


def twin_groups(fingerprints: Sequence[np.ndarray | None], threshold: float = DEFAULT_TWIN_COSINE,
                block: int = 4096) -> np.ndarray:
    """A group id per file: files linked by a chain of twins share one. ``None`` (unreadable) is alone."""
    n = len(fingerprints)
    present = [i for i, f in enumerate(fingerprints) if f is not None]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    if present:
        x = torch.from_numpy(np.stack([np.asarray(fingerprints[i], np.float32).ravel() for i in present]))
        x = x - x.mean(dim=1, keepdim=True)
        norms = x.norm(dim=1, keepdim=True)
        x = torch.where(norms > 0, x / norms.clamp_min(1e-12), torch.zeros_like(x))  # flat images: no twins
        ids = torch.tensor(present)
        for start in range(0, len(present), block):
            sims = x[start:start + block] @ x.T
            i, j = torch.nonzero(sims > threshold, as_tuple=True)
            keep = ids[i + start] < ids[j]
            rows.append(ids[i + start][keep].numpy())
            cols.append(ids[j][keep].numpy())
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def held_out_mask(relpaths: Sequence[str], targets: np.ndarray, fraction: float, seed: int = 0,
                  groups: np.ndarray | None = None) -> np.ndarray:
    """Which files form the held-out (val) part of a folder split by ``data.val_fraction``.

    Each file draws ``u(p)`` = :func:`unit_hash` of its path relative to the data root ("/"-separated). A group of
    twins (``groups``; default: every file alone) draws the *largest* ``u`` of its files, and is held out when
    that draw is below ``fraction``. So a file without twins keeps its side whatever else is added or removed,
    a new twin can only move its group to training (never a training file into val), and a large cluster of
    variants (hundreds of near-identical stars) stays in training instead of filling the hold-out. Each class
    (a label; an unlabeled folder is one class) holds out about ``fraction`` of its files without twins. Two
    corrections keep small classes usable, moving whole groups: a class of >= 2 groups with none held out gives
    its lowest-draw group to val, and one whose files were all held out keeps its highest-draw group; a class
    that is one file or one group of twins trains.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    u = np.array([unit_hash(p, seed) for p in relpaths])
    groups = np.arange(len(u)) if groups is None else np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    group_u = np.full(inverse.max() + 1 if len(u) else 0, -1.0)
    np.maximum.at(group_u, inverse, u)
    u_of = group_u[inverse]  # each file's group draw
    held = u_of < fraction
    if fraction == 0.0:
        return held
    targets = np.asarray(targets)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(np.unique(inverse[idx])) < 2:
            held[inverse == inverse[idx[0]]] = False  # a class of one file or one group trains, whole
        elif not held[idx].any():
            pick = idx[np.argmin(u_of[idx])]
            held[inverse == inverse[pick]] = True
        elif held[idx].all():
            pick = idx[np.argmax(u_of[idx])]
            held[inverse == inverse[pick]] = False
    return held


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


def split_part(ds: ImageFolderDataset, split: str, fraction: float, seed: int, twin_cosine: float | None,
               workers: int) -> SubsetDataset:
    """The training ("train") or held-out ("val"/"test") part of the whole folder ``ds`` by
    :func:`held_out_mask`; ``twin_cosine`` (None: no grouping) keeps near-duplicates on one side, found from the
    thumbnails that ``ds.cache`` keeps."""
    root = ds.root
    if split != "train" and split not in HELD_OUT_SPLITS:
        raise ValueError(f"with data.val_fraction > 0 the folder split is 'train' or 'val'/'test', not {split!r}")
    if "train" in ds.classes and any(s in ds.classes for s in HELD_OUT_SPLITS):
        raise ValueError(f"data.val_fraction splits {root} itself, but it has train/ and val/ sub-folders; "
                         "set data.val_fraction=0 to use them")
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in ds.paths]
    groups = None if twin_cosine is None else _twin_groups(ds, twin_cosine, workers)
    held = held_out_mask(rel, ds.targets, fraction, seed, groups)
    said = (os.path.realpath(root), len(rel), fraction, seed)
    if groups is not None and said not in _SAID:
        _SAID.add(said)
        sizes = np.bincount(groups)
        with_twin = int((sizes[groups] > 1).sum())
        log.info("split of %s: %d files; %d have near-duplicates, in %d groups kept on one side; %d held out",
                 root, len(rel), with_twin, int((sizes > 1).sum()), int(held.sum()))
    return SubsetDataset(ds, np.flatnonzero(held if split in HELD_OUT_SPLITS else ~held))
