"""Where a run keeps its checkpoints: the one name of the single-file checkpoint, the formats, and the step
directories of sharded (DCP) checkpoints and of the kept history.

A run folder holds
- ``checkpoint.pt`` (:data:`CHECKPOINT_FILE`): the newest single-file checkpoint, what ``cmim eval``, ``export``,
  ``viz`` and ``report`` read;
- ``checkpoints/`` (:data:`CHECKPOINTS_DIR`): ``step_00000123.pt`` files (the last ``train.keep_checkpoints``
  single-file checkpoints, when more than one is kept) or ``step_00000123/`` DCP directories; a DCP directory is
  complete only once its :data:`DCP_METADATA` file exists (DCP renames it into place last).

Every layer reads these names from here, so that a reader never guesses where a writer put a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cmim.core.choices import Choice

__all__ = ["CHECKPOINTS_DIR", "CHECKPOINT_FILE", "CheckpointFormat", "DCP_METADATA", "StepName", "dcp_checkpoints",
           "is_dcp_checkpoint", "newest_dcp_checkpoint", "parse_step_name", "step_name"]

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointFormat(Choice):
    """``train.checkpoint_format``: one file of the full state | one DCP directory per checkpoint (shards)."""

    file = "file"
    dcp = "dcp"


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's own name for the file it writes last

_STEP = re.compile(r"step_(\d{8,})(?:\.(\d+))?(\.pt)?")
StepName = tuple[int, int]  # (optimizer step, how many checkpoints of that step were written before this one)


def step_name(step: int, seq: int = 0, suffix: str = "") -> str:
    """``step_00000123`` (+ ``.1`` for the second checkpoint of the same step) + ``suffix``."""
    return f"step_{step:08d}" + (f".{seq}" if seq else "") + suffix


def parse_step_name(name: str) -> StepName | None:
    m = _STEP.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """A complete DCP checkpoint: a directory whose metadata file has been written."""
    return (Path(path) / DCP_METADATA).is_file()


def dcp_checkpoints(folder: str | os.PathLike) -> list[tuple[StepName, Path]]:
    """The step directories in ``folder`` (complete or not), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(parse_step_name(p.name), p) for p in folder.iterdir() if p.is_dir()]
    return sorted((key, p) for key, p in found if key is not None)


def newest_dcp_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete DCP checkpoint at ``path``: the directory itself, or the newest complete step directory
    in it, in its ``checkpoints/`` folder (a run folder); None if there is none."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        return path
    for folder in (path, path / CHECKPOINTS_DIR):
        done = [p for _, p in dcp_checkpoints(folder) if is_dcp_checkpoint(p)]
        if done:
            return done[-1]
    return None
