"""Typed configuration: OmegaConf structured dataclasses, YAML recipes and ``key=value`` overrides.

Every recipe is merged into the dataclass schema below, so an unknown key or a value of the wrong type is
rejected by OmegaConf before any work starts; :func:`validate` then checks the relations between values
(mask ratio, image/patch divisibility, paths) and raises :class:`ConfigError` with one readable line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cmim.core.errors import ConfigError, require
from cmim.core.precision import PRECISIONS
from cmim.data.datasets import BIT_DEPTHS, needs_float_pixels


@dataclass
class ModelConfig:
    family: str = "vit"  # "vit" (timm VisionTransformer, absolute pos. embedding) | "beit" (timm Beit)
    size: str = "small"  # tiny | small | base | large preset (width/depth/heads); overridable below
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    # Beit: layer scale init (the ConMIM/BEiT reference uses 0.1); ViT: None = no layer scale.
    layer_scale_init: float | None = None
    # Beit: shared relative position bias (reference) instead of an absolute position embedding.
    shared_rel_pos_bias: bool = True
    pos_embed: str = "learn"  # "learn" | "sincos" (fixed 2-D sin-cos, MoCo v3); ViT family only
    frozen_patch_embed: bool = False  # MoCo v3's frozen random patch projection
    global_pool: str = "avg"  # pooled feature of the exported timm model: "avg" (mean of patch tokens) | "token"
    init: str = "timm"  # "timm" (timm's default init) | "mocov3" (MoCo v3's xavier init, qkv as three matrices)
    # start the encoder (and so its EMA teacher) from a weights file or Hub-style folder: timm / MAE / DINO / MoCo v3
    # release, cmim checkpoint or export; position embedding and patch embedding adapted (cmim.models.init_from)
    init_from: str | None = None


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist | folder | synthetic | cifar10 | cifar100
    root: str | None = None  # None: the dataset's default location (Debian's Fashion-MNIST)
    train_split: str = "train"
    eval_split: str = "test"
    img_size: int = 224
    in_chans: int = 3  # any N >= 1; other than 1 or 3: a folder of N-channel files (TIFF, 16-bit PNG, .npy)
    # per-channel normalization; "auto": estimated from a fixed sample of the training images when pre-training
    # starts (cmim.data.stats), and the numbers stored with the run (config.yaml, checkpoint)
    mean: list[float] | str = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] | str = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # "auto": 8 bits for 1- and 3-channel runs (16-bit files rounded), full depth otherwise | "8" | "full": every
    # file at its own depth, scaled to [0, 1] (float32 views; cmim.data.datasets.load_pixels)
    bit_depth: str = "auto"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    interpolation: str = "bicubic"
    hflip_prob: float = 0.5
    eval_crop_pct: float = 0.875
    synthetic_size: int = 512
    synthetic_classes: int = 4
    subset: int | None = None
    num_workers: int = 4
    # folder images whose header declares more pixels are skipped (and listed), never decoded; null: no limit.
    # The default is PIL's own limit, above which PIL would print a DecompressionBombWarning per image.
    max_image_pixels: int | None = 89_478_485
    # transparent pixels (alpha, palette or tRNS transparency) are composited over this RGB colour. White:
    # most images with alpha (product photos, icons, logos) are made to be shown on a white page.
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # folder only: > 0 splits data.root itself (no train/val sub-folders needed), class-stratified and stable
    # per file (cmim.data.datasets.held_out_mask); split names "train" and "val"/"test" then name the parts.
    val_fraction: float = 0.0
    split_seed: int = 0  # seed of that split's hash (kept with the checkpoint, so evals see the same split)
    # ... and keeps near-duplicate files (32x32 grey thumbnails with a cosine above twin_cosine) on one side, so
    # the hold-out measures features, not memorization (cmim.data.splits)
    split_twins: bool = True
    twin_cosine: float = 0.99
    # folder only: each image is decoded once, shrunk to a shorter side of cache_short_side (null: twice
    # img_size) and kept as an array under cache_dir (null: $CMIM_CACHE_DIR or ~/.cache/cmim), keyed by the
    # file's content; later epochs, runs and evaluations read the small array (cmim.data.cache)
    cache_images: bool = True
    cache_dir: str | None = None
    cache_short_side: int | None = None
    # pre-training on a folder: "cpu" (PIL in the loader workers) | "device" (workers read JPEG bytes and draw the
    # crops; the step decodes them on the device, nvJPEG on CUDA: cmim.data.decode). Evaluations decode on the CPU.
    decode: str = "cpu"


@dataclass
class MaskConfig:
    kind: str = "block"  # "block" (BEiT block-wise) | "random" (random cells on a coarse grid)
    ratio: float = 0.4  # fraction of patches masked (block: 75 of 196 = 0.383 in the reference)
    cell: int = 1  # random: cell side in patches (2 = 32 px cells over 16 px patches)
    min_num_patches: int = 16  # block: smallest block
    min_aspect: float = 0.3  # block: aspect ratio range [min_aspect, 1/min_aspect]


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute peak lr; None = blr * global_batch / 256
    blr: float = 1.5e-4
    min_lr: float = 1e-5  # floor of the cosine schedule
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_epochs: float = 10.0
    clip_grad: float | None = 3.0
    fused: bool = True  # fused AdamW kernel where available (CPU and CUDA)


STRATEGIES = ("ddp", "fsdp")  # train.strategy


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 2048  # global batch: over all processes and accumulation steps
    accum_steps: int = 1
    precision: str = "bf16"  # "bf16" autocast | "fp32"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    out_dir: str = "runs/conmim"
    resume: str | None = "auto"  # "auto": out_dir/checkpoint.pt when present; a path; or null
    ckpt_every_steps: int = 0  # 0: only at epoch ends
    log_every_steps: int = 20
    max_steps: int | None = None  # stop early (schedules still span all epochs): smoke runs and tests
    # A step whose loss or gradient norm is NaN/inf is skipped (weights, AdamW state and EMA teachers stay as
    # they were) and counted (`nonfinite_steps` in metrics and summary.json); after this many in a row the run
    # stops with an error naming the last good checkpoint (checked on logging and checkpoint steps).
    max_nonfinite_steps: int = 20
    check_memory: bool = True  # estimate a step's memory first; refuse a batch that cannot fit (cmim.engine.memory)
    # BatchNorm statistics of the heads over all processes (true) or per process (false); null: the method's
    # reference (MethodSpec.sync_bn): per process for ConMIM, over all processes for MoCo v3 and MimCo
    sync_bn: bool | None = None
    compile: bool = False  # torch.compile the method's forward
    # multi-process runs (torchrun): "ddp" keeps a full copy of the state on every process; "fsdp" shards
    # weights, gradients and AdamW moments (FSDP2, per block; cmim.engine.layout). A single process ignores it.
    strategy: str = "ddp"
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward (less memory)
    # CPU: glibc keeps freed memory for reuse instead of returning large blocks to the kernel, which saves the
    # page faults of re-allocating them every step (cmim.core.host_memory); resident memory stays at its peak
    keep_freed_memory: bool = True
    progress: bool = True
    tensorboard: bool = True


@dataclass
class MonitorConfig:
    every_epochs: int = 1  # online k-NN every K epochs (0 disables)
    at_start: bool = True  # also measure the random-init encoder before training
    encoder: str = "teacher"  # teacher (EMA; what downstream use takes) | student
    feature: str = "mean"  # "mean" of patch tokens (ConMIM trains patch tokens) | "cls"
    k: int = 20
    temperature: float = 0.07
    train_subset: int | None = 10000
    test_subset: int | None = 2000
    batch_size: int = 256
    # also k-NN on the raw pixels (normalized, flattened) of the same subsets, once: the level a pre-trained
    # encoder has to beat to be worth its features
    raw_pixels: bool = True
    # > 0: also a quick linear probe (cached features, BN + linear, SGD, this many epochs; cmim eval linear's
    # head) on the same images, for the encoder and the raw pixels: the second piece of evidence the folder
    # recipes print beside k-NN. 0: k-NN only.
    linear_epochs: int = 0
    # label-free health of the embeddings on the same schedule (cmim.eval.health): effective rank, per-dimension
    # std and mean cosine of the L2-normalized features of a fixed sample of held-out (else training) images
    health: bool = True
    health_images: int = 512
    collapse_fraction: float = 0.25  # warn when the effective rank or the feature std falls under this x its start
    collapse_cosine: float = 0.9  # ... or when the mean cosine between different images rises above this from below


def _schema() -> type:
    """The whole config: the shared sections above plus each method's own section (``cfg.<method name>``),
    taken from the method registry (:func:`cmim.methods.method_specs`)."""
    from cmim.methods import method_specs

    shared = [("method", str, field(default="conmim")),
              ("model", ModelConfig, field(default_factory=ModelConfig)),
              ("data", DataConfig, field(default_factory=DataConfig)),
              ("mask", MaskConfig, field(default_factory=MaskConfig)),
              ("optim", OptimConfig, field(default_factory=OptimConfig)),
              ("train", TrainConfig, field(default_factory=TrainConfig)),
              ("monitor", MonitorConfig, field(default_factory=MonitorConfig))]
    sections = [(spec.name, spec.config, field(default_factory=spec.config)) for spec in method_specs().values()]
    return make_dataclass("Config", shared + sections)


Config = _schema()


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, following ``_base_`` (a path or list of paths relative to the recipe)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config inheritance loop at {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, read_recipe((path.parent / b).resolve(), seen + (path,)))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _float_stats(layer: Any) -> Any:
    """``data.mean/std`` written with integers (``[0, 1, 1]``) are floats: the field's ``list[float] | str`` union
    takes only floats, where a plain ``list[float]`` converted them."""
    data = layer.get("data") if isinstance(layer, dict | DictConfig) else None
    if isinstance(data, dict | DictConfig):
        for key in ("mean", "std"):
            value = data.get(key)
            if isinstance(value, list | ListConfig) and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                data[key] = [float(v) for v in value]
    return layer


def merge_config(schema: type, layers: list[Any], recipe: str | os.PathLike | None,
                 overrides: list[str] | None, check: Callable[[DictConfig], None]) -> DictConfig:
    """Schema <- ``layers`` (plain dicts) <- recipe YAML (with ``_base_``) <- ``key=value`` overrides, then
    ``check``; every OmegaConf error (unknown key, wrong type, missing value) becomes one ConfigError line."""
    cfg = OmegaConf.structured(schema)
    try:
        for layer in layers:
            cfg = OmegaConf.merge(cfg, _float_stats(layer))
        if recipe is not None:
            cfg = OmegaConf.merge(cfg, _float_stats(read_recipe(Path(recipe).resolve())))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override must look like key=value: {bad[0]!r}")
            cfg = OmegaConf.merge(cfg, _float_stats(OmegaConf.from_dotlist(list(overrides))))
        check(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- recipe YAML (with ``_base_``) <- ``key=value`` overrides, then :func:`validate`."""
    return merge_config(Config, [], path, overrides, validate)




