"""Where a :class:`~cmim.models.MaskedEncoder` sits in a method's state dict, and which one a reader means.

The one rule for taking an encoder out of a cmim checkpoint, shared by evaluation and export
(:mod:`cmim.eval.loading`) and by MimCo's teacher loader (:mod:`cmim.models.teachers`). It lives here, below
both, because it depends on nothing but the encoder's own key layout: every MaskedEncoder in a state dict is
found by its ``<prefix>mask_token`` and ``<prefix>backbone.patch_embed.proj.weight`` keys, whatever a method
calls its modules.

A reader asks for one of two roles (:class:`EncoderRole`): ``teacher``, the encoder a run hands downstream
(the EMA teacher of momentum methods, the student of methods without one), or ``student``. A method may declare
where each role's encoder sits (``MethodSpec.encoder_prefixes``); the rule uses that declaration when the
encoder is there, and otherwise falls back on the names: ``<role>.``, then ``student.``, then the only encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmim.core.choices import Choice
from cmim.core.errors import CheckpointError

__all__ = ["ENCODER_ROLES", "EncoderRole", "encoder_prefix", "encoder_prefixes", "encoder_state_dict"]


class EncoderRole(Choice):
    """Which of a run's encoders (``encoder``, ``monitor.encoder``, ``mimco.teacher_encoder``): "teacher" (the
    EMA one where there is one, what downstream use takes) | "student"."""

    teacher = "teacher"
    student = "student"


ENCODER_ROLES = tuple(r.value for r in EncoderRole)
_MARK = "backbone.patch_embed.proj.weight"
_TOKEN = "mask_token"


def encoder_prefixes(state_dict: Mapping[str, Any]) -> list[str]:
    """Prefixes of every MaskedEncoder stored in a method's state dict (e.g. ["student.", "teacher."])."""
    found = [k[: -len(_MARK)] for k in state_dict if k.endswith(_MARK)]
    return sorted(p for p in found if f"{p}{_TOKEN}" in state_dict)


def encoder_prefix(state_dict: Mapping[str, Any], which: str, declared: Mapping[str, str] | None = None) -> str:
    """The state-dict prefix of the ``which`` encoder (an :class:`EncoderRole`); ``declared``: where the
    checkpoint's method says its encoders are (``MethodSpec.encoder_prefixes``), None when unknown."""
    if which not in ENCODER_ROLES:
        raise CheckpointError(f"encoder: must be {' or '.join(ENCODER_ROLES)}, got {which!r}")
    found = encoder_prefixes(state_dict)
    if not found:
        raise CheckpointError(f"no encoder found in the checkpoint's model state (no '*{_TOKEN}' + "
                              f"'*{_MARK}' keys)")
    if declared and declared.get(which) in found:
        return declared[which]
    for cand in (f"{which}.", "student."):
        if cand in found:
            return cand
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"cannot tell which encoder is the {which!r} among {found}")


def encoder_state_dict(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The MaskedEncoder sub-dict (keys "backbone.*" and "mask_token") stored under ``prefix``."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
