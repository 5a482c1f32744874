"""What every ``cmim`` command line shares: the parser class, and which words are ``key=value`` overrides.

Commands that take overrides let them come after options too (``cmim eval knn CKPT --random-init k=v``). Plain
argparse stops filling a positional list at the first option and rejects what follows; its intermixed parsing
does not. A command asks for it with ``subparsers.add_parser(name, ..., intermixed=True)``; the parser then
parses itself intermixed, including when argparse calls it as a sub-command (through ``parse_known_args``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["CliParser", "is_override"]

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class CliParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose sub-command parsers are of this class too (argparse's default),
    and which parses intermixed options and positionals when built with ``intermixed=True``."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._in_intermixed = False

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # argparse's intermixed parsing runs the plain one (this method) twice underneath: those calls go plain
        if not self.intermixed or self._in_intermixed:
            return super().parse_known_args(args, namespace)
        self._in_intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_intermixed = False


def is_override(word: str) -> bool:
    """Whether a command-line word is a ``key=value`` config override rather than a path: shaped ``dotted.key=``
    and not an existing file or folder."""
    return bool(_OVERRIDE.match(word)) and not os.path.exists(word)
