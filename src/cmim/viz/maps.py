"""What the encoder sees inside one image.

- Patch similarity: for a few query patches, the cosine similarity between the query's output token and
  every patch token of the same image. ConMIM trains exactly this (a masked patch must find its own teacher
  token among the image's other patches), so a trained encoder shows localized, object-shaped maps where a
  random one shows uniform or position-only structure.
- CLS attention: the last block's attention weights from the CLS token to every patch, per head and averaged.
  They are read by timm's ``AttentionExtract`` from the softmax of timm's own attention module (its explicit,
  non-fused path), so ViT and Beit (with its relative position bias) are both exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import AttentionExtract
from torch import Tensor

from cmim.data.augment import normalize
from cmim.eval.loading import EncoderSource
from cmim.viz.common import display_image, new_figure, save_figure

__all__ = ["cls_attention", "default_queries", "patch_similarity", "plot_attention", "plot_patch_similarity",
           "pick_images"]


def pick_images(dataset, n: int, indices: list[int] | None = None) -> tuple[Tensor, list[int], list[int]]:
    """uint8 images (n, C, H, W), their indices and labels: given indices, else one per class (first seen)."""
    if not indices:
        indices, seen = [], set()
        for i in range(min(len(dataset), 50 * n)):
            label = int(dataset[i]["label"])
            if label not in seen:
                seen.add(label)
                indices.append(i)
            if len(indices) == n:
                break
        indices = indices or list(range(min(n, len(dataset))))
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] for it in items]), list(indices), [int(it["label"]) for it in items]


def default_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Three query patches (row, col): centre, upper-left and lower-right quarter points."""
    gh, gw = grid
    qs = [(gh // 2, gw // 2), (gh // 4, gw // 4), ((3 * gh) // 4, (3 * gw) // 4)]
    out: list[tuple[int, int]] = []
    for q in qs:
        if q not in out:
            out.append(q)
    return out


@torch.no_grad()
def patch_similarity(src: EncoderSource, images_u8: Tensor, mean, std,
                     queries: list[tuple[int, int]]) -> Tensor:
    """Cosine similarity maps (B, Q, gh, gw) between each query patch token and all patch tokens."""
    enc = src.encoder.eval()
    x = normalize(images_u8.to(next(enc.parameters()).device), mean, std)
    tokens = F.normalize(enc(x)[:, 1:].float(), dim=-1)  # (B, N, D)
    gh, gw = enc.grid_size
    idx = torch.tensor([r * gw + c for r, c in queries], device=tokens.device)
    sim = torch.einsum("bqd,bnd->bqn", tokens[:, idx], tokens)
    return sim.reshape(sim.shape[0], len(queries), gh, gw).cpu()


@torch.no_grad()
def cls_attention(src: EncoderSource, images_u8: Tensor, mean, std) -> Tensor:
    """Last-block attention of the CLS token over the patches, (B, heads, gh, gw) (rows sum to 1 with CLS)."""
    enc = src.encoder.eval()
    blocks = enc.backbone.blocks
    attn = blocks[-1].attn
    fused = getattr(attn, "fused_attn", False)
    attn.fused_attn = False  # traced on the explicit softmax path, where the weights are a node of the graph
    try:
        # timm's extractor traces a copy of the backbone's graph (no hook is left on the encoder); the backbone's
        # own forward is the encoder's unmasked one
        extract = AttentionExtract(enc.backbone, names=[f"blocks.{len(blocks) - 1}.attn.softmax"])
        x = normalize(images_u8.to(next(enc.parameters()).device), mean, std)
        w = next(iter(extract(x).values())).float()  # (B, H, 1+N, 1+N)
    finally:
        attn.fused_attn = fused
    gh, gw = enc.grid_size
    return w[:, :, 0, -gh * gw:].reshape(w.shape[0], w.shape[1], gh, gw).cpu()


def _upsample(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).numpy()


def plot_patch_similarity(sources: list[tuple[str, EncoderSource]], images_u8: Tensor, labels: list[str],
                          mean, std, out: str | os.PathLike,
                          queries: list[tuple[int, int]] | None = None) -> Path:
    """Rows: (source, image); columns: the image with numbered queries, then one similarity map per query."""
    grid = sources[0][1].encoder.grid_size
    queries = queries or default_queries(grid)
    size = tuple(images_u8.shape[-2:])
    ph, pw = size[0] / grid[0], size[1] / grid[1]
    sims = [(name, patch_similarity(src, images_u8, mean, std, queries)) for name, src in sources]
    rows, cols = len(sources) * images_u8.shape[0], 1 + len(queries)
    fig, axes = new_figure(rows, cols, (2.0 * cols + 1.0, 2.0 * rows + 0.4), constrained=True)
    colors = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de"]
    im = None
    for s, (name, sim) in enumerate(sims):
        for b in range(images_u8.shape[0]):
            r = s * images_u8.shape[0] + b
            img, cmap = display_image(images_u8[b])
            ax = axes[r * cols]
            ax.imshow(img, cmap=cmap)
            for q, (qr, qc) in enumerate(queries):
                ax.add_patch(_rect(qc * pw, qr * ph, pw, ph, colors[q % len(colors)]))
            ax.set_ylabel(f"{name}\n{labels[b]}", fontsize=8)
            maps = _upsample(sim[b], size)
            for q, (qr, qc) in enumerate(queries):
                ax = axes[r * cols + 1 + q]
                ax.imshow(img, cmap=cmap)
                im = ax.imshow(maps[q], cmap="inferno", alpha=0.7, vmin=-1.0, vmax=1.0)
                ax.add_patch(_rect(qc * pw, qr * ph, pw, ph, colors[q % len(colors)]))
                if r == 0:
                    ax.set_title(f"query {q + 1} (row {qr}, col {qc})", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity to the query token")
    fig.suptitle("patch-token similarity to query patches (last layer, after the final norm)", fontsize=10)
    return save_figure(fig, out, tight=False)


def plot_attention(sources: list[tuple[str, EncoderSource]], images_u8: Tensor, labels: list[str], mean, std,
                   out: str | os.PathLike) -> Path:
    """Rows: (source, image); columns: the image, the head-averaged CLS attention, then each head."""
    size = tuple(images_u8.shape[-2:])
    maps = [(name, cls_attention(src, images_u8, mean, std)) for name, src in sources]
    heads = max(m.shape[1] for _, m in maps)
    rows, cols = len(sources) * images_u8.shape[0], 2 + heads
    fig, axes = new_figure(rows, cols, (1.8 * cols, 1.9 * rows))
    for s, (name, att) in enumerate(maps):
        for b in range(images_u8.shape[0]):
            r = s * images_u8.shape[0] + b
            img, cmap = display_image(images_u8[b])
            axes[r * cols].imshow(img, cmap=cmap)
            axes[r * cols].set_ylabel(f"{name}\n{labels[b]}", fontsize=8)
            panels = [att[b].mean(dim=0)] + [att[b, h] for h in range(att.shape[1])]
            for j, m in enumerate(panels):
                ax = axes[r * cols + 1 + j]
                up = _upsample(m.unsqueeze(0), size)[0]
                ax.imshow(up, cmap="viridis")
                if r == 0:
                    ax.set_title("mean of heads" if j == 0 else f"head {j}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("CLS-token attention over patches, last block (each map on its own scale)", fontsize=10)
    return save_figure(fig, out)


def _rect(x: float, y: float, w: float, h: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=color, linewidth=1.6)
