"""Which precision a run computes in, and the autocast context for it.

``precision: bf16`` asks for bf16 autocast. A CPU without native bf16 arithmetic (x86 without AVX-512 or
AMX, e.g. AMD Zen 3 or older, most laptops) can only emulate it: PyTorch then falls back to reference
kernels that are tens to hundreds of times slower than fp32 (BENCHMARKS.md, "CPUs without native bf16").
Nobody wants that, so on such a CPU ``bf16`` resolves to fp32 and says so once. Every place that opens an
autocast context (the training step, the probes, fine-tuning, the bench) goes through ``autocast`` here, so
they all agree on what a run computes in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from contextlib import AbstractContextManager

import torch

from cmim.core.choices import Choice


class Precision(Choice):
    """``train.precision``: "bf16" autocast | "fp32"."""

    bf16 = "bf16"
    fp32 = "fp32"


PRECISIONS = tuple(p.value for p in Precision)
log = logging.getLogger(__name__)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 matmuls in hardware (so bf16 autocast pays)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:  # newer torch counts emulated bf16 (pre-Ampere GPUs) as supported unless told not to
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:  # oneDNN's own check (on x86: AVX-512 or AMX)
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


@functools.cache
def _warn_fallback(device_type: str) -> None:
    log.warning("precision bf16: this %s has no native bf16 arithmetic (emulated bf16 is much slower than "
                "fp32 here); computing in fp32 instead", "CPU" if device_type == "cpu" else "GPU")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run on ``device`` computes in when ``precision`` is asked for: ``bf16`` becomes
    ``fp32`` where the device has no native bf16; ``fp32`` stays."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "bf16" and not native_bf16(device_type):
        _warn_fallback(device_type)
        return "fp32"
    return precision


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` if ``precision`` resolves to bf16 there, else a no-op context."""
    device_type = torch.device(device).type
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
