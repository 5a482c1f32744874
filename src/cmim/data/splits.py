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

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["DEFAULT_TWIN_COSINE", "held_out_mask", "twin_groups", "unit_hash"]

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
