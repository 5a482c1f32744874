"""Pure loss functions for contrastive and pixel-reconstruction pre-training objectives.

All functions are free of distributed calls: callers gather keys across processes themselves and pass the
offset of their local positives. Contrastive losses run in float32 with autocast disabled, because
low-precision logits divided by a small temperature lose too much accuracy in the softmax. No function
performs a host-device sync (no ``.item()``, no boolean indexing), so they are safe inside CUDA graphs and
do not stall the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "info_nce",
    "masked_pixel_loss",
    "normalize_patch_pixels",
    "patch_contrastive_loss",
    "patchify",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def patch_contrastive_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    temperature: float = 0.1,
    negatives: str = "image",
) -> Tensor:
    """ConMIM's denoising patch-level InfoNCE, averaged over the masked tokens of the batch.

    ``student`` and ``teacher`` are projected, not yet normalized patch features ``(B, N, D)`` without CLS;
    both are L2-normalized here. For a masked student token ``(b, i)`` the positive key is the teacher
    patch ``(b, i)``; with ``negatives="image"`` the other keys are the remaining patches of the same image
    (ConMIM), with ``negatives="batch"`` they are all ``B * N`` teacher patches of the batch (MimCo option;
    memory grows as ``(B * N) ** 2``). The teacher is used as given: detach it in the caller if it must not
    receive gradients. Cross-entropy is computed for all rows and weighted by the mask to avoid a sync.
    """
    if student.ndim != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must both have shape (B, N, D); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    b, n, d = student.shape
    if mask.shape != (b, n):
        raise ValueError(f"mask must have shape (B, N) = {(b, n)}, got {tuple(mask.shape)}")
    _check_temperature(temperature)
    if negatives not in ("image", "batch"):
        raise ValueError(f"negatives must be 'image' or 'batch', got {negatives!r}")

    with torch.autocast(device_type=student.device.type, enabled=False):
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float(), dim=-1)
        if negatives == "image":
            logits = torch.bmm(s, t.transpose(1, 2)).div_(temperature)  # (B, N, N)
            targets = torch.arange(n, device=s.device).expand(b, n)
            ce = F.cross_entropy(logits.reshape(b * n, n), targets.reshape(-1), reduction="none")
        else:
            s_flat, t_flat = s.reshape(b * n, d), t.reshape(b * n, d)
            logits = (s_flat @ t_flat.t()).div_(temperature)  # (B*N, B*N)
            targets = torch.arange(b * n, device=s.device)
            ce = F.cross_entropy(logits, targets, reduction="none")
        weights = mask.reshape(-1).to(ce.dtype)
        return (ce * weights).sum() / weights.sum().clamp_min(1.0)


def info_nce(q: Tensor, k: Tensor, temperature: float, label_offset: int = 0) -> Tensor:
    """InfoNCE of queries ``(B, D)`` against keys ``(M, D)``; ``q[i]``'s positive is ``k[label_offset + i]``.

    ``k`` may hold the keys gathered from all processes, with ``label_offset = rank * B``. Returns the mean
    cross-entropy *without* MoCo v3's ``2 * temperature`` factor, which the caller applies if wanted.
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q must be (B, D) and k (M, D) with equal D; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if label_offset < 0 or label_offset + q.shape[0] > k.shape[0]:
        raise ValueError(
            f"positives k[{label_offset}:{label_offset + q.shape[0]}] fall outside the {k.shape[0]} keys"
        )
    _check_temperature(temperature)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qn = F.normalize(q.float(), dim=-1)
        kn = F.normalize(k.float(), dim=-1)
        logits = (qn @ kn.t()).div_(temperature)
        labels = torch.arange(q.shape[0], device=q.device) + label_offset
        return F.cross_entropy(logits, labels)


def masked_pixel_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SimMIM's L1 reconstruction loss, averaged over masked patches and their ``P`` pixel values.

    ``pred`` and ``target`` are ``(B, N, P)``; ``mask`` is ``(B, N)`` with ``True`` for masked patches.
    Visible patches contribute nothing, so the model is not rewarded for copying its input.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both have shape (B, N, P); got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must have shape (B, N) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    weights = mask.to(torch.float32)
    abs_err = (pred.float() - target.float()).abs()
    return (abs_err * weights[..., None]).sum() / (weights.sum().clamp_min(1.0) * pred.shape[-1])


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split ``(B, C, H, W)`` images into ``(B, N, p * p * C)`` patches.

    Patches are in row-major (raster) order, matching a ViT's token order; inside a patch the layout is
    ``(row, col, channel)`` with channel fastest, as in MAE.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if p < 1 or h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, p * p * c)


def normalize_patch_pixels(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalize each patch to zero mean and unit variance over its last dimension (MAE's ``norm_pix_loss``).

    Follows MAE's code exactly: ``(x - mean) / sqrt(var + eps)`` with the *unbiased* variance (torch's
    default, Bessel-corrected), so reconstruction targets match published recipes.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()
