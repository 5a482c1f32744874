"""What users feed as image folders: broken, odd-mode, transparent and oversized files, and one folder with
no train/val split. Broken files are skipped, counted once and listed; the run never stops for them."""

from __future__ import annotations

import json
import logging
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import minimal_recipe, tiny_overrides
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from cmim.cli import main
from cmim.config import ConfigError, DataConfig, load_config
from cmim.data import EvalDataset, build_base_dataset
from cmim.data.folder import ImageFolderDataset
from cmim.data.images import convert_mode
from cmim.data.pixels import load_image
from cmim.data.skips import skip_report
from cmim.data.splits import held_out_mask
from cmim.data.subset import SubsetDataset

pytestmark = pytest.mark.usefixtures("one_thread")


def folder_cfg(root: Path, **overrides: Any) -> DictConfig:
    # full-size decodes: these tests look at the files themselves (the cache has tests of its own)
    small = dict(name="folder", root=str(root), img_size=16, in_chans=3, eval_crop_pct=1.0, num_workers=0,
                 cache_images=False)
    return OmegaConf.structured(DataConfig(**{**small, **overrides}))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def rgb_image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


BAD = {"zero.png", "truncated.png", "text.png", "huge.png"}
ODD = {"cmyk.jpg", "i16.png", "palette_alpha.png", "la.png", "onebit.png"}


def write_messy_folder(root: Path, n_good: int = 6) -> None:
    """Flat folder: ``n_good`` plain RGB PNGs, the ODD modes (all decodable) and the 4 BAD files."""
    root.mkdir(parents=True)
    for k in range(n_good):
        rgb_image(k).save(root / f"good{k}.png")
    (root / "zero.png").write_bytes(b"")
    full = root / "full.png"
    rgb_image(99).save(full)
    (root / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    (root / "text.png").write_text("not an image, whatever the name says\n")
    (root / "huge.png").write_bytes(huge_png_header(100_000, 100_000))
    rgb_image(1).convert("CMYK").save(root / "cmyk.jpg")
    i16 = np.random.default_rng(2).integers(0, 65536, (18, 22)).astype(np.uint16)
    Image.fromarray(i16).save(root / "i16.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.paste(1, (4, 0, 8, 8))
    pal.save(root / "palette_alpha.png", transparency=0)
    Image.new("LA", (8, 8), (40, 0)).save(root / "la.png")
    Image.new("1", (8, 8), 1).save(root / "onebit.png")


# ----------------------------------------------------------------------------------------------------
# Transparency
# ----------------------------------------------------------------------------------------------------


def test_rgba_composited_over_background() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (10, 20, 30, 128)])
    for bg in ([255, 255, 255], [0, 128, 255]):
        out = np.asarray(convert_mode(rgba, 3, bg)).astype(int)
        assert out.shape == (1, 3, 3)
        assert out[0, 0].tolist() == bg  # alpha 0: only the background, not the hidden colour
        assert out[0, 1].tolist() == [10, 20, 30]  # opaque: its own colour
        blend = [c * 128 / 255 + b * 127 / 255 for c, b in zip((10, 20, 30), bg)]
        assert np.abs(out[0, 2] - blend).max() <= 1.0
        # premultiplied RGBa is un-premultiplied first, then composited the same way
        assert np.abs(np.asarray(convert_mode(rgba.convert("RGBa"), 3, bg)).astype(int) - out).max() <= 2
    gray = np.asarray(convert_mode(rgba, 1))
    assert gray.shape == (1, 3) and gray[0, 0] == 255


def test_la_palette_and_trns_transparency() -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(40, 0), (40, 255)])
    assert np.asarray(convert_mode(la, 1)).tolist() == [[255, 40]]
    assert np.asarray(convert_mode(la, 3)).tolist() == [[[255, 255, 255], [40, 40, 40]]]
    assert np.asarray(convert_mode(la.convert("La"), 1))[0, 0] == 255
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(convert_mode(pal, 3, [1, 2, 3])).tolist() == [[[1, 2, 3], [200, 100, 50]]]
    rgb = Image.new("RGB", (1, 1), (7, 8, 9))
    rgb.info["transparency"] = (7, 8, 9)  # PNG tRNS colour key
    assert np.asarray(convert_mode(rgb, 3)).tolist() == [[[255, 255, 255]]]
    plain = Image.new("RGB", (1, 1), (7, 8, 9))
    assert convert_mode(plain, 3) is plain  # nothing to do: no copy


