"""How many loader workers a machine can use."""

from __future__ import annotations

import os

__all__ = ["usable_cores", "loader_workers"]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's CPU set), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``requested`` loader workers, at most one per usable core: more only add processes that compete with
    the main one for the same cores (torch warns about it, and evaluations on a 2-core machine slow down)."""
    return max(0, min(int(requested), usable_cores()))
