"""Writing and restoring a run's checkpoints in either format (``train.checkpoint_format``).

- ``file``: rank 0 writes the full state atomically to ``out_dir/checkpoint.pt`` (a process killed at any
  moment leaves the previous or the new file); with ``train.keep_checkpoints`` N > 1 the last N are also kept
  as ``out_dir/checkpoints/step_<step>.pt`` (hard links).
- ``dcp``: every process writes its shards into a fresh ``out_dir/checkpoints/step_<step>/`` folder, which is
  complete once DCP has renamed its ``.metadata`` into place; the last N complete folders are kept.

``train.resume=auto`` takes the newest checkpoint of the run's format, else of the other one (a run can switch
format, or world size, between invocations); a path may be a file, a DCP step folder or a folder of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmim.core.checkpoint_paths import (
    CHECKPOINT_FILE,
    CHECKPOINTS_DIR,
    DCP_METADATA,
    newest_dcp_checkpoint,
    parse_step_name,
)
from cmim.core.distributed import DistInfo, barrier
from cmim.core.errors import CheckpointError
from cmim.core.io import atomic_torch_save
from cmim.core.weights import load_checkpoint
from cmim.engine.checkpoint import dcp as dcp_format
from cmim.engine.checkpoint.retention import keep_file, next_dcp_name, prune
from cmim.engine.checkpoint.state import RunState

__all__ = ["Checkpointer", "consolidate", "find_checkpoint"]

log = logging.getLogger("cmim")


def find_checkpoint(path: str | Path, prefer_dcp: bool = False) -> Path | None:
    """The checkpoint ``path`` names: a checkpoint file, a complete DCP folder, or in a run folder the newest of
    the preferred format (else the other); None when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    file = path / CHECKPOINT_FILE
    sharded = newest_dcp_checkpoint(path)
    found = [sharded, file if file.is_file() else None]
    if not prefer_dcp:
        found.reverse()
    return next((p for p in found if p is not None), None)


class Checkpointer:
    """Saves and restores a run's :class:`RunState` in ``fmt`` (file | dcp), keeping the last ``keep``."""

    def __init__(self, out_dir: Path, fmt: str, keep: int, dist: DistInfo) -> None:
        self.out_dir, self.fmt, self.keep, self.dist = Path(out_dir), fmt, int(keep), dist
        self.folder = self.out_dir / CHECKPOINTS_DIR
        self.latest: Path | None = None  # the newest checkpoint written or restored by this run

    @property
    def sharded(self) -> bool:
        return self.fmt == "dcp"

    def default_path(self) -> Path:
        """Where the next checkpoint goes (for messages before one exists)."""
        return self.latest or (self.folder if self.sharded else self.out_dir / CHECKPOINT_FILE)

    # --- save -------------------------------------------------------------------------------------------
    def save(self, make_state: Callable[[bool], RunState], step: int) -> Path:
        """Write checkpoint ``step`` (every process calls this), then drop what the last ``keep`` do not need.
        ``make_state(full)``: the run's parts, with full (single file) or sharded (DCP) model state."""
        ckpt = make_state(not self.sharded).state_dict()  # every process: gathering a sharded model is collective
        if self.sharded:
            name = next_dcp_name(self.folder, step)
            barrier()  # every process chose the name before rank 0 creates the folder
            path = self.folder / name
            if self.dist.is_main:
                path.mkdir(parents=True)
            barrier()
            dcp_format.write(ckpt, path, self.dist.is_main)  # complete on return: .metadata renamed into place
            if self.dist.is_main:
                prune(self.folder, parse_step_name(name) or (step, 0), self.keep, dcp=True)
        else:
            path = self.out_dir / CHECKPOINT_FILE
            if self.dist.is_main:
                atomic_torch_save(ckpt, path)
                kept = keep_file(path, self.folder, step) if self.keep > 1 else (step, 0)
                prune(self.folder, kept, self.keep if self.keep > 1 else 0, dcp=False)
        self.latest = path
        return path

    # --- restore ----------------------------------------------------------------------------------------
    def resume_path(self, resume: str | None) -> Path | None:
        """The checkpoint ``train.resume`` names (None: start afresh)."""
        if resume is None:
            return None
        if resume == "auto":
            return find_checkpoint(self.out_dir, prefer_dcp=self.sharded)
        found = find_checkpoint(resume, prefer_dcp=True)
        if found is None:
            raise CheckpointError(f"train.resume: no complete checkpoint in {resume}")
        return found

    def restore(self, make_state: Callable[[bool], RunState], path: Path) -> None:
        """Check ``path`` against every part of the run, then load it (every process reads it)."""
        state = make_state(path.is_file())
        if path.is_dir():
            def check_plain(ckpt: dict[str, Any]) -> None:
                state.check(ckpt, path, parts=lambda p: not getattr(p, "sharded", False))

            ckpt = dcp_format.read_into(path, state.sharded_entries, state.state_dict, check_plain)
            state.check(ckpt, path, parts=lambda p: getattr(p, "sharded", False))
        else:
            ckpt = load_checkpoint(path)
            state.check(ckpt, path)
        state.load_state_dict(ckpt, path)
        self.latest = path


def consolidate(source: str | Path, out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write the DCP checkpoint at ``source`` (a step folder, or the newest complete one in a run or checkpoints
    folder) as one single-file checkpoint ``out``, which ``cmim eval``, ``export``, ``viz``, ``report`` and a
    resume read; one process, no process group. Returns (the DCP folder read, the checkpoint)."""
    folder = newest_dcp_checkpoint(source)
    if folder is None:
        raise CheckpointError(f"no complete DCP checkpoint in {source} (a step folder with {DCP_METADATA})")
    ckpt = dcp_format.read_full(folder)
    atomic_torch_save(ckpt, out)
    return folder, load_checkpoint(out)  # what every reader will check
