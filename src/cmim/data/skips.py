"""What a run skipped: the unreadable files of its folders and samples of its shards (through any wrapper),
merged over processes, with their reasons, and the ``skipped.txt`` list a run writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cmim.core.io import atomic_write_text
from cmim.data.base import SkipRecord, find_base
from cmim.data.folder import folder_parts

__all__ = ["all_reduce_skips", "read_skip_list", "scan_unreadable", "skip_report", "skipped_files",
           "write_skip_list"]


def scan_unreadable(dataset: Any) -> list[str]:
    """Decode every file of a folder dataset now; return (and record as skipped) the unreadable paths.

    Costs one full pass over the files, so it is meant for small data and tests. In-memory sets return [].
    """
    parts = folder_parts(dataset)
    if parts is None:
        return []
    base, sel = parts
    indices = sel if sel is not None else range(len(base.paths))
    bad = [base.paths[i] for i in indices if base.is_skipped(i) or base.try_load(i) is None]
    return sorted(set(bad))


def _skipped(datasets: Sequence[Any]) -> dict[str, tuple[SkipRecord, int]]:
    found: dict[str, tuple[SkipRecord, int]] = {}
    for ds in datasets:
        parts = find_base(ds, SkipRecord)
        if parts is None:
            continue
        base, sel = parts
        bad = base.skipped_indices().tolist()
        if sel is not None:
            bad = sorted(set(bad) & set(sel))
        for i in bad:
            found.setdefault(base.sample_name(i), (base, i))
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

    parts = find_base(dataset, SkipRecord)
    if parts is None or not (dist.is_available() and dist.is_initialized()):
        return
    flags = parts[0].skip_flags
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
