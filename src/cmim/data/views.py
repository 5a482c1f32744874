"""Per-sample geometric work (crops, flips) with randomness that depends only on (seed, epoch, index).

Every random decision of an item is drawn, in a fixed order (crops+flips, photometric parameters, mask),
from ``np.random.default_rng([seed, epoch, index])``. A sample's views are therefore identical whatever
the number of DataLoader workers or processes, and a resumed run replays exactly the same data.
Photometric pixel work is deferred to the device (:mod:`cmim.data.augment`); workers only ship uint8
crops plus the sampled parameters.

Datasets with ``float_pixels`` (any channel count other than 1 or 3, or ``data.bit_depth=full``) take a float
path instead: every item becomes a float32 (C, H, W) tensor in [0, 1] and the same crops, flips, resizes and
centre crops are done with ``torchvision.transforms.v2.functional`` on all channels (antialiased, same
interpolation); crops and eval images are then float32 instead of uint8. The random draws are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from cmim.core.choices import Choice
from cmim.data.augment import NUM_PARAMS, ViewSpec, sample_photometric_params
from cmim.data.base import BaseImageDataset, DecodeMode, EncodedJpeg, ImageLike, ImageView
from cmim.data.factory import build_base_dataset
from cmim.data.folder import check_folder_channels, folder_parts

__all__ = [
    "EvalDataset",
    "Interpolation",
    "PretrainDataset",
    "build_eval_dataset",
    "build_pretrain_dataset",
    "random_resized_crop_params",
]

class Interpolation(Choice):
    """``data.interpolation``: the resampling of crops and eval resizes (views, the device decoder)."""

    bicubic = "bicubic"
    bilinear = "bilinear"


_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_TV_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def _interp(name: str, table: dict[str, Any]) -> Any:
    try:
        return table[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(table)}") from None


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    log_ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` logic of torchvision (10 tries, centre fallback) on a numpy rng.

    Returns ``(top, left, h, w)``.
    """
    area = height * width
    for _ in range(10):
        u = rng.random(4).tolist()  # one call per try: area, log-ratio, top, left
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    in_ratio = width / height
    lo, hi = math.exp(min(log_ratio)), math.exp(max(log_ratio))
    if in_ratio < lo:
        w, h = width, int(round(width / lo))
    elif in_ratio > hi:
        h, w = height, int(round(height * hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_pil(img: ImageLike) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(img)


def _channels(img: Image.Image) -> int:
    return 1 if img.mode == "L" else 3


def float_chw(img: ImageLike) -> Tensor:
    """Any item as float32 (C, H, W) in [0, 1]: 8-bit images and arrays divided by 255, float arrays as they are."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _is_float(base: Any) -> bool:
    return bool(getattr(base, "float_pixels", False))


class PretrainDataset(ImageView):
    """Pre-training items: ``crops`` uint8 (num_crops, C, S, S), ``aug`` float32 (V, K), optional ``mask``
    bool (gh*gw,), ``label`` and ``index`` int64.

    Crop+resize is one PIL ``resize(box=...)`` call (antialiased, no intermediate crop); flips are numpy
    views. The epoch lives in shared memory, so :meth:`set_epoch` also reaches persistent DataLoader
    workers (call it before creating the epoch's iterator).
    """

    def __init__(
        self,
        base: BaseImageDataset,
        spec: ViewSpec,
        img_size: int,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        hflip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.base, self.spec = base, spec
        self.cpu_base = base.decoding_on_cpu()  # what decoded_item reads: the same samples, decoded on the CPU
        self.img_size = int(img_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.log_ratio = (math.log(float(crop_ratio[0])), math.log(float(crop_ratio[1])))
        self.resample = _interp(interpolation, _PIL_INTERP)
        self.tv_interpolation = _interp(interpolation, _TV_INTERP)  # the float path's resize
        self.float_pixels = _is_float(base)
        self.hflip_prob = float(hflip_prob)
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self._item(self.base, index)

    def _item(self, base: BaseImageDataset, index: int) -> dict[str, Tensor]:
        index = int(index)
        rng = np.random.default_rng([self.seed, self._epoch.item(), index])
        img, label = base[index]
        s, spec = self.img_size, self.spec
        encoded = isinstance(img, EncodedJpeg)
        if self.float_pixels:
            img = float_chw(img)
            height, width = img.shape[-2:]
        else:
            if not encoded:
                img = _to_pil(img)
            width, height = (img.width, img.height) if encoded else img.size
        boxes = np.empty((spec.num_crops, 4), dtype=np.int64)  # (top, left, h, w) per crop
        flips = np.empty(spec.num_crops, dtype=bool)
        for k in range(spec.num_crops):
            boxes[k] = random_resized_crop_params(rng, height, width, self.crop_scale, self.log_ratio)
            flips[k] = rng.random() < self.hflip_prob
        item: dict[str, Tensor] = {}
        if encoded:  # data.decode=device: the same draws, the pixels come in the step
            item["jpeg"] = torch.from_numpy(img.data.copy())
            item["boxes"], item["flips"] = torch.from_numpy(boxes), torch.from_numpy(flips)
        elif self.float_pixels:  # all channels, in float: torchvision's antialiased resize of the same boxes
            crops_f = torch.empty((spec.num_crops, img.shape[0], s, s), dtype=torch.float32)
            for k, ((top, left, h, w), flip) in enumerate(zip(boxes.tolist(), flips.tolist(), strict=True)):
                out = TF.resized_crop(img, top, left, h, w, [s, s], interpolation=self.tv_interpolation,
                                      antialias=True)
                crops_f[k] = out.flip(-1) if flip else out
            item["crops"] = crops_f
        else:
            crops = np.empty((spec.num_crops, s, s, _channels(img)), dtype=np.uint8)
            for k, ((top, left, h, w), flip) in enumerate(zip(boxes.tolist(), flips.tolist(), strict=True)):
                out = np.asarray(img.resize((s, s), self.resample, box=(left, top, left + w, top + h)))
                crops[k] = (out[:, ::-1] if flip else out).reshape(s, s, -1)
            item["crops"] = torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())
        aug = np.empty((spec.num_views, NUM_PARAMS), dtype=np.float32)
        for v, profile in enumerate(spec.profiles):
            aug[v] = sample_photometric_params(profile, rng)
        item["aug"] = torch.from_numpy(aug)
        item["label"] = torch.scalar_tensor(label, dtype=torch.int64)
        item["index"] = torch.scalar_tensor(index, dtype=torch.int64)
        if spec.mask_generator is not None:
            mask = np.asarray(spec.mask_generator(rng), dtype=bool)
            item["mask"] = torch.from_numpy(mask.reshape(-1).copy())
        return item

    def decoded_item(self, index: int) -> dict[str, Tensor]:
        """Item ``index`` with every file decoded on the CPU: what the device decoder falls back to for a file
        it cannot decode (the CPU then decodes it, or records it as unreadable and takes the next one)."""
        return self._item(self.cpu_base, index)


class EvalDataset(ImageView):
    """Deterministic eval items: shorter side → ``round(img_size / eval_crop_pct)``, centre crop ``img_size``.

    Returns ``image`` uint8 (C, S, S) (float32 in [0, 1] for ``float_pixels`` datasets), ``label`` and ``index``
    int64. Images already at the target size (e.g. Fashion-MNIST at 28 with crop_pct 1.0) skip resampling entirely.
    """

    def __init__(
        self,
        base: BaseImageDataset,
        img_size: int,
        eval_crop_pct: float = 1.0,
        interpolation: str = "bicubic",
    ) -> None:
        if not eval_crop_pct > 0:
            raise ValueError(f"eval_crop_pct must be > 0, got {eval_crop_pct}")
        self.base = base
        self.img_size = int(img_size)
        self.resize_to = int(round(self.img_size / float(eval_crop_pct)))
        self.interpolation = _interp(interpolation, _TV_INTERP)
        self.float_pixels = _is_float(base)

    def __len__(self) -> int:
        return len(self.base)

    def _float_image(self, img: ImageLike) -> Tensor:
        x = float_chw(img)
        if min(x.shape[-2:]) != self.resize_to:
            x = TF.resize(x, self.resize_to, interpolation=self.interpolation, antialias=True)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = TF.center_crop(x, [self.img_size, self.img_size])
        return x.contiguous()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        img, label = self.base[index]
        if self.float_pixels:
            return {"image": self._float_image(img), "label": torch.tensor(label, dtype=torch.int64),
                    "index": torch.tensor(index, dtype=torch.int64)}
        if isinstance(img, np.ndarray) and img.shape[0] == img.shape[1] == self.resize_to == self.img_size:
            arr = img
        else:
            pil = _to_pil(img)
            if min(pil.size) != self.resize_to:
                pil = TF.resize(pil, self.resize_to, interpolation=self.interpolation, antialias=True)
            if pil.size != (self.img_size, self.img_size):
                pil = TF.center_crop(pil, [self.img_size, self.img_size])
            arr = np.asarray(pil)
        arr = arr.reshape(self.img_size, self.img_size, -1)
        return {
            "image": torch.from_numpy(arr.transpose(2, 0, 1).copy()),
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def build_pretrain_dataset(cfg: Any, split: str, spec: ViewSpec, seed: int) -> PretrainDataset:
    """Base dataset of ``split`` wrapped with the pre-training crops/parameters described by ``cfg``; with
    ``cfg.decode == "device"`` a folder's JPEG files are left for the device decoder (:mod:`cmim.data.decode`)."""
    base = build_base_dataset(cfg, split, cfg.decode)
    check_folder_channels(base)
    if cfg.decode == DecodeMode.device and folder_parts(base) is None:
        raise ValueError(f"data.decode=device decodes the JPEG files of data.name=folder, not {cfg.name}")
    return PretrainDataset(
        base,
        spec,
        img_size=int(cfg.img_size),
        crop_scale=tuple(cfg.crop_scale),
        crop_ratio=tuple(cfg.crop_ratio),
        interpolation=str(cfg.interpolation),
        hflip_prob=float(cfg.hflip_prob),
        seed=seed,
    )


def build_eval_dataset(cfg: Any, split: str) -> EvalDataset:
    """Base dataset of ``split`` with the deterministic eval resize + centre crop."""
    base = build_base_dataset(cfg, split)
    check_folder_channels(base)
    return EvalDataset(
        base,
        img_size=int(cfg.img_size),
        eval_crop_pct=float(cfg.eval_crop_pct),
        interpolation=str(cfg.interpolation),
    )
