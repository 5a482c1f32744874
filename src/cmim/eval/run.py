"""One entry point per protocol: open the encoder, run, write the JSON result, print one summary line.

Every result file has the same shape: ``protocol``, ``top1``, ``top5``, ``features`` (which encoder, pooled
feature, init, sample counts), ``checkpoint`` (path, sha256, method), ``dataset``, protocol ``details``,
the full resolved ``config`` and timing, so results from different runs can be compared and tabulated.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmim.config import ConfigError, load_config
from cmim.core.distributed import resolve_device
from cmim.core.io import atomic_write_text
from cmim.core.knn import knn_accuracy
from cmim.data.stats import resolve_auto_stats
from cmim.eval.baselines import pixel_source, recipe_source
from cmim.eval.config import load_eval_config
from cmim.eval.datasets import label_subset, num_classes_of
from cmim.eval.feature_cache import SKIPPED, cached_features
from cmim.eval.linear import linear_on_features, linear_reference
from cmim.eval.loading import EncoderSource, load_source, random_init_like

__all__ = ["PROTOCOLS", "default_result_path", "open_source", "run_eval", "summary_line"]

PROTOCOLS = ("knn", "linear", "finetune")


def _peek(recipe: str | os.PathLike | dict[str, Any] | None, overrides: list[str] | None, key: str,
          default: str) -> str:
    """A top-level value needed before the checkpoint is opened (the encoder to cut out)."""
    value = default
    if isinstance(recipe, dict):
        value = str(recipe.get(key, value))
    elif recipe is not None:
        from cmim.config import read_recipe

        value = str(read_recipe(Path(recipe).resolve()).get(key, value))
    for o in overrides or []:
        if o.startswith(f"{key}="):
            value = o.split("=", 1)[1]
    return value


def open_source(path: str | os.PathLike | None, recipe: str | os.PathLike | dict[str, Any] | None = None,
                overrides: list[str] | None = None, *, raw_pixels: bool = False,
                arch: str | os.PathLike | None = None) -> tuple[EncoderSource, DictConfig]:
    """The encoder (pre-trained or its random-init twin) and the resolved eval config for it.

    Baselines need no checkpoint: ``raw_pixels`` evaluates the flattened images themselves; ``arch`` (a
    pre-training recipe) builds that recipe's encoder with fresh weights (``init`` is then always random)."""
    if raw_pixels:
        # with a checkpoint, the pixels of the data it was trained on (its folder, split, size, normalization)
        base = load_source(path).data if path is not None else None
        cfg = load_eval_config(recipe, [*(overrides or []), "feature=pixels", "init=random"], base_data=base)
        resolve_auto_stats(cfg.data)
        return pixel_source(OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)), cfg  # type: ignore[arg-type]
    if path is None and arch is None:
        raise ConfigError("give a checkpoint, --arch RECIPE (fresh weights) or --raw-pixels")
    if path is None:
        # a folder recipe leaves data.root to its user (`???`): the evaluation's folder completes it
        root = [o for o in overrides or [] if o.startswith("data.root=")][-1:]
        data = OmegaConf.to_container(load_config(arch, root).data, resolve=True, enum_to_str=True)
        cfg = load_eval_config(recipe, [*(overrides or []), "init=random"], base_data=data)  # type: ignore[arg-type]
        resolve_auto_stats(cfg.data)
        return recipe_source(arch, root, seed=cfg.seed), cfg  # type: ignore[arg-type]
    src = load_source(path, _peek(recipe, overrides, "encoder", "teacher"))
    cfg = load_eval_config(recipe, overrides, base_data=src.data)
    resolve_auto_stats(cfg.data)  # data.mean/std=auto given here (a checkpoint holds the numbers)
    if cfg.init == "random":
        src = random_init_like(src, cfg.seed)
    return src, cfg


def default_result_path(src: EncoderSource, cfg: DictConfig, protocol: str) -> Path:
    """``<checkpoint dir>/eval/<protocol>-...json``; baselines without a checkpoint go to ``runs/baselines``."""
    feat = f"ft{cfg.finetune.pool}" if protocol == "finetune" else cfg.feature
    init = "" if src.init in ("pretrained", "none") else "-random"
    labels = "" if cfg.label_fraction is None else f"-labels{cfg.label_fraction:g}"
    name = f"{protocol}-{cfg.data.name}-{src.which}-{feat}{init}{labels}.json"
    if src.kind in ("pixels", "recipe"):
        stem = "pixels" if src.kind == "pixels" else Path(src.path).stem
        return Path("runs") / "baselines" / stem / name
    return Path(src.path).resolve().parent / "eval" / name