# ----------------------------------------------------------------------------------------------------
# Unreadable and oversized files
# ----------------------------------------------------------------------------------------------------


def test_messy_folder_with_workers_counts_exactly_the_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "messy"
    write_messy_folder(root)
    log_file = tmp_path / "warnings.log"
    handler = logging.FileHandler(log_file)  # forked workers inherit it: their warnings land here too
    logger = logging.getLogger("cmim.data.folder")
    logger.addHandler(handler)
    try:
        base = build_base_dataset(folder_cfg(root), "")
        assert isinstance(base, ImageFolderDataset) and len(base) == 6 + len(ODD) + len(BAD)
        loader = DataLoader(EvalDataset(base, img_size=16), batch_size=2, num_workers=2,
                            multiprocessing_context="fork")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for _ in range(3):  # three epochs: every file asked for each time
                n = sum(len(b["label"]) for b in loader)  # batches of 2: bad files straddle workers
                assert n == len(base)  # each bad item replaced by a readable one
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert base.num_skipped == 4  # recorded inside the workers, seen by the main process
    assert {Path(p).name for p in base.skipped_paths} == BAD
    lines = log_file.read_text().splitlines()
    assert len(lines) == 4, lines  # one warning per file for all epochs and workers together
    assert sorted(Path(ln.split()[3]).name for ln in lines) == sorted(BAD)
    report = dict((Path(p).name, why) for p, why in skip_report(base))
    assert set(report) == BAD
    assert report["huge.png"] == "over data.max_image_pixels (100000 x 100000)"
    assert report["zero.png"].startswith("UnidentifiedImageError")
    for name in ODD:  # the odd modes all decode, to RGB
        img = load_image(root / name, 3)
        assert img.mode == "RGB", name
    assert np.asarray(load_image(root / "palette_alpha.png", 3))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(root / "la.png", 1)).max() == 255  # alpha 0 everywhere: background
    assert 60 < np.asarray(load_image(root / "i16.png", 1)).mean() < 200  # 16 bits rescaled, not clipped


