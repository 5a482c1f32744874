"""The twin-aware folder split (cmim.data.splits) and the decoded-image cache (cmim.data.cache)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from cmim.config import DataConfig
from cmim.data.cache import DecodedCache, content_key, shrink
from cmim.data.factory import build_base_dataset
from cmim.data.pixels import load_image
from cmim.data.splits import held_out_mask, twin_groups, unit_hash


def test_held_out_mask_by_hand() -> None:
    rel = ["a.png", "b.png", "c.png", "d.png"]
    u = [unit_hash(p, 0) for p in rel]
    fraction = sorted(u)[2] + 1e-9  # the three lowest draws are below it
    labels = np.zeros(4, np.int64)
    alone = held_out_mask(rel, labels, fraction)
    assert alone.tolist() == [x < fraction for x in u]
    # the file with the highest draw twins the lowest one: their group draws the highest, so both train
    hi, lo = int(np.argmax(u)), int(np.argmin(u))
    groups = np.arange(4)
    groups[hi] = groups[lo]
    paired = held_out_mask(rel, labels, fraction, groups=groups)
    expected = alone.copy()
    expected[[hi, lo]] = False
    assert paired.tolist() == expected.tolist()


def test_group_moves_whole_in_class_corrections() -> None:
    rel = [f"x{i}.png" for i in range(6)]
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array([0, 0, 1, 2, 3, 4])
    held = held_out_mask(rel, labels, 1e-9, groups=groups)  # nothing drawn: each class gives one group to val
    assert held[:3].sum() in (1, 2) and held[3:].sum() == 1
    assert held[0] == held[1]  # a group is never split


def test_twin_groups() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32)).astype(np.uint8)
    b = rng.integers(0, 255, (32, 32)).astype(np.uint8)
    a_brighter = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)  # same picture, other exposure
    flat = np.full((32, 32), 255, np.uint8)
    groups = twin_groups([a, b, a_brighter, flat, None, flat], threshold=0.99)
    assert groups[0] == groups[2]
    assert len({groups[0], groups[1], groups[3], groups[4], groups[5]}) == 5  # flat images have no twins


def _clip_folder(root: Path, n: int = 12) -> None:
    """Two classes of distinct random pictures, plus the same file copied into the other class."""
    rng = np.random.default_rng(1)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{c}{i:02d}.png")
    for i in range(n):
        (root / "dogs" / f"copy{i:02d}.png").write_bytes((root / "cats" / f"cats{i:02d}.png").read_bytes())


def _cfg(root: Path, tmp_path: Path, **over):
    base = dict(name="folder", root=str(root), img_size=16, in_chans=3, num_workers=0, val_fraction=0.3,
                eval_split="val", cache_dir=str(tmp_path / "cache"))
    return OmegaConf.structured(DataConfig(**{**base, **over}))


def _names(ds) -> list[str]:
    return [os.path.relpath(ds.base.paths[i], ds.base.root) for i in ds.indices]


def test_folder_split_keeps_twins_on_one_side(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "imgs"
    _clip_folder(root)
    with caplog.at_level(logging.INFO, logger="cmim.data.splits"):
        train = build_base_dataset(_cfg(root, tmp_path), "train")
    val = build_base_dataset(_cfg(root, tmp_path), "val")
    assert "24 have near-duplicates, in 12 groups kept on one side" in caplog.text
    train_names, val_names = set(_names(train)), set(_names(val))
    assert len(train_names) + len(val_names) == 36 and not train_names & val_names
    assert val_names  # something is held out
    for i in range(12):  # a picture and its copy are on the same side
        assert (f"cats/cats{i:02d}.png" in val_names) == (f"dogs/copy{i:02d}.png" in val_names)
    plain_val = set(_names(build_base_dataset(_cfg(root, tmp_path, split_twins=False), "val")))
    leaks = [i for i in range(12) if (f"cats/cats{i:02d}.png" in plain_val) != (f"dogs/copy{i:02d}.png" in plain_val)]
    assert leaks  # without the grouping, this folder's split leaks twins (so the test above can fail)


def test_decoded_cache(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (90, 60, 4), dtype=np.uint8), "RGBA").save(path)
    cache = DecodedCache(tmp_path / "cache", 32, 3, (255, 255, 255))
    calls: list[int] = []

    def loader() -> Image.Image:
        calls.append(1)
        return load_image(path, 3)

    first = cache.get(str(path), loader)
    assert first.size == (32, 48) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(shrink(load_image(path, 3), 32)))
    again = DecodedCache(tmp_path / "cache", 32, 3, (255, 255, 255)).get(str(path), loader)  # another process
    assert np.array_equal(np.asarray(again), np.asarray(first)) and len(calls) == 1
    assert cache.fingerprint(str(path), loader).shape == (32, 32) and len(calls) == 1  # stored on the same decode
    on_black = DecodedCache(tmp_path / "cache", 32, 3, (0, 0, 0))
    black = on_black.get(str(path), lambda: load_image(path, 3, None, (0, 0, 0)))
    assert not np.array_equal(np.asarray(black), np.asarray(first))  # another background is another entry
    Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    assert content_key(path) != cache._keys[str(path)][2]
    cache.get(str(path), loader)
    assert len(calls) == 2  # new content, new entry
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG nope")
    with pytest.raises(UnidentifiedImageError):
        cache.get(str(broken), lambda: load_image(broken, 3))
    assert not list((tmp_path / "cache").rglob(f"{content_key(broken)}*"))


def test_folder_items_come_from_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _clip_folder(root, 3)
    ds = build_base_dataset(_cfg(root, tmp_path, val_fraction=0.0, train_split=""), "")
    img, _ = ds[0]
    assert min(img.size) == 32  # shorter side twice data.img_size
    assert list((tmp_path / "cache" / "images").rglob("*.npy"))


def test_a_class_that_is_one_group_trains() -> None:
    rel = [f"y{i}.png" for i in range(5)]
    labels = np.array([0, 0, 0, 1, 1])
    groups = np.array([7, 7, 7, 8, 9])  # class 0: three twins of one picture
    for fraction in (1e-9, 0.999):
        held = held_out_mask(rel, labels, fraction, groups=groups)
        assert not held[:3].any()  # never the whole class in val, never split
        assert held[3:].sum() == 1
