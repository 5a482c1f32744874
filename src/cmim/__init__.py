"""cmim: masked image modeling with contrastive targets (ConMIM, MimCo, MoCo v3) for Vision Transformers."""

__version__ = "0.1.0"
