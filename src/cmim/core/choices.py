"""Closed choices of the config (``data.decode``, ``model.size``, ...) as enums of strings.

A config field typed with a :class:`Choice` is checked by OmegaConf when a recipe or override is merged (an
unknown value is refused in one line, naming the allowed ones), and YAML, command lines and ``config.yaml``
keep writing the plain string: a member's name is its value. Members are ``str``: they compare equal to their
string, format and JSON-encode as it. What they are not is a plain string to ``pickle``: a value that goes
into a checkpoint or any ``torch.save`` file (which is read back weights-only) is turned into ``str`` first.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Choice", "listed"]


class Choice(StrEnum):
    """Base of the config's choices; subclasses list members whose name equals their value."""

    @classmethod
    def _missing_(cls, value: object) -> Choice | None:
        # YAML and command lines read ``8`` as an integer: the choice written "8"
        if isinstance(value, int) and not isinstance(value, bool):
            return cls._value2member_map_.get(str(value))  # type: ignore[return-value]
        return None


def listed(choice: type[Choice]) -> str:
    """``"a, b or c"``: the allowed values, for one-line messages."""
    names = [m.value for m in choice]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
