"""Errors the user can fix. ``cmim`` prints each as one line (``cli.USER_ERRORS``), never a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here (missing, unreadable or from an incompatible run)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that only full unpickling (which can run arbitrary code) could read: refused, never retried."""


class TeacherError(CheckpointError):
    """A teacher file that cannot serve MimCo (unknown format, no encoder in it, wrong shape)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: a batch that does not fit in memory, or too many non-finite steps in a row."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or its type name), at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_error_detail(e: BaseException, limit: int = 300) -> str:
    """What a failed ``load_state_dict`` is about: its second line names the offending keys or shapes (the
    first only says which module failed); the first line when there is no second."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return (lines[1] if len(lines) > 1 else lines[0])[:limit]


def require(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` (one line naming the key) unless ``cond`` holds."""
    if not cond:
        raise ConfigError(msg)
