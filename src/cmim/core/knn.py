"""k-NN classification on frozen features (the DINO protocol: cosine similarity, the k nearest training
samples vote with weight exp(sim / T)) and top-k accuracy (timm's), as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import Tensor

__all__ = ["knn_accuracy", "knn_scores", "topk_accuracy"]


@torch.no_grad()
def knn_scores(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Class scores (M, C): each test sample's k nearest training samples vote with weight exp(sim/T)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp().unsqueeze(-1)
        votes = F.one_hot(train_labels[top_idx], num_classes).float() * weights
        out.append(votes.sum(dim=1))
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of class scores or logits (M, C) against labels (M,); with fewer than
    five classes, top-5 counts them all (``timm.utils.accuracy``)."""
    top1, top5 = accuracy(scores, labels, topk=(1, 5))
    return {"top1": top1.item(), "top5": top5.item()}


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> dict[str, float]:
    """Top-1 and top-5 k-NN accuracy in percent."""
    scores = knn_scores(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                        num_classes=num_classes)
    return topk_accuracy(scores, test_labels)
