"""Errors of a training run that the user can fix; ``cmim`` prints them as one line (see ``cli.USER_ERRORS``)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on: a batch that does not fit in memory, or too many non-finite steps in a row."""
