"""cmim: masked image modeling with contrastive targets (ConMIM, MimCo, MoCo v3) for Vision Transformers."""

from cmim.export import load_encoder  # noqa: F401  (cmim.load_encoder: a timm model from a checkpoint/export)

__version__ = "0.1.0"
