"""Keep the last N checkpoints (``train.keep_checkpoints``), deleting old ones only once a new one is complete.

Checkpoints are ordered by their step name (step, then how many of that step came before). After checkpoint
``newest`` is complete, :func:`prune` removes, among the same kind (``.pt`` history files or DCP folders):
incomplete DCP folders (a save killed half-way), everything after ``newest`` (left by a run that went further
and was then resumed from an earlier checkpoint, or by an earlier run in the same folder), and all but the last
``keep`` up to ``newest``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from cmim.core.checkpoint_paths import StepName, dcp_checkpoints, is_dcp_checkpoint, parse_step_name, step_name
from cmim.core.io import atomic_path

__all__ = ["history_files", "keep_file", "next_dcp_name", "prune"]

log = logging.getLogger("cmim")


def history_files(folder: Path) -> list[tuple[StepName, Path]]:
    """The kept single-file checkpoints (``step_*.pt``), oldest first."""
    if not folder.is_dir():
        return []
    found = [(parse_step_name(p.name), p) for p in folder.iterdir() if p.suffix == ".pt" and p.is_file()]
    return sorted((k, p) for k, p in found if k is not None)


def keep_file(latest: Path, folder: Path, step: int) -> StepName:
    """Keep ``latest`` (the complete single-file checkpoint just written) as ``folder/step_<step>.pt``: a hard
    link (no second copy on disk), made under a temporary name and renamed into place; a copy where the
    file system has no hard links."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / step_name(step, suffix=".pt")) as tmp:
        tmp.unlink()
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
    return (step, 0)


def next_dcp_name(folder: Path, step: int) -> str:
    """A fresh step folder name for a DCP checkpoint of ``step`` (``step_X``, or ``step_X.1``, ... when one of
    that step exists already: a checkpoint is never written into an existing folder)."""
    taken = {key for key, _ in dcp_checkpoints(folder)}
    seq = 0
    while (step, seq) in taken:
        seq += 1
    return step_name(step, seq)


def prune(folder: Path, newest: StepName, keep: int, dcp: bool) -> list[Path]:
    """Remove what the last ``keep`` checkpoints up to ``newest`` do not need (module docstring); returns the
    removed paths."""
    found = dcp_checkpoints(folder) if dcp else history_files(folder)
    complete = [(k, p) for k, p in found if k <= newest and (not dcp or is_dcp_checkpoint(p))]
    kept = {p for _, p in complete[-keep:]} if keep > 0 else set()
    removed = []
    for _, p in found:
        if p in kept:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.debug("removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed
