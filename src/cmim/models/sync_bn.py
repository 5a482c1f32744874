"""BatchNorm over the global batch of all processes, on any device.

``torch.nn.SyncBatchNorm`` only runs on CUDA; CPU multi-process runs (gloo) need the same semantics so that
N processes train exactly like one process with the same global batch (MoCo v3 and the ConMIM projector
normalize over the batch). Statistics are computed in two differentiable all-reduces (mean, then centered
second moment); gradients flow back to every process's inputs through the all-reduce's backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


class GlobalBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = torch.tensor([float(xf.shape[0])], device=xf.device)
        total = dist_fn.all_reduce(torch.cat([xf.sum(0), count]))
        n = total[-1]
        mean = total[:-1] / n
        var = dist_fn.all_reduce(((xf - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalizes
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm1d: torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm1d` elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        out = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        out.load_state_dict(module.state_dict())
        for p_new, p_old in zip(out.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        out.train(module.training)
        ref = module.running_mean if module.running_mean is not None else module.weight
        if ref is not None:
            out.to(device=ref.device, dtype=ref.dtype)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
