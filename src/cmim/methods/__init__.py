"""Pre-training methods, one file each. A method's file holds everything about it: its modules and loss, its
config section (a dataclass, ``cfg.<name>``), the checks of that section, and what downstream code needs to
know (which encoder is the teacher, where it sits in the state dict). It declares all of it in one
:class:`MethodSpec` named ``SPEC``; this package finds every such file, so adding a method is one new file
here plus a recipe.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cmim.methods.base import Method, MomentumMethod


def _no_checks(cfg: Any) -> None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of cmim knows about a method."""

    name: str  # the value of ``cfg.method`` and the name of its config section
    config: type  # dataclass of the section ``cfg.<name>``
    build: Callable[[Any], Method]  # cfg -> the method (an nn.Module)
    validate: Callable[[Any], None] = _no_checks  # checks of the section; ConfigError with one line
    # state-dict prefix of the encoder ``method.encoder(which)`` returns, for "teacher" and "student"
    encoder_prefixes: dict[str, str] = field(default_factory=lambda: {"teacher": "student.",
                                                                       "student": "student."})
    has_projector: bool = False  # its checkpoints hold a projector a MimCo student can learn from
    sync_bn: bool = True  # default of train.sync_bn: BatchNorm over all processes (False: per process)


@cache
def method_specs() -> dict[str, MethodSpec]:
    """Every method module's ``SPEC``, by name (sorted: config sections appear in this order)."""
    specs: dict[str, MethodSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, MethodSpec):
            specs[spec.name] = spec
    return specs


def method_spec(name: str) -> MethodSpec:
    specs = method_specs()
    if name not in specs:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(specs)})")
    return specs[name]


def declared_encoder_prefixes(method: str | None) -> dict[str, str] | None:
    """Where the checkpoints of ``method`` keep each downstream encoder (its ``encoder_prefixes``); None for a
    method this version does not know (the readers then go by the key names alone)."""
    spec = method_specs().get(method or "")
    return dict(spec.encoder_prefixes) if spec is not None else None


def build_method(cfg: Any) -> Method:
    """Instantiate the method named by ``cfg.method``."""
    return method_spec(cfg.method).build(cfg)


__all__ = ["Method", "MethodSpec", "MomentumMethod", "build_method", "declared_encoder_prefixes", "method_spec",
           "method_specs"]
