"""Linear probe on frozen features: BatchNorm without affine + one linear layer (MAE / MoCo v3 protocol).

Two modes share the head, optimizer (timm SGD-momentum or LARS) and per-iteration warmup + cosine schedule
(timm ``CosineLRScheduler``):
- ``cached``: features of centre crops, extracted once (and cached), trained on directly. Fast; the protocol
  of choice for small datasets and for quick comparisons.
- ``reference``: every step sends a random-resized-crop + flip batch through the frozen encoder, as the
  MoCo v3 / MAE linear probes do. Costs a full encoder forward per image per epoch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cmim.core.cpus import loader_workers
from cmim.core.distributed import resolve_device
from cmim.core.knn import topk_accuracy
from cmim.core.precision import autocast
from cmim.core.schedules import scaled_lr
from cmim.eval.datasets import TransformDataset, base_train_dataset, eval_dataset, seed_augmentation
from cmim.eval.loading import EncoderSource
from cmim.eval.predict import eval_mode, predict
from cmim.models import MaskedEncoder

__all__ = ["LinearProbe", "linear_on_features", "linear_reference", "quick_linear"]

log = logging.getLogger("cmim")


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) (a per-dimension whitening the classifier would otherwise have to learn
    through a badly conditioned problem) followed by a linear layer, initialized as MoCo v3 / MAE do."""

    def __init__(self, dim: int, num_classes: int, bn: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.bn(x))


def _optimizer(head: nn.Module, lin: Any) -> tuple[torch.optim.Optimizer, float]:
    lr = scaled_lr(lin.lr, lin.blr, lin.batch_size)
    opt = create_optimizer_v2(head, opt="momentum" if lin.optimizer == "sgd" else "lars", lr=lr,
                              weight_decay=float(lin.weight_decay), momentum=float(lin.momentum))
    return opt, lr


def _scheduler(opt: torch.optim.Optimizer, lin: Any, steps_per_epoch: int) -> CosineLRScheduler:
    total = lin.epochs * steps_per_epoch
    warm = round(float(lin.warmup_epochs) * steps_per_epoch)
    return CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=float(lin.min_lr), warmup_t=warm,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def linear_on_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, lin: Any, *,
                       num_classes: int | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train the probe on cached features; returns top1/top5 on the test features plus a short history."""
    device = torch.device(device)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearProbe(train_x.shape[1], num_classes, bn=bool(lin.bn)).to(device)
    n = train_x.shape[0]
    bs = min(int(lin.batch_size), n)
    steps = max(1, n // bs)  # drop the last partial batch: BatchNorm wants full batches
    opt, lr = _optimizer(head, lin)
    sched = _scheduler(opt, lin, steps)
    train_x, train_y = train_x.to(device), train_y.to(device)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(lin.epochs):
        head.train()
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = 0.0
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            sched.step_update(step)
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item()
        if epoch == lin.epochs - 1 or (epoch + 1) % max(1, lin.epochs // 5) == 0:
            res = _eval_features(head, test_x, test_y, device)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps, **res})
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "history": history, "lr": lr, "steps": step}


def quick_linear(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, epochs: int) -> float:
    """Top-1 of the cached-feature probe with configs/eval_*_cpu.yaml's settings (SGD, lr 0.4 at batch 1024,
    5% warmup) for ``epochs``: the training monitor's linear probe, seconds on a CPU."""
    from cmim.eval.config import LinearConfig

    lin = LinearConfig(epochs=epochs, blr=0.1, warmup_epochs=0.05 * epochs)
    return float(linear_on_features(train_x, train_y, test_x, test_y, lin)["top1"])


@torch.no_grad()
def _eval_features(head: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> dict[str, float]:
    head.eval()
    logits = torch.cat([head(x[i:i + 4096].to(device)).float().cpu() for i in range(0, x.shape[0], 4096)])
    return topk_accuracy(logits, y.cpu())


def linear_reference(src: EncoderSource, cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """MoCo v3 / MAE linear probe: augmented images through the frozen encoder at every step."""
    lin, d = cfg.linear, cfg.data
    device = resolve_device(cfg.device, key="device")
    seed_augmentation(cfg.seed)
    tf = create_transform(int(d.img_size), is_training=True, scale=tuple(lin.crop_scale),
                          hflip=float(lin.hflip), color_jitter=None, auto_augment=None,
                          interpolation=str(d.interpolation), mean=tuple(d.mean), std=tuple(d.std))
    train_ds = TransformDataset(base_train_dataset(cfg), tf)
    bs = min(int(lin.batch_size), len(train_ds))
    nw = loader_workers(d.num_workers)
    loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw,
                        persistent_workers=nw > 0, generator=torch.Generator().manual_seed(cfg.seed))
    enc = src.encoder.to(device).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    head = LinearProbe(enc.embed_dim, num_classes, bn=bool(lin.bn)).to(device)
    opt, lr = _optimizer(head, lin)
    sched = _scheduler(opt, lin, len(loader))
    mixed_precision = autocast(device, cfg.precision)
    step, history = 0, []
    for epoch in range(lin.epochs):
        head.train()
        t0, loss_sum = time.perf_counter(), 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), mixed_precision:
                feats = MaskedEncoder.pool(enc(x), cfg.feature).float()
            sched.step_update(step)
            loss = F.cross_entropy(head(feats), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item()
        res = _eval_images(enc, head, cfg, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, len(loader)), **res})
        log.info("linear epoch %d/%d: loss %.4f, test top-1 %.2f%% (%.0fs)", epoch + 1, lin.epochs,
                 history[-1]["train_loss"], res["top1"], time.perf_counter() - t0)
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "history": history, "lr": lr, "steps": step,
            "train_samples": len(train_ds)}


def _eval_images(enc: MaskedEncoder, head: nn.Module, cfg: DictConfig,
                 device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of the probe on the centre crops of the test split: the encoder's pooled features under autocast,
    the head in full precision."""
    with eval_mode(head):
        logits, labels = predict(lambda x: MaskedEncoder.pool(enc(x), cfg.feature).float(), eval_dataset(cfg, "test"),
                                 head=head, mean=cfg.data.mean, std=cfg.data.std, device=device,
                                 precision=cfg.precision, batch_size=cfg.batch_size,
                                 num_workers=loader_workers(cfg.data.num_workers))
    return topk_accuracy(logits, labels)
