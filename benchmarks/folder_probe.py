"""Why does (or doesn't) pre-training pay off on a folder? Probes of encoders on one folder split.

For each source (a checkpoint, ``random:RECIPE`` = that recipe's architecture at random init, or ``pixels``),
on the train / held-out parts of the folder split the first source's data config defines (override with
key=value, e.g. ``data.root=... data.val_fraction=0.2 data.split_seed=100``):

- k-NN (k=20, cosine, DINO votes) top-1 and balanced accuracy on the CLS token, the mean of the patch tokens, the
  mean of the *foreground* patch tokens only (patches whose pixels are not flat), and the mean feature centred
  (train mean subtracted) before the cosine;
- a logistic-regression linear probe (scikit-learn, standardized features) on CLS and mean;
- how much of the patch tokens' variance is *position* (the per-position mean over images) and how much is
  each image's own mean (what a global pooled feature keeps), the mean cosine
  between the global embeddings of different images, and the fraction of flat patches.

    python benchmarks/folder_probe.py RUN/checkpoint.pt random:configs/conmim_folder_cpu.yaml pixels \\
        data.root=/path/to/folder data.val_fraction=0.2 data.split_seed=100

Numbers go to benchmarks/study_notes.md with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from cmim.core.health import embedding_health
from cmim.core.knn import knn_scores
from cmim.core.precision import autocast
from cmim.data.augment import normalize
from cmim.eval.baselines import recipe_source
from cmim.eval.config import load_eval_config
from cmim.eval.datasets import eval_dataset
from cmim.eval.loading import load_source

FLAT_STD = 0.02  # a patch whose pixels (in [0, 1]) vary less than this is background


def knn(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
        test_y: torch.Tensor) -> tuple[float, float]:
    scores = knn_scores(train_f, train_y, test_f, k=20, temperature=0.07)
    pred = scores.argmax(1)
    return 100 * float((pred == test_y).float().mean()), 100 * balanced_accuracy_score(test_y, pred)


def linear(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray) -> float:
    scaler = StandardScaler().fit(train_f)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_f), train_y)
    return 100 * float((clf.predict(scaler.transform(test_f)) == test_y).mean())


@torch.no_grad()
def tokens_of(src, ds, patch: int, mean: list[float], std: list[float], batch: int = 256) -> dict[str, torch.Tensor]:
    """cls, mean, foreground mean, all patch tokens (N, L, D) and flat-patch masks of a dataset (``src`` None:
    pixels only)."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("cls", "mean", "fg", "tokens", "flat", "y", "pixels")}
    for b in DataLoader(ds, batch_size=batch, num_workers=2):
        img = b["image"]
        x = normalize(img, mean, std)
        unit = img.float() / 255 if img.dtype == torch.uint8 else img.float()
        p = unit.unfold(2, patch, patch).unfold(3, patch, patch)  # B C gh gw p p
        flat = p.flatten(4).std(-1).amax(1).flatten(1) < FLAT_STD  # B L
        out["flat"].append(flat)
        out["y"].append(b["label"])
        out["pixels"].append(x.flatten(1))
        if src is None:
            continue
        with autocast(torch.device("cpu"), "bf16"):
            t = src.encoder(x).float()
        cls, pt = t[:, 0], t[:, -flat.shape[1]:]
        fgw = (~flat).float().unsqueeze(-1)
        out["cls"].append(cls)
        out["mean"].append(pt.mean(1))
        out["fg"].append((pt * fgw).sum(1) / fgw.sum(1).clamp_min(1))
        out["tokens"].append(pt)
    return {k: torch.cat(v) for k, v in out.items() if v}


def position_share(tokens: torch.Tensor) -> float:
    """Share of the patch tokens' variance explained by their position (the mean token at each position)."""
    centred = tokens - tokens.mean((0, 1), keepdim=True)
    per_pos = centred.mean(0, keepdim=True)
    return float((per_pos.pow(2).sum() * tokens.shape[0]) / centred.pow(2).sum())


def image_share(tokens: torch.Tensor) -> float:
    """Share of the patch tokens' variance that is each image's own mean token (the component a loss whose
    negatives are only the other patches of the same image cannot see)."""
    centred = tokens - tokens.mean((0, 1), keepdim=True)
    per_image = centred.mean(1, keepdim=True)
    return float((per_image.pow(2).sum() * tokens.shape[1]) / centred.pow(2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="checkpoint[:student] | random:RECIPE | pixels, then key=value")
    args = ap.parse_args()
    sources = [s for s in args.sources if "=" not in s]
    overrides = [s for s in args.sources if "=" in s]
    t0 = time.time()
    first = next(s for s in sources if s != "pixels")
    which = "student" if first.endswith(":student") else "teacher"
    src0 = (recipe_source(first[7:]) if first.startswith("random:")
            else load_source(first.removesuffix(":student"), which))
    cfg = load_eval_config(None, ["train_subset=null", "test_subset=null", *overrides], base_data=src0.data)
    train, test = eval_dataset(cfg, "train"), eval_dataset(cfg, "test")
    patch = int(src0.encoder.timm_kwargs["patch_size"])
    rows = {}
    for name in sources:
        if name == "pixels":
            src = None
        elif name.startswith("random:"):
            src = recipe_source(name[7:], [f"data.root={cfg.data.root}"])
        else:
            w = "student" if name.endswith(":student") else "teacher"
            src = load_source(name.removesuffix(":student"), w)
        norm = (list(cfg.data.mean), list(cfg.data.std))
        a, b = tokens_of(src, train, patch, *norm), tokens_of(src, test, patch, *norm)
        ya, yb = a["y"], b["y"]
        row: dict[str, float] = {"flat_patches": float(b["flat"].float().mean())}
        feats = ["pixels"] if src is None else ["cls", "mean", "fg"]
        for f in feats:
            row[f"knn_{f}"], row[f"knn_bal_{f}"] = knn(a[f], ya, b[f], yb)
        if src is not None:
            mu = a["mean"].mean(0, keepdim=True)
            row["knn_mean_centred"] = knn(a["mean"] - mu, ya, b["mean"] - mu, yb)[0]
            row["position_share"] = position_share(b["tokens"])
            row["image_share"] = image_share(b["tokens"])
            row["mean_cos_mean"] = embedding_health(b["mean"])["mean_cos"]
            row["mean_cos_cls"] = embedding_health(b["cls"])["mean_cos"]
        for f in (["pixels"] if src is None else ["cls", "mean"]):
            row[f"linear_{f}"] = linear(a[f].numpy(), ya.numpy(), b[f].numpy(), yb.numpy())
        rows[name] = {k: round(v, 4) for k, v in row.items()}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"# {len(train)} train / {len(test)} held-out images, {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
