"""Per-iteration scalar schedules (learning rate, EMA momentum, weight decay)."""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "scaled_lr"]


def cosine_schedule(
    step: int,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warmup then half-cosine decay, evaluated at one ``step``.

    Warmup goes linearly from ``warmup_start`` (step 0) to ``base_value`` (step ``warmup_steps``); the
    cosine then moves from ``base_value`` to ``final_value`` at ``step == total_steps``; later steps stay at
    ``final_value``. Being a pure function of ``step`` (rather than a precomputed array) makes resuming
    from a checkpoint trivial. It also serves increasing schedules, e.g. EMA momentum 0.996 -> 1.0.
    If ``warmup_steps == total_steps`` the value jumps to ``final_value`` at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return float(final_value)
    if step < warmup_steps:
        return warmup_start + (base_value - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr: float | None, blr: float, batch_size: int) -> float:
    """The peak learning rate: ``lr`` when given, else the linear scaling rule ``blr * batch_size / 256``."""
    return float(lr) if lr is not None else float(blr) * batch_size / 256
