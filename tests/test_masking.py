"""Tests for cmim.data.masking."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from cmim.data.masking import BlockMaskGenerator, RandomGridMaskGenerator, build_mask_generator


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _is_rectangle(mask: np.ndarray) -> bool:
    r0, r1, c0, c1 = _bbox(mask)
    return bool(mask[r0:r1, c0:c1].all()) and int(mask.sum()) == (r1 - r0) * (c1 - c0)


# ---------------------------------------------------------------- RandomGridMaskGenerator


@pytest.mark.parametrize(
    ("grid", "ratio", "cell", "expected"),
    # the reference's count, ceil(cells * ratio): 49 cells * 0.5 = 24.5 -> 25 cells of 4 patches
    [((14, 14), 0.75, 1, 147), ((14, 14), 0.5, 2, 4 * 25), ((6, 8), 0.25, 2, 12)],
)
def test_random_grid_exact_count_shape_dtype(grid, ratio, cell, expected):
    gen = RandomGridMaskGenerator(grid, ratio=ratio, cell=cell)
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = gen(rng)
        assert m.shape == grid
        assert m.dtype == np.bool_
        assert int(m.sum()) == expected


def test_random_grid_cells_are_uniform():
    gen = RandomGridMaskGenerator((12, 12), ratio=0.4, cell=3)
    rng = np.random.default_rng(1)
    for _ in range(10):
        m = gen(rng)
        cells = m.reshape(4, 3, 4, 3)
        all_true = cells.all(axis=(1, 3))
        any_true = cells.any(axis=(1, 3))
        assert np.array_equal(all_true, any_true)  # every cell is all-True or all-False
        assert int(all_true.sum()) == 7  # ceil(16 * 0.4) = ceil(6.4) cells


def test_random_grid_is_not_constant_and_covers_all_cells():
    gen = RandomGridMaskGenerator((4, 4), ratio=0.5)
    rng = np.random.default_rng(2)
    total = sum(gen(rng).astype(int) for _ in range(400))
    # each patch is masked with probability 1/2: 200 expected, far from 0 and 400
    assert total.min() > 140 and total.max() < 260


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(grid=(14, 14), ratio=0.0),
        dict(grid=(14, 14), ratio=1.0),
        dict(grid=(14, 14), ratio=0.5, cell=3),
        dict(grid=(14, 14), ratio=0.5, cell=0),
        dict(grid=(0, 14), ratio=0.5),
    ],
)
def test_random_grid_invalid_args(kwargs):
    with pytest.raises(ValueError):
        RandomGridMaskGenerator(**kwargs)


# ---------------------------------------------------------------- BlockMaskGenerator


def test_block_shape_dtype_and_budget():
    gen = BlockMaskGenerator((14, 14), num_masking_patches=75)
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(200):
        m = gen(rng)
        assert m.shape == (14, 14) and m.dtype == np.bool_
        counts.append(int(m.sum()))
    assert max(counts) <= 75
    assert np.mean(counts) >= 70


def test_block_non_square_grid():
    gen = BlockMaskGenerator((6, 10), num_masking_patches=24, min_num_patches=4)
    rng = np.random.default_rng(3)
    for _ in range(50):
        m = gen(rng)
        assert m.shape == (6, 10)
        assert 0 < m.sum() <= 24


def test_block_fixed_square():
    # area fixed to 16 and aspect fixed to 1 -> exactly one 4x4 square
    gen = BlockMaskGenerator((14, 14), num_masking_patches=16, min_num_patches=16, min_aspect=1.0)
    rng = np.random.default_rng(4)
    for _ in range(20):
        m = gen(rng)
        assert _is_rectangle(m)
        r0, r1, c0, c1 = _bbox(m)
        assert (r1 - r0, c1 - c0) == (4, 4)


def test_block_aspect_is_height_over_width():
    # area 16, aspect 1/4 -> h = round(sqrt(4)) = 2 rows, w = round(sqrt(64)) = 8 columns
    gen = BlockMaskGenerator((14, 14), 16, min_num_patches=16, min_aspect=0.25, max_aspect=0.25)
    m = gen(np.random.default_rng(5))
    assert _is_rectangle(m)
    r0, r1, c0, c1 = _bbox(m)
    assert (r1 - r0, c1 - c0) == (2, 8)


def test_single_block_is_rectangle_with_aspect_in_range():
    min_aspect, max_aspect = 0.3, 1 / 0.3
    gen = BlockMaskGenerator((14, 14), 40, min_num_patches=16, max_num_patches=40, min_aspect=min_aspect)
    rng = np.random.default_rng(6)
    for _ in range(100):
        mask = np.zeros((14, 14), dtype=bool)
        delta = gen._place_block(mask, rng, max_mask_patches=40)
        assert delta == int(mask.sum())
        assert 0 < delta <= 40
        assert _is_rectangle(mask)
        r0, r1, c0, c1 = _bbox(mask)
        h, w = r1 - r0, c1 - c0
        # h and w are roundings of sqrt(A*a) and sqrt(A/a); the sampled aspect a lies in this interval
        lo, hi = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5)
        assert lo <= max_aspect and hi >= min_aspect
        # and the sampled area A = h_real * w_real lies in [16, 40]
        assert (h - 0.5) * (w - 0.5) <= 40 and (h + 0.5) * (w + 0.5) >= 16


def test_block_respects_max_num_patches_per_block():
    gen = BlockMaskGenerator((14, 14), 60, min_num_patches=4, max_num_patches=9)
    rng = np.random.default_rng(7)
    for _ in range(50):
        mask = np.zeros((14, 14), dtype=bool)
        assert gen._place_block(mask, rng, max_mask_patches=9) <= 9
        assert gen(rng).sum() <= 60


@pytest.mark.parametrize("cls_kwargs", [("block", {}), ("random", {"cell": 2})])
def test_determinism_and_pickle(cls_kwargs):
    kind, extra = cls_kwargs
    gen = build_mask_generator(kind, (14, 14), ratio=0.4, **extra)
    a = [gen(np.random.default_rng(123)) for _ in range(3)]
    assert all(np.array_equal(a[0], x) for x in a[1:])
    clone = pickle.loads(pickle.dumps(gen))
    assert np.array_equal(clone(np.random.default_rng(123)), a[0])
    others = [gen(np.random.default_rng(s)) for s in range(5)]
    assert any(not np.array_equal(a[0], o) for o in others)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(grid=(14, 14), num_masking_patches=0),
        dict(grid=(14, 14), num_masking_patches=196),
        dict(grid=(14, 14), num_masking_patches=75, min_num_patches=0),
        dict(grid=(14, 14), num_masking_patches=75, max_num_patches=0),
        dict(grid=(14, 14), num_masking_patches=75, min_aspect=0.0),
        dict(grid=(14, 14), num_masking_patches=75, min_aspect=2.0, max_aspect=1.0),
        dict(grid=(14,), num_masking_patches=5),
    ],
)
def test_block_invalid_args(kwargs):
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kwargs)


def test_block_default_max_aspect_is_reciprocal():
    gen = BlockMaskGenerator((14, 14), 75, min_aspect=0.25)
    assert math.isclose(gen.max_aspect, 4.0)
    assert gen.max_num_patches == 75


# ---------------------------------------------------------------- build_mask_generator


def test_build_mask_generator():
    block = build_mask_generator("block", (14, 14), ratio=0.4, min_num_patches=8, min_aspect=0.5)
    assert isinstance(block, BlockMaskGenerator)
    assert block.num_masking_patches == 78  # round(0.4 * 196) = round(78.4)
    assert block.min_num_patches == 8 and block.min_aspect == 0.5 and block.max_aspect == 2.0
    rnd = build_mask_generator("random", (14, 14), ratio=0.6, cell=2)
    assert isinstance(rnd, RandomGridMaskGenerator)
    assert int(rnd(np.random.default_rng(0)).sum()) == 4 * 30  # the reference's ceil(49 * 0.6) = 30 cells of 4
    with pytest.raises(ValueError, match="unknown mask kind"):
        build_mask_generator("checkerboard", (14, 14), ratio=0.5)
    with pytest.raises(ValueError):
        build_mask_generator("block", (14, 14), ratio=1.0)
