"""End-to-end fine-tuning with the BEiT/ConMIM and MAE recipes, built from timm's own parts.

timm provides every ingredient: the model (the exported architecture plus a fresh head, drop path, pooling,
and optionally the reference's fresh ``fc_norm`` and per-block relative position tables, built by
:mod:`cmim.eval.timm_model`),
``create_optimizer_v2(layer_decay=...)`` (AdamW over ``param_groups_layer_decay``, no decay on norms, biases
and the tokens the model lists in ``no_weight_decay``), ``CosineLRScheduler`` (per-iteration warmup + cosine,
honouring each group's ``lr_scale``), ``create_transform`` (RandomResizedCrop, flip, RandAugment, random
erasing), ``Mixup`` (Mixup/CutMix with label smoothing) and ``SoftTargetCrossEntropy``. This file only wires
them together and reports top-1/top-5 on the (centre-crop) test split.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from cmim.core.cpus import loader_workers
from cmim.core.distributed import resolve_device
from cmim.core.knn import topk_accuracy
from cmim.core.precision import autocast
from cmim.core.schedules import scaled_lr
from cmim.eval.datasets import TransformDataset, base_train_dataset, check_data_fits, eval_dataset, seed_augmentation
from cmim.eval.loading import EncoderSource
from cmim.eval.predict import eval_mode, predict
from cmim.eval.timm_model import build_timm_model

__all__ = ["build_finetune_model", "build_optimizer", "finetune", "peak_lr", "posterize_any_bits",
           "train_transform"]

log = logging.getLogger("cmim")


def peak_lr(ft: Any) -> float:
    return scaled_lr(ft.lr, ft.blr, ft.batch_size)


def build_finetune_model(src: EncoderSource, ft: Any, num_classes: int) -> nn.Module:
    """timm model with ``src``'s weights, a fresh ``num_classes`` head, the recipe's pooling and drop path, and
    the recipe's head norm and relative position tables (``finetune.head_norm``, ``finetune.rel_pos_bias``; see
    :mod:`cmim.eval.timm_model`)."""
    return build_timm_model(src, pretrained=True, head_norm=str(ft.head_norm),
                            rel_pos_bias=str(ft.rel_pos_bias), num_classes=num_classes, global_pool=str(ft.pool),
                            drop_path_rate=float(ft.drop_path))


def build_optimizer(model: nn.Module, ft: Any) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups, no weight decay on 1-d parameters and on what
    ``model.no_weight_decay()`` lists (tokens, relative position tables).

    timm's ``param_groups_layer_decay`` with the model's ``group_matcher``: for ``depth`` blocks, layer id 0 is
    the stem (patch embed, cls token, pos embed, a shared relative position bias), i + 1 is block i (its own
    relative position table included; the pre-trained final norm joins the last block), depth + 1 the head
    and ``fc_norm``; ``lr_scale = layer_decay ** (depth + 1 - layer_id)``, as BEiT's ``LayerDecayValueAssigner``.
    """
    return create_optimizer_v2(model, opt="adamw", lr=peak_lr(ft), weight_decay=float(ft.weight_decay),
                               layer_decay=float(ft.layer_decay), betas=tuple(ft.betas))


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also defined for 0 bits: a black image, as Pillow < 13 returned.

    RandAugment's ``PosterizeIncreasing`` keeps ``4 - int(level / 10 * 4)`` bits, so 0 at magnitude 10 (which
    m9 with mstd 0.5 reaches); Pillow 13 rejects 0 bits and the worker would crash mid-epoch.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _use_safe_posterize(transform: Any) -> Any:
    """Swap the posterize function of this transform's RandAugment ops (this object only, not timm's)."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = posterize_any_bits
    return transform


def train_transform(cfg: DictConfig) -> Any:
    """timm's training transform with the recipe's crop, flip, RandAugment / colour jitter, random erasing."""
    ft, d = cfg.finetune, cfg.data
    return _use_safe_posterize(create_transform(int(d.img_size), is_training=True, scale=tuple(ft.crop_scale),
                            hflip=float(ft.hflip), color_jitter=ft.color_jitter, auto_augment=ft.auto_augment,
                            interpolation=str(d.interpolation), mean=tuple(d.mean), std=tuple(d.std),
                            re_prob=float(ft.reprob), re_mode=str(ft.remode), re_count=int(ft.recount)))


def evaluate(model: nn.Module, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of ``model`` on the centre crops of the test split."""
    with eval_mode(model):
        logits, labels = predict(model, eval_dataset(cfg, "test"), mean=cfg.data.mean, std=cfg.data.std,
                                 device=device, precision=cfg.precision, batch_size=cfg.batch_size,
                                 num_workers=loader_workers(cfg.data.num_workers))
    return topk_accuracy(logits, labels)


