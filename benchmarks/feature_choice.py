"""Which pooled feature of a pre-trained encoder to probe, chosen without the test split.

k-NN (k=20, cosine, temperature 0.07, the protocol of `cmim eval knn`) fit on the first 50k Fashion-MNIST
training images and scored on the last 10k ("val"); the train -> test score is printed beside it for the
record only. Each feature plain and with every dimension standardized (statistics of the fit part). Raw
pixels first, then for each CHECKPOINT:ENCODER the last block's cls / mean / grid2 / grid3 / grid4 and the
grid3 / grid4 of blocks 3 and 4.

    python benchmarks/feature_choice.py benchmarks/study_runs/seed0/conmim/checkpoint.pt:teacher \
        benchmarks/study_runs/seed0/mimco/checkpoint.pt:student
"""

from __future__ import annotations

import sys

import torch
from omegaconf import OmegaConf
from torch import Tensor

from cmim.core.knn import knn_accuracy
from cmim.data import build_eval_dataset, normalize
from cmim.eval.loading import load_source
from cmim.models import MaskedEncoder

MEAN, STD = [0.2860], [0.3530]
FIT = 50_000


def images(split: str) -> tuple[Tensor, Tensor]:
    cfg = OmegaConf.create({"name": "fashion-mnist", "root": None, "img_size": 28, "in_chans": 1,
                            "eval_crop_pct": 1.0})
    ds = build_eval_dataset(cfg, split)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def knn(a: Tensor, ya: Tensor, b: Tensor, yb: Tensor) -> float:
    return knn_accuracy(a, ya, b, yb, k=20, temperature=0.07, num_classes=10)["top1"]


def report(name: str, train: Tensor, test: Tensor, ytr: Tensor, yte: Tensor) -> None:
    cells = []
    for standardize in (False, True):
        fit, val, tst = train[:FIT], train[FIT:], test
        if standardize:
            m, s = fit.mean(0), fit.std(0) + 1e-6
            fit, val, tst = (fit - m) / s, (val - m) / s, (tst - m) / s
        cells.append(f"val {knn(fit, ytr[:FIT], val, ytr[FIT:]):6.2f} "
                     f"test {knn(torch.cat([fit, val]), ytr, tst, yte):6.2f}")
    print(f"{name:32s} {cells[0]} | standardized {cells[1]}", flush=True)


@torch.no_grad()
def block_features(enc: MaskedEncoder, x_u8: Tensor) -> dict[tuple[str, str], Tensor]:
    outs: dict[int, Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o))
             for k, b in enumerate(enc.backbone.blocks)]
    keys = [("last", f) for f in ("cls", "mean", "grid2", "grid3", "grid4")]
    keys += [(str(k), f) for k in (3, 4) for f in ("grid3", "grid4")]
    res: dict[tuple[str, str], list[Tensor]] = {key: [] for key in keys}
    for s in range(0, len(x_u8), 1000):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            last = enc(normalize(x_u8[s:s + 1000], MEAN, STD))
        for block, f in res:
            tokens = last if block == "last" else outs[int(block)]
            res[(block, f)].append(MaskedEncoder.pool(tokens.float(), f))
    for h in hooks:
        h.remove()
    return {key: torch.cat(v) for key, v in res.items()}


def main(specs: list[str]) -> None:
    xtr, ytr = images("train")
    xte, yte = images("test")
    flat = lambda x: normalize(x, MEAN, STD).flatten(1).float()  # noqa: E731
    report("raw pixels", flat(xtr), flat(xte), ytr, yte)
    for spec in specs:
        path, which = spec.rsplit(":", 1)
        enc = load_source(path, which).encoder.eval()
        ftr, fte = block_features(enc, xtr), block_features(enc, xte)
        for (block, f), train in ftr.items():
            report(f"{which} block {block} {f}", train, fte[(block, f)], ytr, yte)


if __name__ == "__main__":
    main(sys.argv[1:])
