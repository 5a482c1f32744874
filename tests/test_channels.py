"""Any channel count, any bit depth: multi-band TIFF, 16-bit PNG and .npy folders read at full depth as float32
views, the N-channel photometric ops, data.mean/std=auto, and the one-line channel error; end to end through
DataLoader workers, pre-training (ConMIM, MoCo v3) and `cmim eval knn`."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torchvision.transforms.v2.functional as TF
from conftest import minimal_recipe, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from cmim.cli import main
from cmim.config import ConfigError, DataConfig, from_yaml_string
from cmim.data import (
    ChannelMismatch,
    EvalDataset,
    ImageFolderDataset,
    PretrainDataset,
    SyntheticDataset,
    ViewMaker,
    ViewSpec,
    apply_photometric,
    build_eval_dataset,
    build_pretrain_dataset,
    load_pixels,
    sample_photometric_params,
)
from cmim.data.base import BitDepth
from cmim.data.images import _high_bit_depth_to_l
from cmim.data.pixels import load_image
from cmim.data.stats import estimate_mean_std, resolve_auto_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def write_png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count) written by hand: PIL writes 16 bits for
    grey only."""
    a = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def band_image(label: int, k: int, size: int = 20, bands: int = 5, peak: int = 65535) -> np.ndarray:
    """uint16 (H, W, bands): class 0 bright in the left half, class 1 in the right half; each band its own gain."""
    rng = np.random.default_rng([label, k])
    x = rng.uniform(0.05, 0.2, (size, size, bands))
    half = slice(0, size // 2) if label == 0 else slice(size // 2, size)
    x[:, half] += 0.6
    x *= np.linspace(0.5, 1.0, bands)
    return np.clip(np.rint(x * peak), 0, peak).astype(np.uint16)


def write_band_folder(root: Path, n: int, layout: str = "hwc") -> None:
    """Two labeled classes of 5-band uint16 TIFFs, (H, W, C) or (C, H, W)."""
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            a = band_image(label, k)
            tifffile.imwrite(root / name / f"{k:02d}.tif", a if layout == "hwc" else a.transpose(2, 0, 1))


def DataCfg(**kw):
    return OmegaConf.structured(DataConfig(**{"img_size": 16, "eval_crop_pct": 1.0, "num_workers": 0, **kw}))


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwc", "chw", "planar"])
def test_multiband_tiff_layouts_full_depth(tmp_path: Path, layout: str) -> None:
    a = band_image(0, 1)
    path = tmp_path / "x.tif"
    if layout == "hwc":  # tifffile stores it as 20 pages of 20 x 5: the smaller end axis is the channels
        tifffile.imwrite(path, a)
    elif layout == "chw":
        tifffile.imwrite(path, a.transpose(2, 0, 1))
    else:  # one page, 5 samples per pixel (planar)
        tifffile.imwrite(path, a.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
    x = load_pixels(path, 5)
    assert x.dtype == np.float32 and x.shape == (20, 20, 5)
    assert np.array_equal(x, a.astype(np.float32) / np.float32(65535))
    with pytest.raises(ChannelMismatch, match=r"x\.tif has 5 channels .*set data\.in_chans=5"):
        load_pixels(path, 3)


def test_12bit_png_in_16bit_container_and_16bit_rgb(tmp_path: Path) -> None:
    g = np.random.default_rng(0).integers(0, 4096, (12, 10)).astype(np.uint16)  # raw 12-bit values
    Image.fromarray(g).save(tmp_path / "g12.png")
    x = load_pixels(tmp_path / "g12.png", 1)
    assert x.shape == (12, 10, 1) and np.array_equal(x[:, :, 0], g.astype(np.float32) / np.float32(65535))
    rgb = np.random.default_rng(1).integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    write_png16(tmp_path / "rgb16.png", rgb)
    assert np.array_equal(load_pixels(tmp_path / "rgb16.png", 3), rgb.astype(np.float32) / np.float32(65535))
    # 16-bit RGB + alpha in a 3-channel run: composited over the background, as the 8-bit path does
    rgba = np.concatenate([rgb, np.zeros((8, 9, 1), np.uint16)], axis=2)
    write_png16(tmp_path / "rgba16.png", rgba)
    assert np.allclose(load_pixels(tmp_path / "rgba16.png", 3, background=(255, 0, 0)), [1.0, 0.0, 0.0])
    assert load_pixels(tmp_path / "rgba16.png", 4).shape == (8, 9, 4)  # 4 channels asked: alpha kept as data
    # the 8-bit path (bit_depth auto, 1 channel) is unchanged: PIL's I;16 image rescaled to 8 bits
    with Image.open(tmp_path / "g12.png") as im:
        assert np.array_equal(np.asarray(load_image(tmp_path / "g12.png", 1)), np.asarray(_high_bit_depth_to_l(im)))


def test_npy_and_8bit_files_in_the_float_path(tmp_path: Path) -> None:
    a = np.random.default_rng(0).random((6, 7, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    assert np.array_equal(load_pixels(tmp_path / "f.npy", 4), a)
    u = (a * 1000).astype(np.uint16)
    np.save(tmp_path / "u.npy", u)
    assert np.array_equal(load_pixels(tmp_path / "u.npy", 4), u.astype(np.float32) / np.float32(65535))
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object))
    with pytest.raises(ValueError, match="Python objects|allow_pickle"):  # never unpickled
        load_pixels(tmp_path / "obj.npy", 1)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(load_pixels(tmp_path / "c.png", 3), rgb.astype(np.float32) / np.float32(255))
    assert np.array_equal(np.asarray(load_image(tmp_path / "c.png", 3)), rgb)  # 8-bit path untouched
    # a 3-channel 8-bit .npy in the 8-bit path becomes the same RGB image
    np.save(tmp_path / "c.npy", rgb)
    assert np.array_equal(np.asarray(load_image(tmp_path / "c.npy", 3)), rgb)


def test_channel_mismatch_is_one_line_and_rgba_still_composited(tmp_path: Path) -> None:
    root = tmp_path / "four"
    root.mkdir()
    for k in range(3):  # RGB + near-infrared: 4 bands, no alpha
        tifffile.imwrite(root / f"{k}.tif", np.full((8, 8, 4), 40 * k, np.uint8), photometric="rgb",
                         extrasamples=["unspecified"])
    cfg = DataCfg(name="folder", root=str(root), train_split="", in_chans=3)
    with pytest.raises(ChannelMismatch) as e:
        build_pretrain_dataset(cfg, "", ViewSpec(1, ["none"], [0]), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "0.tif has 4 channels" in msg and "set data.in_chans=4" in msg
    assert isinstance(e.value, ConfigError)  # the CLI prints it as one `cmim: error:` line
    # one odd file among 3-channel ones is skipped and listed with the same reason
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a.png")
    ds = ImageFolderDataset(root, 3)
    assert ds.try_load(ds.paths.index(str(root / "1.tif"))) is None and ds.num_skipped == 1
    # an RGBA PNG in a 3-channel run is composited over data.background, as before
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba / "a.png")
    ev = build_eval_dataset(DataCfg(name="folder", root=str(rgba), train_split="", in_chans=3,
                                    background=[0, 255, 0]), "")
    assert ev[0]["image"][:, 0, 0].tolist() == [0, 255, 0]


def test_cli_channel_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_band_folder(tmp_path / "bands" / "train", 2)
    over = tiny_overrides(tmp_path, "data.name=folder", f"data.root={tmp_path / 'bands'}")  # in_chans=3
    assert main(["pretrain", minimal_recipe(tmp_path), *over]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("cmim: error:") and "has 5 channels" in err[0]
    assert "set data.in_chans=5" in err[0]


# ----------------------------------------------------------------------------------------------------
# Views and photometric ops
# ----------------------------------------------------------------------------------------------------


def test_float_views_deterministic_across_workers(tmp_path: Path) -> None:
    write_band_folder(tmp_path, 3, layout="chw")
    spec = ViewSpec(1, ["none", "conmim_strong"], [0, 0], lambda rng: rng.random((4, 4)) < 0.5)
    cfg = DataCfg(name="folder", root=str(tmp_path), in_chans=5, mean="auto", std="auto", crop_scale=[0.3, 1.0])
    ds = build_pretrain_dataset(cfg, "", spec, seed=0)
    item = ds[2]
    assert item["crops"].shape == (1, 5, 16, 16) and item["crops"].dtype == torch.float32
    assert item["mask"].shape == (16,) and torch.equal(item["crops"], ds[2]["crops"])
    ref = list(DataLoader(ds, batch_size=3, num_workers=0))
    par = list(DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork"))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(ref, par) for k in x)
    # the same random draws as an 8-bit dataset: boxes, flips, parameters and masks depend on (seed, epoch, index)
    u8 = PretrainDataset(SyntheticDataset(6, 2, 20, 3, seed=1), spec, 16, (0.3, 1.0), (3 / 4, 4 / 3))
    f32 = PretrainDataset(SyntheticDataset(6, 2, 20, 3, seed=1), spec, 16, (0.3, 1.0), (3 / 4, 4 / 3))
    f32.float_pixels = True
    a, b = u8[4], f32[4]
    assert torch.equal(a["aug"], b["aug"]) and torch.equal(a["mask"], b["mask"])
    assert (a["crops"].float() / 255 - b["crops"]).abs().mean() < 0.01  # PIL vs torchvision resampling only
    views = ViewMaker(spec, [0.3] * 5, [0.2] * 5, 5)(default_collate([ds[i] for i in range(4)])["crops"],
                                                        default_collate([ds[i] for i in range(4)])["aug"])
    assert [v.shape for v in views] == [(4, 5, 16, 16)] * 2 and all(torch.isfinite(v).all() for v in views)
    ev = EvalDataset(ds.base, img_size=16, eval_crop_pct=0.8)
    assert ev[0]["image"].shape == (5, 16, 16) and ev[0]["image"].dtype == torch.float32


def _reference_bands(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    """The documented N-channel pipeline, one image: brightness x*f, contrast about each channel's own mean
    (saturation, hue and grayscale skipped), blur, solarize."""
    if p[0] > 0.5:
        for op in p[5:9].astype(int):
            f = float(p[1 + op])
            if op == 0:
                x = (x * f).clamp(0, 1)
            elif op == 1:
                x = (x * f + x.mean(dim=(-2, -1), keepdim=True) * (1 - f)).clamp(0, 1)
    if p[10] > 0.5:
        x = TF.gaussian_blur(x, [13, 13], [float(p[11])] * 2)
    return torch.where(x >= 0.5, 1 - x, x) if p[12] > 0.5 else x


def test_apply_photometric_on_five_bands() -> None:
    x = torch.rand(16, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    profiles = ["conmim_strong", "byol1", "byol2", "none"]
    params = np.stack([sample_photometric_params(profiles[i % 4], rng) for i in range(len(x))])
    params[:4, 0], params[:4, 9] = 1.0, 1.0  # jittered, and asked for grayscale (skipped: no RGB)
    got = apply_photometric(x, torch.from_numpy(params), 5)
    ref = torch.stack([_reference_bands(x[i], params[i]) for i in range(len(x))])
    assert got.shape == x.shape and torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(got[3::4], x[3::4])


def test_float_path_on_8bit_data_equals_uint8_divided() -> None:
    """bit_depth=full on 8-bit data: the eval images are the uint8 ones / 255 (no resampling at the native size)."""
    cfg = DataCfg(name="synthetic", in_chans=1, mean=[0.5], std=[0.25], synthetic_size=8)
    u8 = build_eval_dataset(cfg, "test")
    cfg.bit_depth = BitDepth.full
    f32 = build_eval_dataset(cfg, "test")
    assert f32[3]["image"].dtype == torch.float32
    assert torch.equal(f32[3]["image"], u8[3]["image"].float() / 255)


# ----------------------------------------------------------------------------------------------------
# data.mean/std=auto
# ----------------------------------------------------------------------------------------------------


def test_mean_std_auto_matches_numpy(tmp_path: Path) -> None:
    write_band_folder(tmp_path, 4)
    cfg = DataCfg(name="folder", root=str(tmp_path), train_split="", in_chans=5, mean="auto", std=[1.0] * 5)
    info = resolve_auto_stats(cfg, "")
    # the eval transform resizes 20 px to 16 (antialiased): the mean moves a little, hence the tolerance
    pix = np.stack([band_image(c, k) for c in (0, 1) for k in range(4)]).astype(np.float64) / 65535
    assert info is not None and info["images"] == 8 and info["estimated"] == ["mean"]
    assert list(cfg.std) == [1.0] * 5 and len(cfg.mean) == 5
    assert np.allclose(cfg.mean, pix.mean(axis=(0, 1, 2)), atol=2e-3)
    mean, std, n = estimate_mean_std(build_eval_dataset(cfg, ""), num_images=3)
    assert n == 3 and all(s > 0 for s in std) and mean == estimate_mean_std(build_eval_dataset(cfg, ""), 3)[0]


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------


def test_pretrain_conmim_on_5band_tiffs_then_eval_knn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "bands"
    write_band_folder(root, 8)
    over = tiny_overrides(tmp_path, "data.name=folder", f"data.root={root}", "data.in_chans=5",
                          "data.mean=auto", "data.std=auto", "data.val_fraction=0.25", "data.eval_split=val",
                          "data.num_workers=2", "train.epochs=1", "train.batch_size=4", "monitor.health_images=8",
                          "data.split_twins=false")  # each class's bands are one picture: twins
    assert main(["pretrain", minimal_recipe(tmp_path), *over]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] >= 2 and summary["skipped_images"] == 0
    stats = summary["data_stats"]
    assert len(stats["mean"]) == 5 and stats["mean"][0] < stats["mean"][4]  # the band gains
    saved = from_yaml_string((run / "config.yaml").read_text())
    assert list(saved.data.mean) == stats["mean"] and list(saved.data.std) == stats["std"]
    assert [r["step"] for r in summary["health"]] == [0, summary["steps"]]
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", summary["checkpoint"], "precision=fp32", "data.num_workers=2",
                 f"cache_dir={tmp_path / 'cache'}", f"out={out}", "knn.ks=[3]"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["data"]["mean"] == stats["mean"]  # the checkpoint's numbers, not "auto"
    assert result["features"]["train_samples"] + result["features"]["test_samples"] == 16
    assert "cmim eval knn" in capsys.readouterr().out
    # timm's PIL augmentations take 8-bit 1/3-channel images: fine-tuning says so in one line
    assert main(["eval", "finetune", summary["checkpoint"], "data.num_workers=0"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "data.in_chans=5" in err[0]


def test_pretrain_mocov3_on_12bit_pngs_unlabeled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One flat, unlabeled folder of 12-bit PNGs at full depth: MoCo v3 trains, k-NN says once it cannot run, the
    health check runs on a fixed sample of the training images."""
    root = tmp_path / "flat"
    root.mkdir()
    for k in range(8):
        Image.fromarray(band_image(k % 2, k, bands=1, peak=4095)[:, :, 0]).save(root / f"{k}.png")
    over = tiny_overrides(tmp_path, "method=mocov3", "data.name=folder", f"data.root={root}", "data.train_split=.",
                          "data.in_chans=1", "data.bit_depth=full", "data.mean=auto", "data.std=auto",
                          "data.num_workers=2", "train.epochs=1", "train.batch_size=4", "monitor.health_images=6")
    assert main(["pretrain", minimal_recipe(tmp_path), *over]) == 0
    out = capsys.readouterr().out
    assert out.count("[k-NN] not measured") == 1 and "[health] epoch 1 step 2" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["knn"] == [] and len(summary["health"]) == 2 and not summary["health"][0]["held_out"]
    assert summary["data_stats"]["mean"][0] < 0.0625  # raw 12-bit values in a 16-bit container, scaled by 65535