def finetune(src: EncoderSource, cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """Fine-tune ``src``'s encoder on the train split; top-1/top-5 of the last epoch on the test split."""
    ft = cfg.finetune
    check_data_fits(src, cfg.data)
    device = resolve_device(cfg.device, key="device")
    seed_augmentation(cfg.seed)
    model = build_finetune_model(src, ft, num_classes).to(device)
    train_ds = TransformDataset(base_train_dataset(cfg), train_transform(cfg))
    bs = min(int(ft.batch_size), len(train_ds) - len(train_ds) % 2)  # Mixup needs an even batch
    nw = loader_workers(cfg.data.num_workers)
    loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw,
                        persistent_workers=nw > 0, generator=torch.Generator().manual_seed(cfg.seed))
    lr = peak_lr(ft)
    opt = build_optimizer(model, ft)
    spe = len(loader)
    total = int(ft.steps) if ft.steps is not None else ft.epochs * spe
    epochs = math.ceil(total / spe)
    # with a step budget the warmup keeps its share of the schedule (warmup_epochs / epochs), not a number of
    # epochs of a possibly tiny labeled set (1% of Fashion-MNIST is 4 steps per epoch)
    warm = round(float(ft.warmup_epochs) / ft.epochs * total) if ft.steps is not None else round(
        float(ft.warmup_epochs) * spe)
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=float(ft.min_lr), warmup_t=warm,
                              warmup_lr_init=float(ft.warmup_lr), warmup_prefix=True, t_in_epochs=False)
    mixup = None
    if ft.mixup > 0 or ft.cutmix > 0:
        mixup = Mixup(mixup_alpha=float(ft.mixup), cutmix_alpha=float(ft.cutmix), prob=float(ft.mixup_prob),
                      switch_prob=float(ft.mixup_switch_prob), mode="batch",
                      label_smoothing=float(ft.smoothing), num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif ft.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=float(ft.smoothing))
    else:
        criterion = nn.CrossEntropyLoss()
    mixed_precision = autocast(device, cfg.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    step, history, stop = 0, [], False
    t_start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        t0, loss_sum, n_steps = time.perf_counter(), torch.zeros((), device=device), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            sched.step_update(step)
            with mixed_precision:
                loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ft.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, float(ft.clip_grad))
            opt.step()
            step += 1
            n_steps += 1
            loss_sum += loss.detach().float()
            stop = step >= total or (ft.max_steps is not None and step >= ft.max_steps)
            if stop:
                break
        epoch_loss = loss_sum.item() / max(1, n_steps)  # one host sync per epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"fine-tuning loss is {epoch_loss} in epoch {epoch + 1}")
        last = stop or epoch == epochs - 1
        if last or (ft.eval_every_epochs > 0 and (epoch + 1) % ft.eval_every_epochs == 0):
            res = evaluate(model, cfg, device)
            history.append({"epoch": epoch + 1, "step": step, "train_loss": epoch_loss,
                            "lr": max(g["lr"] for g in opt.param_groups), **res,
                            "seconds": time.perf_counter() - t0})
            log.info("finetune epoch %d/%d: loss %.4f, test top-1 %.2f%% top-5 %.2f%% (%.0fs)", epoch + 1,
                     epochs, history[-1]["train_loss"], res["top1"], res["top5"], time.perf_counter() - t0)
        if stop:
            break
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "history": history, "lr": lr, "steps": step,
            "steps_per_epoch": spe, "batch_size": bs, "train_samples": len(train_ds),
            "train_seconds": time.perf_counter() - t_start, "num_classes": num_classes}
