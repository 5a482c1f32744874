"""Label-free health numbers of a set of embeddings: do they still spread over many directions, or has the encoder
collapsed (every image mapped to nearly the same vector, or onto a few dimensions)?

All three are computed on the L2-normalized embeddings ``z`` (N, D), so they do not depend on the feature scale:

- ``eff_rank``: exp of the entropy of the singular values of ``z`` normalized to sum 1 (RankMe, Garrido et al.
  2023): 1 for identical embeddings, N for N orthonormal ones, at most min(N, D);
- ``feat_std``: the mean over dimensions of the per-dimension standard deviation of ``z`` (SimSiam's collapse
  check): 0 when collapsed, about 1/sqrt(D) for embeddings spread uniformly on the sphere;
- ``mean_cos``: the mean cosine similarity between different images: 1 when collapsed, about 0 when spread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["embedding_health"]


@torch.no_grad()
def embedding_health(feats: Tensor) -> dict[str, float]:
    """``{"eff_rank", "feat_std", "mean_cos", "images", "dim"}`` of ``feats`` (N, D), N >= 2 (float64 math).

    All-zero embeddings (no direction at all) count as fully collapsed: rank 0, std 0, cosine 1."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got shape {tuple(feats.shape)}")
    x = feats.detach().to("cpu", torch.float64)
    n, d = x.shape
    norms = x.norm(dim=1, keepdim=True)
    if not bool((norms > 0).any()):
        return {"eff_rank": 0.0, "feat_std": 0.0, "mean_cos": 1.0, "images": n, "dim": d}
    z = x / norms.clamp_min(torch.finfo(torch.float64).tiny)
    s = torch.linalg.svdvals(z)
    p = s / s.sum()
    p = p[p > 0]
    eff_rank = math.exp(float(-(p * p.log()).sum()))
    feat_std = float(z.std(dim=0, unbiased=False).mean())
    total = z.sum(dim=0)
    mean_cos = float((total @ total - (z * z).sum()) / (n * (n - 1)))  # off-diagonal mean of z z^T
    return {"eff_rank": eff_rank, "feat_std": feat_std, "mean_cos": mean_cos, "images": n, "dim": d}
