"""cmim: masked image modeling with contrastive targets (ConMIM, MimCo, MoCo v3) for Vision Transformers.

``import cmim`` is light: torch and timm load on first use of what needs them (``cmim.load_encoder``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    if name == "load_encoder":  # cmim.load_encoder: a timm model from a checkpoint or an export
        from cmim.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'cmim' has no attribute {name!r}")
