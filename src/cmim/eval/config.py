"""Evaluation recipes: an OmegaConf schema of their own, merged over the checkpoint's data settings.

Order of precedence: schema defaults <- the pre-training data config stored in the checkpoint (image size,
channels, normalization, dataset) <- the eval recipe YAML (``_base_`` supported) <- ``key=value``
overrides. So ``cmim eval knn CKPT`` with no recipe evaluates on the data the encoder was trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmim.config import DataConfig, merge_config, validate_data_input
from cmim.core.errors import require
from cmim.core.precision import PRECISIONS
from cmim.models.encoder import is_pooled_feature

__all__ = ["EvalConfig", "FinetuneConfig", "KNNConfig", "LinearConfig", "load_eval_config", "validate_eval"]


@dataclass
class KNNConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # DINO; top1/top5 reported at k=20
    temperature: float = 0.07


@dataclass
class LinearConfig:
    # "cached": features of the centre crops computed once (on disk), then BN + linear trained on them: fast.
    # "reference": MoCo v3 / MAE; random-resized-crop + flip images through the frozen encoder every step.
    mode: str = "cached"
    epochs: int = 90
    batch_size: int = 1024
    optimizer: str = "sgd"  # "sgd" (momentum, MoCo v3) | "lars" (MAE); both timm optimizers
    lr: float | None = None  # absolute; None = blr * batch_size / 256
    blr: float = 3.0  # MoCo v3 ViT linear probe: lr 3 at batch 1024 (-> 12); MAE: 0.1 with LARS at 16384
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    bn: bool = True  # BatchNorm1d(affine=False) before the linear layer (MAE; MoCo v3's release has none)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # reference mode only
    hflip: float = 0.5


@dataclass
class FinetuneConfig:
    """BEiT/ConMIM ViT-B fine-tuning on ImageNet-1K by default (100 ep, batch 1024, lr 4e-3, ld 0.65)."""

    epochs: int = 100
    # optimizer steps; when set, it replaces ``epochs`` (the data is cycled): an equal budget whatever the number
    # of labeled images (label_fraction), so every row of a label-efficiency table trains as long. The warmup
    # then keeps its share warmup_epochs / epochs of the steps.
    steps: int | None = None
    batch_size: int = 1024
    lr: float | None = 4e-3  # absolute peak lr; None = blr * batch_size / 256 (MAE)
    blr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    warmup_lr: float = 1e-6
    layer_decay: float = 0.65  # timm param_groups_layer_decay through create_optimizer_v2
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    drop_path: float = 0.1
    pool: str = "avg"  # "avg": mean of patch tokens (BEiT/ConMIM/MAE) | "token": CLS
    # "pretrained": every token through the pre-trained final norm, then pooled (the exported model as is) |
    # "fc_norm": BEiT/ConMIM/MAE: final norm dropped, pooled tokens through a fresh LayerNorm before the head
    head_norm: str = "pretrained"
    # Beit encoders with a shared relative position bias: "shared": that one table, trained in the stem's
    # layer-decay group | "per_block": BEiT/ConMIM --rel_pos_bias: one table per block, each a copy of the
    # shared one, trained with its block's layer-decay scale (an encoder without a shared table: no change)
    rel_pos_bias: str = "shared"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null disables
    color_jitter: float | None = 0.4  # only used when auto_augment is null (timm's rule)
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    clip_grad: float | None = None
    eval_every_epochs: int = 1  # 0: only at the end
    max_steps: int | None = None  # stop early (the schedule still spans all epochs): smoke runs and tests


@dataclass
class EvalConfig:
    encoder: str = "teacher"  # teacher (EMA) | student; exported files hold one encoder
    feature: str = "mean"  # k-NN / linear: "mean" of patch tokens | "cls"
    init: str = "pretrained"  # "pretrained" | "random": same architecture, fresh weights (the baseline)
    data: DataConfig = field(default_factory=DataConfig)
    train_subset: int | None = None  # evenly spaced samples of the train split (None: all)
    # the few-labels setting: a class-balanced, seeded share of the train labels (0.01 = 1%) for k-NN, the linear
    # probe and fine-tuning; the same samples for every encoder at a given seed. None: all labels.
    label_fraction: float | None = None
    test_subset: int | None = None
    batch_size: int = 256  # feature extraction / evaluation batch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # "bf16" autocast | "fp32"
    seed: int = 0
    cache_dir: str | None = None  # feature cache; None: $CMIM_CACHE or ~/.cache/cmim/features
    out: str | None = None  # result JSON; None: <checkpoint dir>/eval/<protocol>-<dataset>-<encoder>-...json
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def validate_eval(cfg: DictConfig) -> None:
    """Relations between values; one line per problem, naming the key."""
    d, lin, ft = cfg.data, cfg.linear, cfg.finetune
    require(cfg.encoder in ("teacher", "student"), f"encoder: teacher or student, not {cfg.encoder!r}")
    require(cfg.feature == "pixels" or is_pooled_feature(cfg.feature),
             f"feature: must be mean, cls or gridG (e.g. grid2), got {cfg.feature!r}")
    require(cfg.init in ("pretrained", "random"), f"init: must be pretrained or random, got {cfg.init!r}")
    require(cfg.device in ("auto", "cpu", "cuda"), f"device: must be auto, cpu or cuda, got {cfg.device!r}")
    require(cfg.precision in PRECISIONS, f"precision: must be bf16 or fp32, got {cfg.precision!r}")
    require(cfg.batch_size > 0, "batch_size: must be positive")
    require(cfg.label_fraction is None or 0 < cfg.label_fraction <= 1,
             f"label_fraction: must be in (0, 1] or null, got {cfg.label_fraction}")
    require(ft.steps is None or ft.steps > 0, "finetune.steps: must be positive or null")
    for k in ("train_subset", "test_subset"):
        require(cfg[k] is None or cfg[k] > 0, f"{k}: must be positive or null")
    validate_data_input(d)  # val_fraction carried from the checkpoint: evals see its split
    require(len(cfg.knn.ks) > 0 and all(k >= 1 for k in cfg.knn.ks), "knn.ks: need positive k values")
    require(cfg.knn.temperature > 0, "knn.temperature: must be positive")
    require(lin.mode in ("cached", "reference"), f"linear.mode: cached or reference, not {lin.mode!r}")
    require(lin.optimizer in ("sgd", "lars"), f"linear.optimizer: sgd or lars, not {lin.optimizer!r}")
    require(lin.epochs > 0 and lin.batch_size > 0, "linear.epochs/batch_size: must be positive")
    require(lin.lr is None or lin.lr > 0, "linear.lr: must be positive or null")
    require(ft.epochs > 0, "finetune.epochs: must be positive")
    require(ft.batch_size > 1, "finetune.batch_size: must be at least 2 (Mixup pairs samples)")
    require(ft.pool in ("avg", "token"), f"finetune.pool: must be avg or token, got {ft.pool!r}")
    require(ft.head_norm in ("pretrained", "fc_norm"),
             f"finetune.head_norm: must be pretrained or fc_norm, got {ft.head_norm!r}")
    require(ft.rel_pos_bias in ("shared", "per_block"),
             f"finetune.rel_pos_bias: must be shared or per_block, got {ft.rel_pos_bias!r}")
    require(0.0 < ft.layer_decay <= 1.0, f"finetune.layer_decay: must be in (0, 1], got {ft.layer_decay}")
    require(0.0 <= ft.drop_path < 1.0, "finetune.drop_path: must be in [0, 1)")
    require(0.0 <= ft.smoothing < 1.0, "finetune.smoothing: must be in [0, 1)")
    require(0.0 <= ft.reprob <= 1.0, "finetune.reprob: must be in [0, 1]")
    require(ft.lr is None or ft.lr > 0, "finetune.lr: must be positive or null")
    require(ft.max_steps is None or ft.max_steps > 0, "finetune.max_steps: must be positive or null")
    for sec in (lin, ft):
        cs = list(sec.crop_scale)
        require(len(cs) == 2 and 0 < cs[0] <= cs[1] <= 1, f"crop_scale: need 0 < min <= max <= 1, got {cs}")


def load_eval_config(recipe: str | os.PathLike | dict[str, Any] | None = None,
                     overrides: list[str] | None = None, base_data: dict[str, Any] | None = None) -> DictConfig:
    """Schema <- ``base_data`` (the checkpoint's data config) <- recipe (a YAML path, or an eval config as a
    dict, e.g. the one a result file stores) <- overrides, then validated."""
    layers: list[Any] = []
    if base_data:
        # the pre-training subset is not carried over: evaluation has its own train/test subsets
        known = set(OmegaConf.structured(DataConfig).keys()) - {"subset"}
        layers.append({"data": {k: v for k, v in base_data.items() if k in known}})
    if isinstance(recipe, dict):
        layers.append(recipe)
        recipe = None
    return merge_config(EvalConfig, layers, recipe, overrides, validate_eval)
