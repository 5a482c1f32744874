"""Evaluation recipes: an OmegaConf schema of their own, merged over the checkpoint's data settings.

Order of precedence: schema defaults <- the pre-training data config stored in the checkpoint (image size,
channels, normalization, dataset) <- the eval recipe YAML (``_base_`` supported) <- ``key=value``
overrides. So ``cmim eval knn CKPT`` with no recipe evaluates on the data the encoder was trained on.

Closed choices are :class:`~cmim.core.choices.Choice` enums, checked by OmegaConf at merge (one line naming the
key); the ones defined elsewhere (encoder role, device, precision, pooling, the fine-tuning variants) are
imported from where they are defined. Each section's other checks sit beside its dataclass (``check``);
:func:`validate_eval` calls them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmim.config import DataConfig, merge_config, validate_data_input
from cmim.core.choices import Choice
from cmim.core.distributed import DeviceChoice
from cmim.core.errors import require
from cmim.core.precision import Precision
from cmim.eval.timm_model import HeadNorm, RelPosBias
from cmim.models.encoder import GlobalPool, is_pooled_feature
from cmim.models.stored_encoder import EncoderRole

__all__ = ["EvalConfig", "FinetuneConfig", "Init", "KNNConfig", "LinearConfig", "LinearMode", "LinearOptimizer",
           "load_eval_config", "validate_eval"]


class Init(Choice):
    """``init``: the encoder's weights."""

    pretrained = "pretrained"
    random = "random"  # same architecture, fresh weights: the baseline


class LinearMode(Choice):
    """``linear.mode``: "cached" features of centre crops | "reference" augmented images every step."""

    cached = "cached"
    reference = "reference"


class LinearOptimizer(Choice):
    """``linear.optimizer``: both timm optimizers."""

    sgd = "sgd"  # SGD with momentum (MoCo v3)
    lars = "lars"  # LARS (MAE)


def _check_crop_scale(key: str, crop_scale: Any) -> None:
    cs = list(crop_scale)
    require(len(cs) == 2 and 0 < cs[0] <= cs[1] <= 1, f"{key}.crop_scale: need 0 < min <= max <= 1, got {cs}")


@dataclass
class KNNConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # DINO; top1/top5 reported at k=20
    temperature: float = 0.07

    @staticmethod
    def check(knn: DictConfig) -> None:
        require(len(knn.ks) > 0 and all(k >= 1 for k in knn.ks), "knn.ks: need positive k values")
        require(knn.temperature > 0, "knn.temperature: must be positive")


@dataclass
class LinearConfig:
    # "cached": features of the centre crops computed once (on disk), then BN + linear trained on them: fast.
    # "reference": MoCo v3 / MAE; random-resized-crop + flip images through the frozen encoder every step.
    mode: LinearMode = LinearMode.cached
    epochs: int = 90
    batch_size: int = 1024
    optimizer: LinearOptimizer = LinearOptimizer.sgd  # both timm optimizers
    lr: float | None = None  # absolute; None = blr * batch_size / 256
    blr: float = 3.0  # MoCo v3 ViT linear probe: lr 3 at batch 1024 (-> 12); MAE: 0.1 with LARS at 16384
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    bn: bool = True  # BatchNorm1d(affine=False) before the linear layer (MAE; MoCo v3's release has none)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # reference mode only
    hflip: float = 0.5

    @staticmethod
    def check(lin: DictConfig) -> None:
        require(lin.epochs > 0 and lin.batch_size > 0, "linear.epochs/batch_size: must be positive")
        require(lin.lr is None or lin.lr > 0, "linear.lr: must be positive or null")
        _check_crop_scale("linear", lin.crop_scale)


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
    pool: GlobalPool = GlobalPool.avg  # "avg": mean of patch tokens (BEiT/ConMIM/MAE) | "token": CLS
    # "pretrained": every token through the pre-trained final norm, then pooled (the exported model as is) |
    # "fc_norm": BEiT/ConMIM/MAE: final norm dropped, pooled tokens through a fresh LayerNorm before the head
    head_norm: HeadNorm = HeadNorm.pretrained
    # Beit encoders with a shared relative position bias: "shared": that one table, trained in the stem's
    # layer-decay group | "per_block": BEiT/ConMIM --rel_pos_bias: one table per block, each a copy of the
    # shared one, trained with its block's layer-decay scale (an encoder without a shared table: no change)
    rel_pos_bias: RelPosBias = RelPosBias.shared
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

    @staticmethod
    def check(ft: DictConfig) -> None:
        require(ft.epochs > 0, "finetune.epochs: must be positive")
        require(ft.steps is None or ft.steps > 0, "finetune.steps: must be positive or null")
        require(ft.batch_size > 1, "finetune.batch_size: must be at least 2 (Mixup pairs samples)")
        require(0.0 < ft.layer_decay <= 1.0, f"finetune.layer_decay: must be in (0, 1], got {ft.layer_decay}")
        require(0.0 <= ft.drop_path < 1.0, "finetune.drop_path: must be in [0, 1)")
        require(0.0 <= ft.smoothing < 1.0, "finetune.smoothing: must be in [0, 1)")
        require(0.0 <= ft.reprob <= 1.0, "finetune.reprob: must be in [0, 1]")
        require(ft.lr is None or ft.lr > 0, "finetune.lr: must be positive or null")
        require(ft.max_steps is None or ft.max_steps > 0, "finetune.max_steps: must be positive or null")
        _check_crop_scale("finetune", ft.crop_scale)


@dataclass
class EvalConfig:
    encoder: EncoderRole = EncoderRole.teacher  # exported files hold one encoder
    # k-NN / linear: "mean" of patch tokens | "cls" | "gridG" (an open set: is_pooled_feature); "pixels" for the
    # raw-pixel baseline
    feature: str = "mean"
    init: Init = Init.pretrained
    data: DataConfig = field(default_factory=DataConfig)
    train_subset: int | None = None  # evenly spaced samples of the train split (None: all)
    # the few-labels setting: a class-balanced, seeded share of the train labels (0.01 = 1%) for k-NN, the linear
    # probe and fine-tuning; the same samples for every encoder at a given seed. None: all labels.
    label_fraction: float | None = None
    test_subset: int | None = None
    batch_size: int = 256  # feature extraction / evaluation batch
    device: DeviceChoice = DeviceChoice.auto
    precision: Precision = Precision.bf16
    seed: int = 0
    cache_dir: str | None = None  # feature cache; None: $CMIM_CACHE or ~/.cache/cmim/features
    out: str | None = None  # result JSON; None: <checkpoint dir>/eval/<protocol>-<dataset>-<encoder>-...json
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """The top-level keys (the enums were checked at merge)."""
        require(cfg.feature == "pixels" or is_pooled_feature(cfg.feature),
                f"feature: must be mean, cls or gridG (e.g. grid2), got {cfg.feature!r}")
        require(cfg.batch_size > 0, "batch_size: must be positive")
        require(cfg.label_fraction is None or 0 < cfg.label_fraction <= 1,
                f"label_fraction: must be in (0, 1] or null, got {cfg.label_fraction}")
        for k in ("train_subset", "test_subset"):
            require(cfg[k] is None or cfg[k] > 0, f"{k}: must be positive or null")


def validate_eval(cfg: DictConfig) -> None:
    """Every section's checks; one line per problem, naming the key."""
    EvalConfig.check(cfg)
    validate_data_input(cfg.data)  # val_fraction carried from the checkpoint: evals see its split
    KNNConfig.check(cfg.knn)
    LinearConfig.check(cfg.linear)
    FinetuneConfig.check(cfg.finetune)


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
