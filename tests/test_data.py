"""Tests for cmim.data: base datasets, deterministic views, batched photometric ops."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from cmim.config import DataConfig
from cmim.data import (
    CIFAR,
    NUM_PARAMS,
    PROFILES,
    EvalDataset,
    FashionMNIST,
    ImageFolderDataset,
    PretrainDataset,
    SyntheticDataset,
    ViewMaker,
    ViewSpec,
    apply_photometric,
    build_base_dataset,
    build_eval_dataset,
    build_pretrain_dataset,
    normalize,
    sample_photometric_params,
    scan_unreadable,
)
from cmim.data import augment as A

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def DataCfg(**overrides: Any) -> DictConfig:
    """The project's DataConfig with small test defaults (16 px synthetic, 1 channel)."""
    small = dict(name="synthetic", img_size=16, in_chans=1, mean=[0.5], std=[0.25], crop_scale=[0.3, 1.0],
                 eval_crop_pct=1.0, synthetic_size=64, num_workers=0)
    return OmegaConf.structured(DataConfig(**{**small, **overrides}))


def grid_mask(rng: np.random.Generator) -> np.ndarray:
    return rng.random((4, 4)) < 0.5


# ----------------------------------------------------------------------------------------------------
# Base datasets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST absent")
def test_fashion_mnist_real_files() -> None:
    test = FashionMNIST(FMNIST_ROOT, "test")
    assert len(test) == 10000 and test.num_classes == 10 and len(test.classes) == 10
    img, label = test[0]
    assert img.shape == (28, 28) and img.dtype == np.uint8 and 0 <= label < 10
    assert test.targets.dtype == np.int64 and np.bincount(test.targets).tolist() == [1000] * 10
    rgb, _ = FashionMNIST(None, "test", in_chans=3)[0]
    assert rgb.shape == (28, 28, 3) and (rgb == img[:, :, None]).all()
    train = build_base_dataset(DataCfg(name="fashion-mnist", subset=100), "train")
    assert len(train) == 100
    assert len(FashionMNIST(FMNIST_ROOT, "train")) == 60000


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_parsing(tmp_path: Path, compress: bool) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress)
    ds = FashionMNIST(tmp_path, "test")
    assert len(ds) == 5 and (ds.images == imgs).all() and ds.targets.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(FileNotFoundError, match="train-images"):
        FashionMNIST(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        FashionMNIST(tmp_path / "nope", "test")


def _save_modes_tree(root: Path) -> dict[str, int]:
    """Class sub-folders with images of many modes plus two unreadable files; returns name → label."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    Image.fromarray(rgb).convert("P").save(root / "cat" / "p.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "cat" / "rgba.PNG")
    Image.fromarray(rgb).convert("L").save(root / "cat" / "l.jpg")
    Image.fromarray((rng.integers(0, 65536, (18, 22))).astype(np.uint16)).save(root / "dog" / "i16.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "dog" / "nested" / "cmyk.jpeg")
    good = root / "dog" / "good.bmp"
    Image.fromarray(rgb).save(good)
    png = root / "cat" / "full.png"
    Image.fromarray(rgb).save(png)
    (root / "cat" / "truncated.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    png.unlink()
    (root / "dog" / "notes.jpg").write_text("this is not an image\n")
    (root / "dog" / "readme.txt").write_text("ignored: not an image extension\n")
    return {"p.png": 0, "rgba.PNG": 0, "l.jpg": 0, "i16.png": 1, "cmyk.jpeg": 1, "good.bmp": 1}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_folder_modes_and_unreadable(tmp_path: Path, in_chans: int) -> None:
    expected = _save_modes_tree(tmp_path / "train")
    ds = ImageFolderDataset(tmp_path / "train", in_chans=in_chans)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8 and ds.num_skipped == 0
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == ("L" if in_chans == 1 else "RGB")
        name = Path(ds.paths[i]).name
        assert label == expected.get(name, label)
    assert ds.num_skipped == 2
    assert sorted(Path(p).name for p in ds.skipped_paths) == ["notes.jpg", "truncated.png"]
    # A bad index falls through to the next readable one, deterministically.
    bad = ds.paths.index(str(tmp_path / "train" / "cat" / "truncated.png"))
    assert np.array_equal(np.asarray(ds[bad][0]), np.asarray(ds[(bad + 1) % len(ds)][0]))
    # 16-bit data is rescaled to 8 bits instead of being clipped to 255.
    i16 = np.asarray(ds[ds.paths.index(str(tmp_path / "train" / "dog" / "i16.png"))][0])
    assert 60 < i16.mean() < 200
    fresh = ImageFolderDataset(tmp_path / "train", in_chans=in_chans)
    assert [Path(p).name for p in scan_unreadable(fresh)] == ["truncated.png", "notes.jpg"]
    assert fresh.num_skipped == 2


def test_image_folder_skips_counted_across_workers(tmp_path: Path) -> None:
    _save_modes_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, in_chans=3)
    ev = EvalDataset(ds, img_size=16, eval_crop_pct=0.875)
    loader = DataLoader(ev, batch_size=3, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 8
    assert batches[0]["image"].shape == (3, 3, 16, 16) and batches[0]["image"].dtype == torch.uint8
    assert ds.num_skipped == 2  # recorded by the workers, visible in the main process


def test_image_folder_flat_and_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        Image.new("RGB", (10 + k, 12), (k, 2 * k, 3 * k)).save(flat / f"{k}.png")
    ds = ImageFolderDataset(flat, in_chans=3)
    assert ds.classes == [] and ds.num_classes == 0 and ds.targets.tolist() == [-1, -1, -1]
    assert ds[0][1] == -1
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    cfg = DataCfg(name="folder", root=str(tmp_path), in_chans=3)
    assert len(build_base_dataset(cfg, "flat")) == 3
    with pytest.raises(FileNotFoundError, match="val"):
        build_base_dataset(cfg, "val")


def _write_cifar(root: Path, num_classes: int, n: int) -> np.ndarray:
    """Official pickle layout: dict with bytes keys, data (N, 3072) uint8 as R, G, B planes."""
    rng = np.random.default_rng(num_classes)
    all_data = []
    names = (
        [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    )
    for name in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        batch = {b"batch_label": name.encode(), b"data": data, b"filenames": [b"x.png"] * n}
        if num_classes == 10:
            batch[b"labels"] = labels
        else:
            batch[b"fine_labels"], batch[b"coarse_labels"] = labels, [0] * n
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
        all_data.append(data)
    meta_name, key = ("batches.meta", b"label_names") if num_classes == 10 else ("meta", b"fine_label_names")
    with open(root / meta_name, "wb") as f:
        pickle.dump({key: [f"c{k}".encode() for k in range(num_classes)]}, f)
    return np.concatenate(all_data)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickles(tmp_path: Path, num_classes: int) -> None:
    data = _write_cifar(tmp_path, num_classes, n=4)
    train = CIFAR(tmp_path, "train", num_classes)
    test = CIFAR(tmp_path, "test", num_classes)
    assert len(train) == (20 if num_classes == 10 else 4) and len(test) == 4
    assert train.classes[1] == "c1" and train.num_classes == num_classes
    img, label = train[0]
    assert img.shape == (32, 32, 3) and 0 <= label < num_classes
    assert tuple(img[0, 1]) == (data[0, 1], data[0, 1025], data[0, 2049])
    gray, _ = CIFAR(tmp_path, "train", num_classes, in_chans=1)[0]
    assert gray.shape == (32, 32) and np.array_equal(gray, np.asarray(Image.fromarray(img).convert("L")))
    cfg = DataCfg(name=f"cifar{num_classes}", root=str(tmp_path), in_chans=3, subset=3)
    assert len(build_base_dataset(cfg, "test")) == 3


def test_synthetic_deterministic_and_learnable() -> None:
    a, b = SyntheticDataset(200, 10, 28, 1, seed=3), SyntheticDataset(200, 10, 28, 1, seed=3)
    assert np.array_equal(a[7][0], b[7][0]) and a[7][1] == b[7][1]
    assert not np.array_equal(a[7][0], SyntheticDataset(200, 10, 28, 1, seed=4)[7][0])
    test = SyntheticDataset(200, 10, 28, 1, seed=5)

    def feats(ds: SyntheticDataset) -> np.ndarray:
        x = np.stack([ds[i][0].reshape(-1) for i in range(len(ds))]).astype(np.float64)
        x -= x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sim = feats(test) @ feats(a).T
    acc = (a.targets[sim.argmax(1)] == test.targets).mean()
    assert acc > 0.5, acc  # chance is 0.1
    assert SyntheticDataset(4, 3, 20, 3)[0][0].shape == (20, 20, 3)


# ----------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------


def _pretrain(spec: ViewSpec, seed: int = 0, in_chans: int = 1) -> PretrainDataset:
    base = SyntheticDataset(32, 4, 24, in_chans, seed=1)
    return PretrainDataset(base, spec, 16, (0.3, 1.0), (3 / 4, 4 / 3), "bicubic", 0.5, seed=seed)


def _equal_items(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pretrain_items_deterministic() -> None:
    spec = ViewSpec(1, ["none", "conmim_strong"], [0, 0], grid_mask)
    ds = _pretrain(spec)
    item = ds[5]
    assert item["crops"].shape == (1, 1, 16, 16) and item["crops"].dtype == torch.uint8
    assert item["aug"].shape == (2, NUM_PARAMS) and item["aug"].dtype == torch.float32
    assert item["mask"].shape == (16,) and item["mask"].dtype == torch.bool
    assert item["label"].dtype == torch.int64 and int(item["index"]) == 5
    assert _equal_items(item, ds[5]) and _equal_items(item, _pretrain(spec)[5])
    ds.set_epoch(1)
    other = ds[5]
    assert not torch.equal(item["crops"], other["crops"]) and not torch.equal(item["mask"], other["mask"])
    assert not torch.equal(item["crops"], _pretrain(spec, seed=1)[5]["crops"])
    ds.set_epoch(0)
    assert _equal_items(item, ds[5])
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["crops"].shape == (4, 1, 1, 16, 16) and batch["mask"].shape == (4, 16)
    assert batch["label"].shape == (4,) and batch["index"].tolist() == [0, 1, 2, 3]


def test_pretrain_workers_match_single_process() -> None:
    ds = _pretrain(ViewSpec(2, ["byol1", "byol2"], [0, 1]), in_chans=3)
    ds.set_epoch(2)
    ref = list(DataLoader(ds, batch_size=5, num_workers=0))
    par = list(DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork"))
    assert len(ref) == len(par) and all(_equal_items(x, y) for x, y in zip(ref, par))
    assert ref[0]["crops"].shape == (5, 2, 3, 16, 16)
    assert not torch.equal(ref[0]["crops"][:, 0], ref[0]["crops"][:, 1])  # two independent crops


def test_shared_crop_gives_identical_plain_views() -> None:
    spec = ViewSpec(1, ["none", "none"], [0, 0])
    batch = default_collate([_pretrain(spec)[i] for i in range(4)])
    v0, v1 = ViewMaker(spec, [0.5], [0.25], 1)(batch["crops"], batch["aug"])
    assert torch.equal(v0, v1)


def test_random_resized_crop_params_ranges() -> None:
    from cmim.data.views import random_resized_crop_params

    rng = np.random.default_rng(0)
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(rng, 30, 40, (0.08, 1.0), log_ratio)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h > 0 and w > 0
    # impossible constraints fall back to the torchvision centre crop
    assert random_resized_crop_params(rng, 10, 40, (2.0, 2.0), (0.0, 0.0)) == (0, 15, 10, 10)


def test_eval_dataset_resize_and_center_crop(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    item = EvalDataset(ImageFolderDataset(tmp_path, 3), img_size=16, eval_crop_pct=0.8)[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    assert item["image"][:, 8, 8].tolist() == [10, 20, 30]
    cfg = DataCfg(synthetic_size=10)
    ev = build_eval_dataset(cfg, cfg.eval_split)
    base = build_base_dataset(cfg, cfg.eval_split)
    assert torch.equal(ev[3]["image"][0], torch.from_numpy(base[3][0]))  # 1.0 and same size: untouched
    pre = build_pretrain_dataset(cfg, cfg.train_split, ViewSpec(1, ["none"], [0]), seed=0)
    assert len(pre) == 10 and pre[0]["crops"].shape == (1, 1, 16, 16)


# ----------------------------------------------------------------------------------------------------
# Photometric ops
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 18, generator=g)
    x[0] = x[0, :1]  # a gray image (hue undefined) and saturated extremes
    x[1, :, :4] = 1.0
    x[1, :, 4:8] = 0.0
    return x


def _per_image(fn, x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return torch.stack([fn(x[i], f) for i, f in enumerate(factors)])


@pytest.mark.parametrize(
    ("batched", "reference", "lo", "hi", "atol"),
    [
        (A.batched_adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-4),
    ],
)
def test_batched_color_ops_match_torchvision(images, batched, reference, lo, hi, atol) -> None:
    factors = np.linspace(lo, hi, len(images)).tolist()
    got = batched(images, torch.tensor(factors))
    assert torch.allclose(got, _per_image(reference, images, factors), atol=atol)
    gray = images[:, :1]
    assert torch.allclose(
        batched(gray, torch.tensor(factors)), _per_image(reference, gray, factors), atol=atol
    )


def test_batched_gray_blur_solarize_match_torchvision(images) -> None:
    ref_gray = torch.stack([TF.rgb_to_grayscale(im) for im in images])
    assert torch.allclose(A.rgb_to_grayscale(images), ref_gray, atol=1e-6)
    apply = torch.tensor([True, False, True, True, False, True])
    ref_sol = torch.stack([TF.solarize(im, 0.5) if a else im for im, a in zip(images, apply)])
    assert torch.equal(A.batched_solarize(images, apply), ref_sol)
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.7]
    ref_blur = _per_image(lambda im, s: TF.gaussian_blur(im, [13, 13], [s, s]), images, sigmas)
    assert torch.allclose(A.batched_gaussian_blur(images, torch.tensor(sigmas)), ref_blur, atol=1e-5)
    small = images[:, :, :5, :5]  # the kernel shrinks so reflect padding stays valid
    ref_small = _per_image(lambda im, s: TF.gaussian_blur(im, [9, 9], [s, s]), small, sigmas)
    assert torch.allclose(A.batched_gaussian_blur(small, torch.tensor(sigmas)), ref_small, atol=1e-5)


def _reference_pipeline(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    """The same pipeline written with torchvision's single-image functionals."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if p[0] > 0.5:
        for op in p[5:9].astype(int):
            x = ops[op](x, float(p[1 + op]))
    if p[9] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if p[10] > 0.5:
        x = TF.gaussian_blur(x, [13, 13], [float(p[11])] * 2)
    return TF.solarize(x, 0.5) if p[12] > 0.5 else x


@pytest.mark.parametrize("in_chans", [1, 3])
def test_apply_photometric_matches_torchvision_pipeline(in_chans: int) -> None:
    x = torch.rand(24, in_chans, 16, 16, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    profiles = ["conmim_strong", "byol1", "byol2", "none"]
    params = np.stack([sample_photometric_params(profiles[i % 4], rng) for i in range(len(x))])
    params[:3, 9] = 0.0  # make sure some colour-jittered views are not grayscaled afterwards
    params[:3, 0] = 1.0
    got = apply_photometric(x, torch.from_numpy(params), in_chans)
    ref = torch.stack([_reference_pipeline(x[i], params[i]) for i in range(len(x))])
    assert got.shape == x.shape and torch.allclose(got, ref, atol=1e-4)
    assert torch.equal(got[3::4], x[3::4])  # "none" parameters are the identity


def test_sample_photometric_params_layout() -> None:
    rng = np.random.default_rng(0)
    assert np.array_equal(sample_photometric_params("none", rng), A.IDENTITY_PARAMS)
    p = np.stack([sample_photometric_params("byol1", rng) for _ in range(400)])
    assert p.shape == (400, NUM_PARAMS) and p.dtype == np.float32
    assert (p[:, 10] == 1).all() and (p[:, 12] == 0).all()
    assert 0.7 < p[:, 0].mean() < 0.9 and 0.1 < p[:, 9].mean() < 0.3
    assert (np.sort(p[:, 5:9], axis=1) == np.arange(4)).all()
    on = p[:, 0] == 1
    assert (np.abs(p[on, 1:3] - 1) <= 0.4).all() and (np.abs(p[on, 3] - 1) <= 0.2).all()
    assert (np.abs(p[on, 4]) <= 0.1).all() and (p[~on, 1:5] == [1, 1, 1, 0]).all()
    assert ((p[:, 11] >= 0.1) & (p[:, 11] <= 2.0)).all()
    with pytest.raises(ValueError, match="unknown"):
        sample_photometric_params("bogus", rng)
    assert set(PROFILES) >= {"none", "conmim_strong", "byol1", "byol2"}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_view_maker(in_chans: int) -> None:
    spec = ViewSpec(2, ["none", "conmim_strong", "byol2"], [0, 0, 1])
    ds = _pretrain(spec, in_chans=in_chans)
    batch = default_collate([ds[i] for i in range(8)])
    mean, std = [0.4] * in_chans, [0.2] * in_chans
    views = ViewMaker(spec, mean, std, in_chans)(batch["crops"], batch["aug"])
    assert len(views) == 3
    for v in views:
        assert v.shape == (8, in_chans, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.equal(views[0], normalize(batch["crops"][:, 0], mean, std))
    assert not torch.equal(views[0], views[1])
    plain = normalize(batch["crops"][0, 0], mean, std)
    assert plain.shape == (in_chans, 16, 16) and torch.equal(plain, views[0][0])
