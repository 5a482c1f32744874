"""JPEG decoding on the device (``data.decode=device``): loader workers only read a file's bytes and draw its
crop boxes (:class:`~cmim.data.views.PretrainDataset`, the same draws as CPU decoding, so the boxes, flips,
photometric parameters and masks of a sample stay a function of (seed, epoch, index)); the training step
decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA) and cuts
and resizes the crops there. Files the device decoder is not given (PNG, CMYK JPEG, ...) arrive as finished CPU
crops in the same batch; a file it fails on is redone on the CPU for that sample alone.

Pixels differ from CPU decoding by rounding only: another IDCT on CUDA, and torchvision's antialiased resize
instead of PIL's (both bicubic over the same box).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

__all__ = ["DeviceDecoder", "collate_pretrain"]

ENCODED_KEYS = ("jpeg", "boxes", "flips")


def collate_pretrain(items: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """``default_collate`` for pre-training items; a batch with undecoded JPEGs gets ``crops`` for the CPU-decoded
    rows only (with ``crop_rows``) and ``encoded``: a dict the step's device copy leaves on the host (the byte
    tensors, their ``rows``, crop ``boxes`` (n, K, 4) as (top, left, h, w) and ``flips`` (n, K))."""
    if not any("jpeg" in it for it in items):
        return default_collate(list(items))
    common = [{k: v for k, v in it.items() if k not in ("crops", *ENCODED_KEYS)} for it in items]
    batch: dict[str, Any] = default_collate(common)
    rows = [i for i, it in enumerate(items) if "jpeg" in it]
    batch["encoded"] = {
        "jpeg": [items[i]["jpeg"] for i in rows],
        "rows": torch.tensor(rows, dtype=torch.int64),
        "boxes": torch.stack([items[i]["boxes"] for i in rows]),
        "flips": torch.stack([items[i]["flips"] for i in rows]),
    }
    decoded = [i for i, it in enumerate(items) if "crops" in it]
    if decoded:
        batch["crops"] = torch.stack([items[i]["crops"] for i in decoded])
        batch["crop_rows"] = torch.tensor(decoded, dtype=torch.int64)
    return batch


class DeviceDecoder:
    """Finished uint8 crops ``(B, K, C, S, S)`` on ``device`` from a :func:`collate_pretrain` batch.

    ``fallback(index)`` gives sample ``index`` decoded on the CPU (``PretrainDataset.decoded_item``): used for a
    JPEG the device decoder rejects, whose crops, photometric parameters and mask then replace that row's (they
    are the same draws unless the CPU, too, cannot read the file and takes the next readable one).
    """

    def __init__(self, img_size: int, in_chans: int, device: torch.device | str,
                 fallback: Callable[[int], dict[str, Tensor]] | None = None, interpolation: str = "bicubic") -> None:
        self.size = int(img_size)
        self.in_chans = int(in_chans)
        self.device = torch.device(device)
        self.fallback = fallback
        self.mode = ImageReadMode.GRAY if self.in_chans == 1 else ImageReadMode.RGB
        self.interpolation = InterpolationMode(str(interpolation).lower())
        self.num_fallbacks = 0  # samples redone on the CPU (whole run)

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        if "encoded" not in batch:
            return batch["crops"]
        enc = batch["encoded"]
        num_crops = enc["boxes"].shape[1]
        s = self.size
        crops = torch.empty((batch["aug"].shape[0], num_crops, self.in_chans, s, s), dtype=torch.uint8,
                            device=self.device)
        if "crop_rows" in batch:
            crops[batch["crop_rows"].to(self.device)] = batch["crops"]
        images = self._decode(enc["jpeg"])
        boxes, flips = enc["boxes"].tolist(), enc["flips"].tolist()  # host tensors: no device sync
        for j, row in enumerate(enc["rows"].tolist()):
            img = images[j]
            if img is None:
                self._redo_on_cpu(batch, crops, row)
                continue
            for k in range(num_crops):
                top, left, h, w = boxes[j][k]
                out = TF.resized_crop(img, top, left, h, w, [s, s], interpolation=self.interpolation,
                                      antialias=True)
                crops[row, k] = out.flip(-1) if flips[j][k] else out
        return crops

    def _decode(self, data: list[Tensor]) -> list[Tensor | None]:
        """All images in one call; when that fails, one by one, None for each image that fails alone."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision >= 0.29 deprecation
            try:
                return list(decode_jpeg(data, mode=self.mode, device=self.device))
            except RuntimeError:
                out: list[Tensor | None] = []
                for d in data:
                    try:
                        out.append(decode_jpeg(d, mode=self.mode, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def _redo_on_cpu(self, batch: dict[str, Any], crops: Tensor, row: int) -> None:
        index = int(batch["index"][row])
        if self.fallback is None:
            raise RuntimeError(f"sample {index}: the device could not decode its JPEG and no CPU fallback is set")
        item = self.fallback(index)
        self.num_fallbacks += 1
        crops[row] = item["crops"].to(self.device)
        batch["aug"][row] = item["aug"].to(batch["aug"].device)
        if "mask" in batch:
            batch["mask"][row] = item["mask"].to(batch["mask"].device)