DATASETS = ("fashion-mnist", "folder", "synthetic", "cifar10", "cifar100")


def data_root_problem(d: DictConfig) -> str | None:
    """Why ``data.root`` cannot serve ``data.name`` (None when it can): synthetic images need none, and
    Fashion-MNIST without one is downloaded."""
    if d.name == "synthetic":
        return None
    if d.root is not None:
        return None if Path(d.root).exists() else f"path does not exist: {d.root}"
    return None if d.name == "fashion-mnist" else f"required for data.name={d.name}"


def validate_data_input(d: DictConfig) -> None:
    """The data keys both pre-training and eval configs check: which dataset, where, its normalization, and
    what users feed as image folders."""
    require(d.name in DATASETS, f"data.name: unknown dataset {d.name!r}")
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
    require(d.bit_depth in BIT_DEPTHS, f"data.bit_depth: must be one of {', '.join(BIT_DEPTHS)}, got {d.bit_depth!r}")
    require(d.bit_depth != "8" or d.in_chans in (1, 3),
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
        require(d.eval_split in ("val", "test"),
                 f"data.eval_split: must be 'val' or 'test' with data.val_fraction > 0 (the held-out part), "
                 f"got {d.eval_split!r}")


def validate(cfg: DictConfig) -> None:
    """Check relations between values; raise ConfigError with one line naming the key."""
    from cmim.methods import method_specs

    m, d, mk, o, t = cfg.model, cfg.data, cfg.mask, cfg.optim, cfg.train
    specs = method_specs()
    require(cfg.method in specs, f"method: unknown method {cfg.method!r} (choose from {', '.join(specs)})")
    require(m.family in ("vit", "beit"), f"model.family: must be vit or beit, got {m.family!r}")
    require(m.size in ("tiny", "small", "base", "large"), f"model.size: unknown preset {m.size!r}")
    require(m.pos_embed in ("learn", "sincos"), f"model.pos_embed: must be learn or sincos, got {m.pos_embed!r}")
    require(m.init in ("timm", "mocov3"), f"model.init: must be timm or mocov3, got {m.init!r}")
    require(m.global_pool in ("avg", "token"), f"model.global_pool: must be avg or token, got {m.global_pool!r}")
    require(m.patch_size > 0, "model.patch_size: must be positive")
    require(0.0 <= m.drop_path < 1.0, f"model.drop_path: must be in [0, 1), got {m.drop_path}")
    require(d.img_size > 0 and d.img_size % m.patch_size == 0,
             f"data.img_size: {d.img_size} is not divisible by model.patch_size {m.patch_size}")
    require(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
             f"data.crop_scale: need 0 < min <= max <= 1, got {list(d.crop_scale)}")
    require(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1],
             f"data.crop_ratio: need 0 < min <= max, got {list(d.crop_ratio)}")
    require(d.interpolation in ("bicubic", "bilinear"), f"data.interpolation: {d.interpolation!r} unsupported")
    require(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob: must be in [0, 1]")
    require(0.0 < d.eval_crop_pct <= 1.0, "data.eval_crop_pct: must be in (0, 1]")
    require(d.num_workers >= 0, "data.num_workers: must be >= 0")
    require(cfg.monitor.linear_epochs >= 0, "monitor.linear_epochs: must be >= 0")
    validate_data_input(d)
    require(d.val_fraction == 0 or d.name == "folder",
             f"data.val_fraction: only splits data.name=folder, not {d.name} (which has its own splits)")
    require(d.decode in ("cpu", "device"), f"data.decode: must be cpu or device, got {d.decode!r}")
    require(d.decode == "cpu" or d.name == "folder",
            f"data.decode=device decodes JPEG files of data.name=folder; {d.name} is held decoded in memory")
    require(d.decode == "cpu" or not needs_float_pixels(d.in_chans, d.bit_depth),
            "data.decode=device decodes 8-bit JPEGs; full bit depth and other channel counts decode on the CPU")
    require(m.init_from is None or Path(m.init_from).exists(), f"model.init_from: not found: {m.init_from}")
    require(mk.kind in ("block", "random"), f"mask.kind: must be block or random, got {mk.kind!r}")
    require(0.0 < mk.ratio < 1.0, f"mask.ratio: must be in (0, 1), got {mk.ratio}")
    grid = d.img_size // m.patch_size
    require(mk.cell >= 1 and grid % mk.cell == 0,
             f"mask.cell: patch grid {grid} is not divisible by mask.cell {mk.cell}")
    require(mk.min_num_patches >= 1, "mask.min_num_patches: must be >= 1")
    require(0.0 < mk.min_aspect <= 1.0, "mask.min_aspect: must be in (0, 1]")
    require(o.lr is None or o.lr > 0, "optim.lr: must be positive")
    require(o.blr > 0 and o.min_lr >= 0, "optim.blr/min_lr: must be positive")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas: need two values in [0, 1)")
    require(o.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    require(o.warmup_epochs >= 0, "optim.warmup_epochs: must be >= 0")
    require(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad: must be positive or null")
    require(t.epochs > 0, f"train.epochs: must be positive, got {t.epochs}")
    require(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
    require(t.accum_steps >= 1, "train.accum_steps: must be >= 1")
    require(t.batch_size % t.accum_steps == 0,
             f"train.batch_size: {t.batch_size} is not divisible by train.accum_steps {t.accum_steps}")
    require(t.precision in PRECISIONS, f"train.precision: must be bf16 or fp32, got {t.precision!r}")
    require(t.device in ("auto", "cpu", "cuda"), f"train.device: must be auto, cpu or cuda, got {t.device!r}")
    require(t.strategy in STRATEGIES, f"train.strategy: must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}")
    require(t.max_steps is None or t.max_steps > 0, "train.max_steps: must be positive or null")
    require(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    require(t.ckpt_every_steps >= 0 and t.log_every_steps > 0, "train.ckpt_every_steps/log_every_steps: invalid")
    if t.resume not in (None, "auto"):
        require(Path(t.resume).is_file(), f"train.resume: checkpoint not found: {t.resume}")
    mon = cfg.monitor
    require(mon.every_epochs >= 0, "monitor.every_epochs: must be >= 0")
    require(mon.encoder in ("teacher", "student"), "monitor.encoder: must be teacher or student")
    require(mon.feature in ("mean", "cls") or (mon.feature.startswith("grid") and mon.feature[4:].isdigit()),
             "monitor.feature: must be mean, cls or gridG (e.g. grid2)")
    require(mon.k >= 1 and mon.temperature > 0, "monitor.k/temperature: must be positive")
    require(mon.health_images >= 2, f"monitor.health_images: need at least 2, got {mon.health_images}")
    require(0.0 <= mon.collapse_fraction <= 1.0 and 0.0 < mon.collapse_cosine <= 1.0,
            "monitor.collapse_fraction/collapse_cosine: must be in [0, 1]")
    for spec in specs.values():  # every section, not only the chosen method's: a recipe may switch method=
        spec.validate(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_yaml_string(text: str) -> DictConfig:
    """Rebuild a config stored in a checkpoint (validated against today's schema, without path checks)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    except OmegaConfBaseException as e:
        raise ConfigError(f"stored config does not fit this version of cmim: {_one_line(e)}") from None