def _knn(src: EncoderSource, cfg: DictConfig) -> dict[str, Any]:
    trf, trl, c1 = cached_features(src, cfg, "train")
    trf, trl = label_subset(trf, trl, cfg)
    tef, tel, c2 = cached_features(src, cfg, "test")
    if (trl < 0).all() or (tel < 0).all():
        raise ConfigError(f"data: {cfg.data.name} has no labels; k-NN needs labeled train and test splits")
    num_classes = int(max(trl.max(), tel.max())) + 1
    per_k = {int(k): knn_accuracy(trf, trl, tef, tel, k=int(k), temperature=cfg.knn.temperature,
                                  num_classes=num_classes) for k in cfg.knn.ks}
    main = 20 if 20 in per_k else sorted(per_k)[0]
    return {"top1": per_k[main]["top1"], "top5": per_k[main]["top5"],
            "details": {"k": main, "per_k": {str(k): v for k, v in sorted(per_k.items())},
                        "temperature": cfg.knn.temperature, "num_classes": num_classes},
            "train_samples": len(trl), "test_samples": len(tel), "features_cached": c1 and c2}


def _linear(src: EncoderSource, cfg: DictConfig) -> dict[str, Any]:
    if cfg.linear.mode == "reference":
        res = linear_reference(src, cfg, num_classes_of(cfg))
        n_test = None
        cached = False
    else:
        trf, trl, c1 = cached_features(src, cfg, "train")
        trf, trl = label_subset(trf, trl, cfg)
        tef, tel, c2 = cached_features(src, cfg, "test")
        res = linear_on_features(trf, trl, tef, tel, cfg.linear, num_classes=num_classes_of(cfg),
                                 seed=cfg.seed, device=resolve_device(cfg.device, key="device"))
        res["train_samples"], n_test, cached = len(trl), len(tel), c1 and c2
    details = {k: v for k, v in res.items() if k not in ("top1", "top5", "train_samples")}
    return {"top1": res["top1"], "top5": res["top5"], "details": dict(details, mode=cfg.linear.mode),
            "train_samples": res.get("train_samples"), "test_samples": n_test, "features_cached": cached}


def _finetune(src: EncoderSource, cfg: DictConfig) -> dict[str, Any]:
    from cmim.eval.finetune import finetune

    res = finetune(src, cfg, num_classes_of(cfg))
    details = {k: v for k, v in res.items() if k not in ("top1", "top5", "train_samples")}
    return {"top1": res["top1"], "top5": res["top5"], "details": details,
            "train_samples": res["train_samples"], "test_samples": None, "features_cached": False}


def run_eval(protocol: str, src: EncoderSource, cfg: DictConfig, out: str | os.PathLike | None = None,
             write: bool = True) -> dict[str, Any]:
    """Run ``protocol`` on ``src`` with ``cfg``; write the JSON result (unless ``write=False``); return it."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    t0 = time.perf_counter()
    res = {"knn": _knn, "linear": _linear, "finetune": _finetune}[protocol](src, cfg)
    if res.get("test_samples") is None:
        from cmim.eval.datasets import eval_dataset

        res["test_samples"] = len(eval_dataset(cfg, "test"))  # type: ignore[arg-type]
    if protocol == "finetune":
        feature = f"fine-tuned ({cfg.finetune.pool} pooling)"
    else:
        feature = cfg.feature
    result: dict[str, Any] = {
        "protocol": protocol,
        "top1": res["top1"],
        "top5": res["top5"],
        "features": {"encoder": src.which, "feature": feature, "init": src.init,
                     "train_split": cfg.data.train_split, "test_split": cfg.data.eval_split,
                     "train_samples": res["train_samples"], "test_samples": res["test_samples"],
                     "label_fraction": cfg.label_fraction, "cached": res["features_cached"]},
        "checkpoint": src.describe(),
        "dataset": {"name": cfg.data.name, "root": cfg.data.root, "img_size": cfg.data.img_size,
                    "in_chans": cfg.data.in_chans},
        "details": res["details"],
        "skipped_images": {s: len(SKIPPED.get(s, [])) for s in (cfg.data.train_split, cfg.data.eval_split)},
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "seconds": time.perf_counter() - t0,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if write:
        path = Path(out or cfg.out or default_result_path(src, cfg, protocol))
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        result["path"] = str(path)
    return result


def summary_line(r: dict[str, Any]) -> str:
    """One line: protocol, top-1/top-5, what was evaluated, where the JSON went."""
    f, c, d = r["features"], r["checkpoint"], r["dataset"]
    extra = ""
    if r["protocol"] == "knn":
        ks = ", ".join(f"k={k} {v['top1']:.2f}" for k, v in r["details"]["per_k"].items())
        extra = f" [{ks}]"
    elif r["protocol"] == "linear":
        hist = r["details"].get("history") or [{}]
        extra = f" [{r['details']['mode']}, {hist[-1].get('epoch', '?')} epochs]"
    else:
        extra = f" [{r['details']['steps']} steps]"
    where = f" -> {r['path']}" if "path" in r else ""
    what = f"{f['feature']}" if r["protocol"] == "finetune" else f"{f['feature']} features"
    if c["kind"] == "pixels":
        what, origin = "raw pixels", "no encoder"
    else:
        origin = f"{c['path']} (sha256 {c['sha256'][:12]})"
    labels = "" if f.get("label_fraction") is None else f", {f['label_fraction']:.0%} of the labels"
    return (f"cmim eval {r['protocol']}: top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}%{extra} | "
            f"{f['encoder']} {what}, {f['init']}{labels} | "
            f"{d['name']} {f['test_split']} ({f['test_samples']}) | {origin}{where}")
