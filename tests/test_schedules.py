"""Tests for cmim.core.schedules."""

from __future__ import annotations

import pytest

from cmim.core.schedules import cosine_schedule


def test_endpoints_without_warmup():
    assert cosine_schedule(0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_schedule(100, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_schedule(250, 100, 1e-3, 1e-6) == pytest.approx(1e-6)  # clamped beyond the end


def test_warmup_is_linear():
    values = [cosine_schedule(s, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) for s in range(11)]
    assert values[0] == pytest.approx(0.2)
    assert values[5] == pytest.approx(0.6)
    assert values[10] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    assert steps == pytest.approx([0.08] * 10)


def test_cosine_midpoint_is_average():
    # 10 warmup steps, then 100 cosine steps: midpoint at step 60
    assert cosine_schedule(60, 110, 0.8, 0.2, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)


def test_hand_computed_value():
    # a quarter of the way through the cosine: 0.5 * (1 + cos(pi / 4)) = 0.5 * (1 + 0.70710678) = 0.85355339
    assert cosine_schedule(25, 100, 1.0, 0.0) == pytest.approx(0.85355339, abs=1e-8)
    assert cosine_schedule(35, 110, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.85355339, abs=1e-8)
    # the same point scaled into [1e-6, 1e-3]: 1e-6 + 0.85355339 * (1e-3 - 1e-6)
    assert cosine_schedule(25, 100, 1e-3, 1e-6) == pytest.approx(0.000853699837, rel=1e-8)


def test_momentum_is_monotone_increasing():
    values = [cosine_schedule(s, 500, 0.996, 1.0) for s in range(501)]
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values[:-1], values[1:]))
    assert all(0.996 <= v <= 1.0 for v in values)


def test_lr_decay_is_monotone_after_warmup():
    values = [cosine_schedule(s, 300, 1.5e-4, 1e-5, warmup_steps=40) for s in range(301)]
    assert all(b >= a for a, b in zip(values[:40], values[1:41]))
    assert all(b <= a for a, b in zip(values[40:-1], values[41:]))
    assert min(values[40:]) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("step", "total", "warmup"),
    [(0, 0, 0), (0, 10, 11), (0, 10, -1), (-1, 10, 0)],
)
def test_invalid_args(step, total, warmup):
    with pytest.raises(ValueError):
        cosine_schedule(step, total, 1.0, 0.0, warmup_steps=warmup)
