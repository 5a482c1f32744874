"""The data pipeline's cost, apart from the step: ``PretrainDataset`` items/s in one process (= per CPU core)
and, with ``data.decode=device``, the step's JPEG decoding on the device."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from cmim.bench.timing import timeit
from cmim.data.base import DecodeMode
from cmim.data.decode import DeviceDecoder, collate_pretrain
from cmim.data.factory import build_base_dataset
from cmim.data.folder import ImageFolderDataset
from cmim.data.synthetic import SyntheticDataset
from cmim.data.views import PretrainDataset
from cmim.engine.step import to_device

__all__ = ["data_pipeline"]

log = logging.getLogger("cmim")


def _jpeg_folder(root: Path, count: int, in_chans: int) -> None:
    """Write ``count`` ImageNet-like JPEGs (500x375, quality 90) of procedural images into class folders."""
    synth = SyntheticDataset(count, 4, 500, 3, seed=1)
    for i in range(count):
        arr = synth[i][0][:375]
        arr = arr + np.random.default_rng(i).integers(0, 24, arr.shape, dtype=np.uint8)  # texture
        img = Image.fromarray(arr)
        if in_chans == 1:
            img = img.convert("L")
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)


def data_pipeline(cfg: DictConfig, spec: Any, items: int, source: str,
                  device: torch.device | None = None, decode: str | None = None) -> dict[str, Any]:
    """``PretrainDataset`` items/s in this process (one core): read+decode, crop+resize, flip, photometric
    parameters of every view and the mask. ``source``: the recipe's dataset, JPEG files, or procedural. With
    ``decode="device"`` (default: ``data.decode``) on files, the per-core rate is the workers' share (read the
    bytes, draw the crops), and ``device_decode_img_per_s`` times the step's decoding of 64 of them on ``device``."""
    d = cfg.data
    tmp: tempfile.TemporaryDirectory | None = None
    label = source
    base: Any = None
    if source in ("auto", "recipe"):
        try:
            base = build_base_dataset(d, d.train_split)
            label = f"recipe ({d.name})"
        except Exception as e:  # noqa: BLE001 - a missing dataset only changes what is timed
            if source == "recipe":
                raise
            log.info("bench: recipe dataset unavailable (%s); timing JPEG files instead", e)
            source = "jpeg" if d.name == "folder" or d.img_size >= 64 else "synthetic"
    if base is None and source == "jpeg":
        tmp = tempfile.TemporaryDirectory(prefix="cmim_bench_")
        _jpeg_folder(Path(tmp.name), 64, d.in_chans)
        base = ImageFolderDataset(tmp.name, in_chans=d.in_chans)
        label = "jpeg files 500x375 q90"
    elif base is None:
        base = SyntheticDataset(max(items, 1), max(2, d.synthetic_classes), d.img_size, d.in_chans)
        label = "procedural (rendered per item)"
    decode = decode or str(d.decode)
    on_device = decode == "device" and isinstance(base, ImageFolderDataset)
    if on_device:
        base = base.with_decode_mode(DecodeMode.device)
        label += ", decode on the device"
    out: dict[str, Any] = {"source": label, "items": items}
    try:
        ds = PretrainDataset(base, spec, d.img_size, d.crop_scale, d.crop_ratio, d.interpolation,
                             d.hflip_prob)
        n = len(ds)
        for i in range(min(8, items)):  # warm-up: file cache, lazy imports
            ds[i % n]
        t0 = time.perf_counter()
        for i in range(items):
            ds[(i * 7919) % n]
        sec = time.perf_counter() - t0
        out["items_per_s_per_core"] = items / sec if sec > 0 else math.inf
        if on_device:

            dev = device or torch.device("cpu")
            batch = to_device(collate_pretrain([ds[i % n] for i in range(min(max(items, 1), 64))]), dev)
            decoder = DeviceDecoder(d.img_size, d.in_chans, dev, ds.decoded_item, d.interpolation)
            per_batch = min(timeit(lambda: decoder(batch), dev, 3))
            out["device_decode_img_per_s"] = batch["aug"].shape[0] / per_batch
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out
