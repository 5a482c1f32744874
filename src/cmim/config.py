"""Typed configuration: OmegaConf structured dataclasses, YAML recipes and ``key=value`` overrides.

Every recipe is merged into the dataclass schema below, so an unknown key or a value of the wrong type is
rejected by OmegaConf before any work starts, and so is a value outside a closed choice (the
:class:`~cmim.core.choices.Choice` fields); :func:`validate` then calls each section's check (beside its
dataclass; data and mask: :mod:`cmim.data.config`) for the relations between values (mask ratio, image/patch
divisibility, paths), which raise :class:`ConfigError` with one readable line.
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

from cmim.core.checkpoint_paths import CheckpointFormat
from cmim.core.distributed import DeviceChoice, Strategy
from cmim.core.errors import ConfigError, require
from cmim.core.precision import Precision
from cmim.data.config import (
    DataConfig,
    MaskConfig,
    data_root_problem,
    validate_data,
    validate_data_input,
    validate_mask,
)
from cmim.models.encoder import GlobalPool, ModelFamily, ModelSize, PosEmbed, WeightInit, is_pooled_feature
from cmim.models.stored_encoder import EncoderRole

__all__ = ["Config", "ConfigError", "DataConfig", "MaskConfig", "ModelConfig", "MonitorConfig", "OptimConfig",
           "TrainConfig", "data_root_problem", "from_yaml_string", "load_config", "merge_config", "read_recipe",
           "to_yaml", "validate", "validate_data_input", "validate_model", "validate_monitor", "validate_optim",
           "validate_train"]


@dataclass
class ModelConfig:
    family: ModelFamily = ModelFamily.vit  # "vit" (timm VisionTransformer, absolute pos. embedding) | "beit"
    size: ModelSize = ModelSize.small  # tiny | small | base | large preset (width/depth/heads); overridable below
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
    pos_embed: PosEmbed = PosEmbed.learn  # "learn" | "sincos" (fixed 2-D sin-cos, MoCo v3); ViT family only
    frozen_patch_embed: bool = False  # MoCo v3's frozen random patch projection
    global_pool: GlobalPool = GlobalPool.avg  # pooled feature of the exported timm model: "avg" | "token" (CLS)
    init: WeightInit = WeightInit.timm  # "timm" (timm's default init) | "mocov3" (MoCo v3's xavier init)
    # start the encoder (and so its EMA teacher) from a weights file or Hub-style folder: timm / MAE / DINO / MoCo v3
    # release, cmim checkpoint or export; position embedding and patch embedding adapted (cmim.models.init_from)
    init_from: str | None = None


def validate_model(m: DictConfig) -> None:
    require(m.patch_size > 0, "model.patch_size: must be positive")
    require(0.0 <= m.drop_path < 1.0, f"model.drop_path: must be in [0, 1), got {m.drop_path}")
    require(m.init_from is None or Path(m.init_from).exists(), f"model.init_from: not found: {m.init_from}")


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


def validate_optim(o: DictConfig) -> None:
    require(o.lr is None or o.lr > 0, "optim.lr: must be positive")
    require(o.blr > 0 and o.min_lr >= 0, "optim.blr/min_lr: must be positive")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas: need two values in [0, 1)")
    require(o.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    require(o.warmup_epochs >= 0, "optim.warmup_epochs: must be >= 0")
    require(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad: must be positive or null")


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 2048  # global batch: over all processes and accumulation steps
    accum_steps: int = 1
    precision: Precision = Precision.bf16  # "bf16" autocast | "fp32"
    device: DeviceChoice = DeviceChoice.auto  # auto | cpu | cuda
    # multi-process runs (torchrun): ddp | fsdp (cmim.core.distributed.Strategy); a single process ignores it
    strategy: Strategy = Strategy.ddp
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward (less memory)
    seed: int = 0
    out_dir: str = "runs/conmim"
    # "auto": the run's newest checkpoint when there is one (cmim.engine.checkpoint.checkpointer); a checkpoint
    # file, DCP step folder or run folder; or null
    resume: str | None = "auto"
    ckpt_every_steps: int = 0  # 0: only at epoch ends
    # file: out_dir/checkpoint.pt, full state | dcp: sharded step folders, written by every process
    checkpoint_format: CheckpointFormat = CheckpointFormat.file
    keep_checkpoints: int = 1  # the last N; an old one is deleted only once a newer one is complete
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
    # CPU: glibc keeps freed memory for reuse instead of returning large blocks to the kernel, which saves the
    # page faults of re-allocating them every step (cmim.core.host_memory); resident memory stays at its peak
    keep_freed_memory: bool = True
    progress: bool = True
    tensorboard: bool = True


def validate_train(t: DictConfig) -> None:
    require(t.epochs > 0, f"train.epochs: must be positive, got {t.epochs}")
    require(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
    require(t.accum_steps >= 1, "train.accum_steps: must be >= 1")
    require(t.batch_size % t.accum_steps == 0,
            f"train.batch_size: {t.batch_size} is not divisible by train.accum_steps {t.accum_steps}")
    require(t.max_steps is None or t.max_steps > 0, "train.max_steps: must be positive or null")
    require(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    require(t.ckpt_every_steps >= 0 and t.log_every_steps > 0, "train.ckpt_every_steps/log_every_steps: invalid")
    require(t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    if t.resume not in (None, "auto"):
        require(Path(t.resume).exists(), f"train.resume: checkpoint not found: {t.resume}")


@dataclass
class MonitorConfig:
    every_epochs: int = 1  # online k-NN every K epochs (0 disables)
    at_start: bool = True  # also measure the random-init encoder before training
    encoder: EncoderRole = EncoderRole.teacher  # teacher (EMA; what downstream use takes) | student
    feature: str = "mean"  # "mean" of patch tokens (ConMIM trains patch tokens) | "cls" | "gridG" (G x G means)
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


def validate_monitor(mon: DictConfig) -> None:
    require(mon.every_epochs >= 0, "monitor.every_epochs: must be >= 0")
    require(is_pooled_feature(mon.feature),
            f"monitor.feature: must be mean, cls or gridG with G >= 1 (e.g. grid2), got {mon.feature!r}")
    require(mon.k >= 1 and mon.temperature > 0, "monitor.k/temperature: must be positive")
    require(mon.linear_epochs >= 0, "monitor.linear_epochs: must be >= 0")
    require(mon.health_images >= 2, f"monitor.health_images: need at least 2, got {mon.health_images}")
    require(0.0 <= mon.collapse_fraction <= 1.0 and 0.0 < mon.collapse_cosine <= 1.0,
            "monitor.collapse_fraction/collapse_cosine: must be in [0, 1]")


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




def validate(cfg: DictConfig) -> None:
    """Check relations between values, section by section; raise ConfigError with one line naming the key."""
    from cmim.methods import method_specs

    specs = method_specs()
    require(cfg.method in specs, f"method: unknown method {cfg.method!r} (choose from {', '.join(specs)})")
    validate_model(cfg.model)
    validate_data(cfg.data, cfg.model.patch_size)
    validate_mask(cfg.mask, cfg.data.img_size // cfg.model.patch_size)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    validate_monitor(cfg.monitor)
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
