"""Backbones with a masked forward, and heads."""

from cmim.models.encoder import PRESETS, MaskedEncoder, build_encoder, is_pooled_feature, timm_spec
from cmim.models.heads import MLPHead

__all__ = ["PRESETS", "MaskedEncoder", "MLPHead", "build_encoder", "is_pooled_feature", "timm_spec"]