def test_pixel_limit_is_ours_and_pil_stays_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between PIL's limit and data.max_image_pixels: decoded without PIL's warning; above ours: skipped."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL would warn for 60x60 = 3600 pixels
    root = tmp_path / "sizes"
    root.mkdir()
    rgb_image(0, (60, 60)).save(root / "a_medium.png")
    rgb_image(1, (100, 100)).save(root / "b_large.png")
    rgb_image(2, (10, 10)).save(root / "c_small.png")
    ds = build_base_dataset(folder_cfg(root, max_image_pixels=5000), "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL must not warn
        items = [EvalDataset(ds, img_size=16, eval_crop_pct=0.5)[i] for i in range(len(ds))]
    assert len(items) == 3 and ds.num_skipped == 1
    assert skip_report(ds) == [(str(root / "b_large.png"), "over data.max_image_pixels (100 x 100)")]
    unlimited = build_base_dataset(folder_cfg(root, max_image_pixels=None), "")
    assert [unlimited[i][0].size for i in range(3)] == [(60, 60), (100, 100), (10, 10)]
    assert unlimited.num_skipped == 0


# ----------------------------------------------------------------------------------------------------
# One folder, split by data.val_fraction
# ----------------------------------------------------------------------------------------------------


def test_held_out_rule_stable_stratified_and_small_classes() -> None:
    paths = [f"c{c}/{i}.png" for c in range(3) for i in range(200)]
    targets = np.repeat(np.arange(3), 200)
    held = held_out_mask(paths, targets, 0.2, seed=0)
    for c in range(3):
        assert 0.12 < held[targets == c].mean() < 0.28  # approximately the fraction, per class
    assert np.array_equal(held, held_out_mask(paths, targets, 0.2, seed=0))  # deterministic
    assert not np.array_equal(held, held_out_mask(paths, targets, 0.2, seed=1))
    # adding files never moves an existing one
    more = paths + [f"c{c}/new{i}.png" for c in range(3) for i in range(50)]
    more_t = np.concatenate([targets, np.repeat(np.arange(3), 50)])
    assert np.array_equal(held_out_mask(more, more_t, 0.2)[: len(paths)], held)
    # small classes: >= 1 held-out file (and >= 1 train file) from 2 files on; a lone file trains
    tiny = held_out_mask(["a/0.png", "a/1.png", "b/0.png", "c/0.png", "c/1.png"], np.array([0, 0, 1, 2, 2]), 0.01)
    assert tiny.tolist().count(True) == 2 and not tiny[2] and tiny[:2].sum() == 1 and tiny[3:].sum() == 1
    almost_all = held_out_mask(["a/0.png", "a/1.png", "a/2.png"], np.zeros(3), 0.99)
    assert almost_all.sum() == 2
    assert not held_out_mask(paths, targets, 0.0).any()
    with pytest.raises(ValueError, match="val_fraction"):
        held_out_mask(paths, targets, 1.0)


def write_labeled_folder(root: Path, n_per_class: int) -> None:
    """root/<class>/*.png with no train/val sub-folders; class = bright square left or right."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            a[5:15, 1 + 9 * c:10 + 9 * c] = 230
            Image.fromarray(a).save(root / name / f"{i:02d}.png")


def test_val_fraction_splits_one_folder(tmp_path: Path) -> None:
    root = tmp_path / "one"
    write_labeled_folder(root, 20)
    (root / "left" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    cfg = folder_cfg(root, val_fraction=0.3, split_seed=5)
    train, val, test = (build_base_dataset(cfg, s) for s in ("train", "val", "test"))
    assert isinstance(train, SubsetDataset) and train.classes == ["left", "right"]
    train_paths = {train.base.paths[i] for i in train.indices}
    val_paths = {val.base.paths[i] for i in val.indices}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 41
    assert val_paths == {test.base.paths[i] for i in test.indices}  # "test" names the held-out part too
    assert set(np.unique(val.targets)) == {0, 1} and 0.15 < len(val) / 41 < 0.45
    # a broken file falls through to the next readable file of its own part, never across parts
    part = train if str(root / "left" / "zz_broken.png") in train_paths else val
    k = [part.base.paths[i] for i in part.indices].index(str(root / "left" / "zz_broken.png"))
    img, _ = part[k]
    assert np.array_equal(np.asarray(img), np.asarray(part[(k + 1) % len(part)][0]))
    assert part.num_skipped == 1 and (val if part is train else train).num_skipped == 0
    # subset keeps evenly spaced samples of the part
    assert len(build_base_dataset(folder_cfg(root, val_fraction=0.3, subset=6), "train")) == 6
    with pytest.raises(ValueError, match="'train' or 'val'"):
        build_base_dataset(cfg, "holdout")
    nested = tmp_path / "nested"
    write_labeled_folder(nested / "train", 2)
    write_labeled_folder(nested / "val", 2)
    with pytest.raises(ValueError, match="val_fraction=0"):
        build_base_dataset(folder_cfg(nested, val_fraction=0.2), "train")
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(10):
        rgb_image(k, (8, 8)).save(flat / f"{k}.png")
    parts = [build_base_dataset(folder_cfg(flat, val_fraction=0.3), s) for s in ("train", "val")]
    assert len(parts[0]) + len(parts[1]) == 10 and len(parts[1]) >= 1 and parts[0].targets.tolist()[0] == -1


@pytest.mark.parametrize("bad, key", [
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data.val_fraction=-0.1"], "data.val_fraction"),
    (["data.val_fraction=0.2"], "data.val_fraction"),  # synthetic data has its own splits
    (["data.background=[255,255]"], "data.background"),
    (["data.background=[0,0,256]"], "data.background"),
    (["data.max_image_pixels=0"], "data.max_image_pixels"),
])
def test_config_checks(tmp_path: Path, bad: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, tiny_overrides(tmp_path, *bad))


def test_config_split_names_with_val_fraction(tmp_path: Path) -> None:
    root = tmp_path / "one"
    write_labeled_folder(root, 2)
    ok = [f"data.root={root}", "data.name=folder", "data.val_fraction=0.2"]
    assert load_config(None, tiny_overrides(tmp_path, *ok)).data.eval_split == "test"
    with pytest.raises(ConfigError, match="data.eval_split"):
        load_config(None, tiny_overrides(tmp_path, *ok, "data.eval_split=holdout"))
    with pytest.raises(ConfigError, match="data.train_split"):
        load_config(None, tiny_overrides(tmp_path, *ok, "data.train_split=all"))
    cfg = load_config(None, tiny_overrides(tmp_path, *ok, "data.max_image_pixels=null"))
    assert cfg.data.max_image_pixels is None and list(cfg.data.background) == [255, 255, 255]


# ----------------------------------------------------------------------------------------------------
# End to end: `cmim pretrain` and `cmim eval knn`
# ----------------------------------------------------------------------------------------------------


def test_pretrain_lists_two_unreadable_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "imgs"
    write_labeled_folder(root / "train", 15)  # 30 good + 2 bad = 32 = two full batches of 16 per epoch
    (root / "train" / "left" / "empty.png").write_bytes(b"")
    (root / "train" / "right" / "notes.jpg").write_text("not a JPEG\n")
    over = tiny_overrides(tmp_path, "data.name=folder", f"data.root={root}", "data.train_split=train",
                          "data.num_workers=2", "monitor.every_epochs=0", "train.epochs=2")
    assert main(["pretrain", minimal_recipe(tmp_path), *over]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_images"] == 2
    assert summary["skipped_list"] == str(run / "skipped.txt")
    lines = (run / "skipped.txt").read_text().splitlines()
    assert len(lines) == 2
    assert [Path(ln.split("\t")[0]).name for ln in lines] == ["empty.png", "notes.jpg"]
    assert all(ln.split("\t")[1].startswith("UnidentifiedImageError") for ln in lines)
    assert last.endswith(f"; 2 unreadable images skipped (listed in {run / 'skipped.txt'})"), last


def test_val_fraction_pretrain_monitor_and_eval_knn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "one"
    write_labeled_folder(root, 16)
    over = tiny_overrides(tmp_path, "data.name=folder", f"data.root={root}", "data.val_fraction=0.25",
                          "data.eval_split=val", "train.epochs=1", "train.batch_size=8",
                          "data.split_twins=false")  # the plain hash rule (twins: tests/test_splits.py)
    assert main(["pretrain", minimal_recipe(tmp_path), *over]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] == 0 and not (run / "skipped.txt").exists()
    assert [r["step"] for r in summary["knn"]] == [0, summary["steps"]]  # the monitor ran on the split
    rel = [f"{c}/{i:02d}.png" for c in ("left", "right") for i in range(16)]
    held = held_out_mask(rel, np.repeat([0, 1], 16), 0.25, seed=0)
    assert summary["steps"] == math.floor((~held).sum() / 8)  # pre-training saw the train part only
    out = tmp_path / "knn.json"
    # no data overrides: the eval takes the checkpoint's folder, val_fraction and split names
    assert main(["eval", "knn", summary["checkpoint"], "precision=fp32", "data.num_workers=0",
                 f"cache_dir={tmp_path / 'cache'}", f"out={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["features"]["train_samples"] == int((~held).sum())
    assert result["features"]["test_samples"] == int(held.sum())
    assert result["features"]["test_split"] == "val" and result["dataset"]["root"] == str(root)
    assert "cmim eval knn" in capsys.readouterr().out
