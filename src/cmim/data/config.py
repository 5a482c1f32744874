"""The ``data`` and ``mask`` sections of a config (OmegaConf structured dataclasses) and their checks.

Closed choices are :class:`~cmim.core.choices.Choice` fields, which OmegaConf checks at merge; the checks here
are the relations between values, each raising :class:`~cmim.core.errors.ConfigError` with one line naming the
key. ``cmim.config`` assembles the whole schema and calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmim.core.errors import require
from cmim.data.base import BitDepth, DecodeMode, needs_float_pixels
from cmim.data.factory import DATASETS
from cmim.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_IMAGE_PIXELS
from cmim.data.masking import MaskKind
from cmim.data.splits import DEFAULT_TWIN_COSINE, HELD_OUT_SPLITS
from cmim.data.views import Interpolation

__all__ = ["DataConfig", "MaskConfig", "data_root_problem", "validate_data", "validate_data_input", "validate_mask"]


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # a registered dataset (cmim.data.factory.DATASETS): fashion-mnist | folder | ...
    # None: the dataset's default location (Debian's Fashion-MNIST); shards: a folder from `cmim shards`, an
    # index.json (path or URL) or a brace pattern of local, http(s):// or pipe: shards (cmim.data.shards)
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    img_size: int = 224
    in_chans: int = 3  # any N >= 1; other than 1 or 3: a folder of N-channel files (TIFF, 16-bit PNG, .npy)
    # per-channel normalization; "auto": estimated from a fixed sample of the training images when pre-training
    # starts (cmim.data.stats), and the numbers stored with the run (config.yaml, checkpoint)
    mean: list[float] | str = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] | str = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # "auto": 8 bits for 1- and 3-channel runs (16-bit files rounded), full depth otherwise | "8" | "full": every
    # file at its own depth, scaled to [0, 1] (float32 views; cmim.data.pixels.load_pixels)
    bit_depth: BitDepth = BitDepth.auto
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    interpolation: Interpolation = Interpolation.bicubic
    hflip_prob: float = 0.5
    eval_crop_pct: float = 0.875
    synthetic_size: int = 512
    synthetic_classes: int = 4
    subset: int | None = None
    num_workers: int = 4
    # folder images whose header declares more pixels are skipped (and listed), never decoded; null: no limit.
    # The default is PIL's own limit, above which PIL would print a DecompressionBombWarning per image.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    # transparent pixels (alpha, palette or tRNS transparency) are composited over this RGB colour. White:
    # most images with alpha (product photos, icons, logos) are made to be shown on a white page.
    background: list[int] = field(default_factory=lambda: list(DEFAULT_BACKGROUND))
    # folder only: > 0 splits data.root itself (no train/val sub-folders needed), class-stratified and stable
    # per file (cmim.data.splits.held_out_mask); split names "train" and "val"/"test" then name the parts.
    val_fraction: float = 0.0
    split_seed: int = 0  # seed of that split's hash (kept with the checkpoint, so evals see the same split)
    # ... and keeps near-duplicate files (32x32 grey thumbnails with a cosine above twin_cosine) on one side, so
    # the hold-out measures features, not memorization (cmim.data.splits)
    split_twins: bool = True
    twin_cosine: float = DEFAULT_TWIN_COSINE
    # folder only: each image is decoded once, shrunk to a shorter side of cache_short_side (null: twice
    # img_size) and kept as an array under cache_dir (null: $CMIM_CACHE_DIR or ~/.cache/cmim), keyed by the
    # file's content; later epochs, runs and evaluations read the small array (cmim.data.cache)
    cache_images: bool = True
    cache_dir: str | None = None
    cache_short_side: int | None = None
    # pre-training on a folder: "cpu" (PIL in the loader workers) | "device" (workers read JPEG bytes and draw the
    # crops; the step decodes them on the device, nvJPEG on CUDA: cmim.data.decode). Evaluations decode on the CPU.
    decode: DecodeMode = DecodeMode.cpu


@dataclass
class MaskConfig:
    kind: MaskKind = MaskKind.block  # "block" (BEiT block-wise) | "random" (random cells on a coarse grid)
    ratio: float = 0.4  # fraction of patches masked (block: 75 of 196 = 0.383 in the reference)
    cell: int = 1  # random: cell side in patches (2 = 32 px cells over 16 px patches)
    min_num_patches: int = 16  # block: smallest block
    min_aspect: float = 0.3  # block: aspect ratio range [min_aspect, 1/min_aspect]


def data_root_problem(d: Any) -> str | None:
    """Why ``data.root`` cannot serve ``data.name`` (None when it can): synthetic images need none, Fashion-MNIST
    has a default location, and shards may be a pattern or a URL (cmim.data.shards says what it cannot find)."""
    if d.name == "synthetic":
        return None
    if d.root is not None:
        return None if d.name == "shards" or Path(d.root).exists() else f"path does not exist: {d.root}"
    return None if d.name == "fashion-mnist" else f"required for data.name={d.name}"


def validate_data_input(d: Any) -> None:
    """The data keys both pre-training and eval configs check: which dataset, where, its normalization, and
    what users feed as image folders."""
    require(d.name in DATASETS, f"data.name: unknown dataset {d.name!r} (choose from {', '.join(DATASETS)})")
    problem = data_root_problem(d)
    require(problem is None, f"data.root: {problem}")
    require(d.in_chans >= 1, f"data.in_chans: must be >= 1, got {d.in_chans}")
    require(d.in_chans in (1, 3) or d.name in ("folder", "synthetic"),
            f"data.in_chans: {d.name} images have 1 or 3 channels; {d.in_chans} channels need data.name=folder")
    for key in ("mean", "std"):
        value = d[key]
        if isinstance(value, str):
            require(value == "auto", f"data.{key}: a list of {d.in_chans} values or 'auto', got {value!r}")
        else:
            require(len(value) == d.in_chans, f"data.mean/std: need {d.in_chans} values each (data.in_chans)")
    require(not isinstance(d.std, str) and all(s > 0 for s in d.std) or d.std == "auto",
            "data.std: values must be positive")
    require(d.bit_depth != BitDepth["8"] or d.in_chans in (1, 3),
            f"data.bit_depth=8 holds 1- or 3-channel images; {d.in_chans} channels are read at full depth (auto)")
    require(d.max_image_pixels is None or d.max_image_pixels > 0, "data.max_image_pixels: must be positive or null")
    require(len(d.background) == 3 and all(0 <= v <= 255 for v in d.background),
            f"data.background: need 3 values in 0..255 (an RGB colour), got {list(d.background)}")
    require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    require(0.0 < d.twin_cosine <= 1.0, f"data.twin_cosine: must be in (0, 1], got {d.twin_cosine}")
    require(d.cache_short_side is None or d.cache_short_side >= d.img_size,
            f"data.cache_short_side: must be >= data.img_size ({d.img_size}) or null, got {d.cache_short_side}")
    if d.val_fraction > 0 and d.name == "folder":
        require(d.train_split == "train",
                f"data.train_split: must be 'train' with data.val_fraction > 0 (the split's part), "
                f"got {d.train_split!r}")
        require(d.eval_split in HELD_OUT_SPLITS,
                f"data.eval_split: must be 'val' or 'test' with data.val_fraction > 0 (the held-out part), "
                f"got {d.eval_split!r}")


def validate_data(d: Any, patch_size: int) -> None:
    """The ``data`` section of a pre-training config (images cut into ``patch_size`` patches)."""
    require(d.img_size > 0 and d.img_size % patch_size == 0,
            f"data.img_size: {d.img_size} is not divisible by model.patch_size {patch_size}")
    require(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
            f"data.crop_scale: need 0 < min <= max <= 1, got {list(d.crop_scale)}")
    require(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1],
            f"data.crop_ratio: need 0 < min <= max, got {list(d.crop_ratio)}")
    require(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob: must be in [0, 1]")
    require(0.0 < d.eval_crop_pct <= 1.0, "data.eval_crop_pct: must be in (0, 1]")
    require(d.num_workers >= 0, "data.num_workers: must be >= 0")
    validate_data_input(d)
    require(d.val_fraction == 0 or d.name == "folder",
            f"data.val_fraction: only splits data.name=folder, not {d.name} (which has its own splits)")
    require(d.decode == DecodeMode.cpu or d.name == "folder",
            f"data.decode=device decodes JPEG files of data.name=folder; {d.name} is held decoded in memory")
    require(d.name != "shards" or not needs_float_pixels(d.in_chans, d.bit_depth),
            "data.bit_depth=full: shards are read as 8-bit images; full depth needs data.name=folder")
    require(d.decode == DecodeMode.cpu or not needs_float_pixels(d.in_chans, d.bit_depth),
            "data.decode=device decodes 8-bit JPEGs; full bit depth and other channel counts decode on the CPU")


def validate_mask(mk: Any, grid: int) -> None:
    """The ``mask`` section, for a patch grid of ``grid`` x ``grid``."""
    require(0.0 < mk.ratio < 1.0, f"mask.ratio: must be in (0, 1), got {mk.ratio}")
    require(mk.cell >= 1 and grid % mk.cell == 0,
            f"mask.cell: patch grid {grid} is not divisible by mask.cell {mk.cell}")
    require(mk.min_num_patches >= 1, "mask.min_num_patches: must be >= 1")
    require(0.0 < mk.min_aspect <= 1.0, "mask.min_aspect: must be in (0, 1]")
