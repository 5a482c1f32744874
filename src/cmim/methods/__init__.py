"""Pre-training methods. Each is a small module with ``forward(batch) -> dict of losses``."""

from __future__ import annotations

from typing import Any

from cmim.methods.base import Method, MomentumMethod


def build_method(cfg: Any) -> Method:
    """Instantiate the method named by ``cfg.method`` (imports lazily: each file is independent)."""
    name = cfg.method
    if name == "conmim":
        from cmim.methods.conmim import ConMIM

        return ConMIM(cfg)
    if name == "mocov3":
        from cmim.methods.mocov3 import MoCoV3

        return MoCoV3(cfg)
    if name == "mimco":
        from cmim.methods.mimco import MimCo

        return MimCo(cfg)
    if name == "simmim":
        from cmim.methods.simmim import SimMIM

        return SimMIM(cfg)
    raise ValueError(f"unknown method {name!r}")


__all__ = ["Method", "MomentumMethod", "build_method"]
