"""``data.decode=device``: workers read JPEG bytes and draw crop boxes, the step decodes (here on the CPU, the
same code path as CUDA's apart from the decoder library)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from torch.utils.data import DataLoader

from cmim.cli import main
from cmim.config import ConfigError, load_config
from cmim.data.base import DecodeMode, EncodedJpeg
from cmim.data.decode import DeviceDecoder, collate_pretrain
from cmim.data.factory import build_base_dataset
from cmim.data.folder import ImageFolderDataset
from cmim.data.views import build_pretrain_dataset, random_resized_crop_params
from cmim.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_rgb(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image (smooth, so JPEG keeps it close): noise upscaled from a coarse grid."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def write_jpeg_folder(root: Path, per_class: int = 6) -> None:
    """train/{a,b}: JPEGs of several sizes, one PNG and one CMYK JPEG (both decoded on the CPU)."""
    for c, name in enumerate("ab"):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            smooth_rgb(10 * c + i, (40 + 6 * i, 30 + 4 * i)).save(d / f"{i}.jpg", quality=95)
    smooth_rgb(99, (36, 36)).save(root / "train" / "a" / "p.png")
    smooth_rgb(98, (36, 36)).convert("CMYK").save(root / "train" / "b" / "cmyk.jpg")


def _cfg(root: Path, *extra: str):
    return load_config(None, tiny_overrides(root.parent, "data.name=folder", f"data.root={root}",
                                            "data.img_size=16", "data.crop_scale=[0.3,1.0]",
                                            "data.cache_images=false",  # the CPU reference decodes full size
                                            *extra))


def _datasets(root: Path, *extra: str):
    cfg = _cfg(root, "data.decode=device", *extra)
    spec = build_method(cfg).view_spec()
    device = build_pretrain_dataset(cfg.data, "train", spec, seed=3)
    cfg.data.decode = DecodeMode.cpu
    cpu = build_pretrain_dataset(cfg.data, "train", spec, seed=3)
    return cfg, device, cpu


def test_device_decode_draws_the_cpu_boxes_and_near_identical_pixels(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_jpeg_folder(root)
    cfg, dev_set, cpu_set = _datasets(root)
    n = len(dev_set)
    items = [dev_set[i] for i in range(n)]
    names = [Path(p).name for p in dev_set.base.paths]
    on_cpu = {i for i, nm in enumerate(names) if nm in ("p.png", "cmyk.jpg")}
    assert {i for i, it in enumerate(items) if "crops" in it} == on_cpu  # everything else left encoded
    for i, it in enumerate(items):  # the boxes are the CPU path's draws, from the same (seed, epoch, index) rng
        if i in on_cpu:
            continue
        w, h = Image.open(dev_set.base.paths[i]).size
        rng = np.random.default_rng([3, 0, i])
        for k in range(it["boxes"].shape[0]):
            box = random_resized_crop_params(rng, h, w, dev_set.crop_scale, dev_set.log_ratio)
            assert tuple(it["boxes"][k].tolist()) == box
            assert bool(it["flips"][k]) == (rng.random() < dev_set.hflip_prob)
    batch = collate_pretrain(items)
    ref = collate_pretrain([cpu_set[i] for i in range(n)])
    assert batch["encoded"]["rows"].tolist() == sorted(set(range(n)) - on_cpu)
    crops = DeviceDecoder(16, 3, "cpu", dev_set.decoded_item)(batch)
    assert crops.shape == ref["crops"].shape and crops.dtype == torch.uint8
    diff = (crops.float() - ref["crops"].float()).abs()
    assert diff.mean() < 1.0 and diff.max() <= 12  # rounding of another resize, not another crop
    for row in on_cpu:  # CPU-decoded rows are passed through untouched
        assert torch.equal(crops[row], ref["crops"][row])
    for key in ("aug", "mask", "label", "index"):
        assert torch.equal(batch[key], ref[key]), key


def test_grayscale_recipe_decodes_jpeg_to_one_channel(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_jpeg_folder(root, per_class=2)
    extra = ("data.in_chans=1", "data.mean=[0.5]", "data.std=[0.25]")
    _, dev_set, cpu_set = _datasets(root, *extra)
    batch = collate_pretrain([dev_set[i] for i in range(len(dev_set))])
    crops = DeviceDecoder(16, 1, "cpu", dev_set.decoded_item)(batch)
    ref = collate_pretrain([cpu_set[i] for i in range(len(cpu_set))])["crops"]
    assert crops.shape == ref.shape and crops.shape[2] == 1
    assert (crops.float() - ref.float()).abs().mean() < 1.5


def test_broken_jpeg_is_skipped_in_the_worker_and_a_device_failure_redone_on_cpu(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_jpeg_folder(root, per_class=3)
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "cut.jpg").write_bytes(good[: len(good) // 2])  # no end-of-image marker
    _, dev_set, _ = _datasets(root)
    cut = [Path(p).name for p in dev_set.base.paths].index("cut.jpg")
    loader = DataLoader(dev_set, batch_size=4, num_workers=2, collate_fn=collate_pretrain)
    batches = list(loader)
    assert dev_set.base.num_skipped == 1 and dev_set.base.skipped_paths[0].endswith("cut.jpg")
    assert sum(b["index"].shape[0] for b in batches) == len(dev_set)
    assert cut in torch.cat([b["index"] for b in batches]).tolist()  # its slot holds the next readable file

    decoder = DeviceDecoder(16, 3, "cpu", dev_set.decoded_item)
    batch = collate_pretrain([dev_set[i] for i in range(4)])
    first = int(batch["encoded"]["rows"][0])
    real = decoder._decode

    def reject_first(data):  # the device decoder fails on one image that the CPU can read
        out = real(data)
        out[0] = None
        return out

    decoder._decode = reject_first
    crops = decoder(batch)
    assert decoder.num_fallbacks == 1
    assert torch.equal(crops[first], dev_set.decoded_item(int(batch["index"][first]))["crops"])


def test_decode_mode_is_fixed_at_construction(tmp_path: Path) -> None:
    """data.decode=device is given to the folder when it is built: a dataset built later over the same folder (the
    evaluation's) decodes, and the CPU fallback of one item leaves the device dataset handing out JPEG bytes."""
    root = tmp_path / "jpegs"
    write_jpeg_folder(root)
    cfg, dev_set, _ = _datasets(root)
    assert isinstance(dev_set.base[0][0], EncodedJpeg)
    evals = build_base_dataset(cfg.data, "train")  # cfg.data.decode is device; evaluations decode on the CPU
    assert isinstance(evals[0][0], Image.Image)
    assert dev_set.decoded_item(0)["crops"].dtype == torch.uint8  # decoded on the CPU ...
    assert isinstance(dev_set.base[0][0], EncodedJpeg)  # ... without switching the dataset it came from
    assert "jpeg" in dev_set[0] and "crops" not in dev_set[0]
    folder = ImageFolderDataset(root / "train", 3, decode_mode="device")
    twin = folder.decoding_on_cpu()  # a new dataset over the same files and skip record
    assert twin is not folder and twin.skip_flags is folder.skip_flags and folder.decoding_on_cpu() is not twin
    assert isinstance(folder[1][0], EncodedJpeg) and isinstance(twin[1][0], Image.Image)
    assert twin.decoding_on_cpu() is twin


def test_config_refuses_device_decode_without_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.decode=device"):
        load_config(None, tiny_overrides(tmp_path, "data.decode=device"))
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(None, tiny_overrides(tmp_path, "data.decode=gpu"))


def test_pretrain_with_device_decode_runs_with_workers(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_jpeg_folder(root, per_class=7)  # 16 files = one batch of 16 per epoch
    over = tiny_overrides(tmp_path, "data.name=folder", f"data.root={root}", "data.img_size=16",
                          "data.decode=device", "data.num_workers=2", "monitor.every_epochs=0", "train.epochs=2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: conmim\n")
    assert main(["pretrain", str(recipe), *over]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_images"] == 0
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(ln).get("kind") == "train"]
    assert losses and all(np.isfinite(losses))
