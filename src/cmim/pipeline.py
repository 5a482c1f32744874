"""``cmim pipeline``: the whole MimCo recipe in one command.

Stage 1 trains the contrastive teacher (a MoCo v3 recipe), stage 2 trains the MimCo student with stage 1's
checkpoint as its frozen teacher; then the random-init encoder, the teacher (exactly the encoder MimCo
used) and the student are compared by k-NN on frozen features, and a summary table with each stage's wall
time is printed and written to ``OUT/pipeline_summary.{json,md}``.

Both stages are ordinary ``cmim pretrain`` runs in ``OUT/teacher`` and ``OUT/student``: rerunning the same
command resumes an interrupted stage and skips a finished one. ``key=value`` overrides apply to both stages
(e.g. ``data.root=...``, ``train.device=cpu``); ``--teacher KEY=VALUE`` / ``--student KEY=VALUE`` apply to
one. The pipeline runs in one process (CPU or one GPU); launch the stages with torchrun and
``cmim pretrain`` for multi-process training.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from cmim.config import ConfigError, load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.core.distributed import cleanup, resolve_device
from cmim.core.io import atomic_write_text
from cmim.core.knn import knn_accuracy
from cmim.data.views import build_eval_dataset
from cmim.eval.datasets import evenly_spaced
from cmim.eval.extract import extract_pooled
from cmim.methods import method_specs
from cmim.models import MaskedEncoder, build_encoder

FEATURES = ("cls", "mean")


def _add_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The pipeline's options (``suppress``: no defaults, to parse options given after the overrides)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--teacher", dest="teacher_overrides", action="append", default=default([]),
                   metavar="KEY=VALUE", help="override for stage 1 only (repeatable)")
    p.add_argument("--student", dest="student_overrides", action="append", default=default([]),
                   metavar="KEY=VALUE", help="override for stage 2 only (repeatable)")
    p.add_argument("--out-dir", default=default("runs/pipeline"),
                   help="stage folders and the summary (default: runs/pipeline)")
    p.add_argument("--knn-train-subset", type=int, default=default(None),
                   help="labeled training images for the final k-NN (default: the student recipe's "
                        "monitor.train_subset; 0 = all)")
    p.add_argument("--knn-test-subset", type=int, default=default(None),
                   help="test images for the final k-NN (default: monitor.test_subset; 0 = all)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pipeline", help="MoCo v3 teacher -> MimCo student -> k-NN of random init, teacher and student",
        description="Train a contrastive teacher (stage 1), a MimCo student with it (stage 2), and compare "
                    "k-NN accuracy. Example: `cmim pipeline configs/mocov3_fmnist_cpu.yaml "
                    "configs/mimco_fmnist_cpu.yaml --out-dir runs/pipeline_fmnist`.")
    p.add_argument("teacher_config", help="stage-1 recipe (e.g. configs/mocov3_fmnist_cpu.yaml)")
    p.add_argument("student_config",
                   help="stage-2 recipe with method=mimco (the pipeline sets mimco.teacher)")
    _add_options(p)
    # REMAINDER (parsed again in `run`) lets options follow the overrides: the top-level parser is not
    # an intermixed one.
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="overrides applied to both stages (options may come before or after them)")
    p.set_defaults(func=run)


def parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Split ``args.overrides`` (everything after the two recipes) into key=value overrides and options."""
    sp = argparse.ArgumentParser(prog="cmim pipeline")
    _add_options(sp, suppress=True)
    sp.add_argument("overrides", nargs="*")
    rest = sp.parse_intermixed_args(list(args.overrides))
    for key, value in vars(rest).items():
        if key in ("teacher_overrides", "student_overrides"):
            value = [*getattr(args, key), *value]
        setattr(args, key, value)
    return args


# --- configs ------------------------------------------------------------------------------------------------
def load_stage_configs(args: argparse.Namespace) -> tuple[DictConfig, DictConfig, Path]:
    """Validate both recipes before any work; returns (teacher cfg, student cfg, teacher checkpoint path)."""
    out = Path(args.out_dir)
    teacher_ckpt = out / "teacher" / CHECKPOINT_FILE
    # the pipeline measures the random-init encoder itself: the stages skip their own at-start k-NN
    first = ["monitor.at_start=false"]
    cfg1 = load_config(args.teacher_config, [*first, *args.overrides, *args.teacher_overrides,
                                             f"train.out_dir={out / 'teacher'}"])
    # mimco.teacher must name an existing file at validation time; stage 1 writes the real one later.
    placeholder = teacher_ckpt if teacher_ckpt.is_file() else Path(args.teacher_config)
    cfg2 = load_config(args.student_config, [*first, *args.overrides, *args.student_overrides,
                                             f"train.out_dir={out / 'student'}",
                                             f"mimco.teacher={placeholder}"])
    if cfg2.method != "mimco":
        raise ConfigError(f"{args.student_config}: the student recipe must use method=mimco, "
                          f"not {cfg2.method}")
    grid1 = cfg1.data.img_size // cfg1.model.patch_size
    grid2 = cfg2.data.img_size // cfg2.model.patch_size
    if grid1 != grid2 or cfg1.data.in_chans != cfg2.data.in_chans:
        raise ConfigError(f"teacher and student do not fit: {grid1}x{grid1} patches of "
                          f"{cfg1.data.in_chans}-channel images vs {grid2}x{grid2} of "
                          f"{cfg2.data.in_chans}-channel (data.img_size, model.patch_size, data.in_chans)")
    targets = {cfg2.mimco.target, cfg2.mimco.patch_target or cfg2.mimco.target}
    with_projector = [name for name, spec in method_specs().items() if spec.has_projector]
    if "projector" in targets and cfg1.method not in with_projector:
        raise ConfigError(f"mimco.target=projector needs a teacher with a projector "
                          f"({', '.join(with_projector)}), stage 1 is {cfg1.method}: "
                          "set mimco.target=backbone")
    if cfg2.mimco.teacher_format not in ("auto", "cmim"):
        raise ConfigError("mimco.teacher_format: the pipeline's teacher is a cmim checkpoint "
                          "(use auto or cmim)")
    return cfg1, cfg2, teacher_ckpt


# --- k-NN ---------------------------------------------------------------------------------------------------
def knn_eval(encoder: MaskedEncoder, sets: tuple[Dataset, Dataset], cfg: DictConfig,
             device: torch.device) -> dict[str, float]:
    """k-NN top-1 (percent) with CLS and with mean-pooled features, monitor.k / monitor.temperature."""
    encoder = encoder.to(device)
    kw = dict(mean=cfg.data.mean, std=cfg.data.std, device=device, batch_size=cfg.monitor.batch_size,
              precision=cfg.train.precision)
    train_f, train_y = extract_pooled(encoder, sets[0], FEATURES, **kw)
    test_f, test_y = extract_pooled(encoder, sets[1], FEATURES, **kw)
    return {f: knn_accuracy(train_f[f], train_y, test_f[f], test_y, k=cfg.monitor.k,
                            temperature=cfg.monitor.temperature)["top1"] for f in FEATURES}


def _subset(n: int | None, default: int | None) -> int | None:
    n = default if n is None else n
    return None if not n else n


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


# --- the command --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from cmim.data.stats import resolve_auto_stats
    from cmim.engine.trainer import Trainer  # heavy import, only when the command runs
    from cmim.eval.health import HealthMonitor
    from cmim.eval.monitor import KnnMonitor
    from cmim.train import print_pretrain_summary

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("cmim pipeline runs in one process; for multi-process training run each stage with "
                          "`torchrun ... -m cmim.cli pretrain`")
    args = parse_rest(args)
    cfg1, cfg2, teacher_ckpt = load_stage_configs(args)
    out = Path(args.out_dir)
    device = resolve_device(cfg2.train.device)
    for c in (cfg1, cfg2):  # data.mean/std=auto: the numbers before the random-init k-NN uses them
        resolve_auto_stats(c.data)
    mon = cfg2.monitor
    sets = (evenly_spaced(build_eval_dataset(cfg2.data, cfg2.data.train_split),
                          _subset(args.knn_train_subset, mon.train_subset)),
            evenly_spaced(build_eval_dataset(cfg2.data, cfg2.data.eval_split),
                          _subset(args.knn_test_subset, mon.test_subset)))
    times: dict[str, float] = {}
    knn: dict[str, dict[str, float]] = {}

    print(f"cmim pipeline: [0/3] k-NN of the random-init encoder ({len(sets[0])} train / "
          f"{len(sets[1])} test images)", flush=True)
    t = time.perf_counter()
    torch.manual_seed(cfg2.train.seed)  # the student's initial weights, as stage 2's Trainer draws them
    init = build_encoder(cfg2.model, cfg2.data.img_size, cfg2.data.in_chans)
    knn["random init"] = knn_eval(init, sets, cfg2, device)
    times["k-NN random init"] = time.perf_counter() - t

    print(f"cmim pipeline: [1/3] stage 1, {cfg1.method} teacher -> {out / 'teacher'}", flush=True)
    t = time.perf_counter()
    summary1 = Trainer(cfg1, callbacks=[KnnMonitor(cfg1), HealthMonitor(cfg1)]).train()
    cleanup()
    print_pretrain_summary(summary1)
    times[f"stage 1 ({cfg1.method}, {cfg1.train.epochs} ep)"] = time.perf_counter() - t

    print(f"cmim pipeline: [2/3] stage 2, mimco student -> {out / 'student'}", flush=True)
    cfg2.mimco.teacher = str(teacher_ckpt)
    t = time.perf_counter()
    trainer2 = Trainer(cfg2, callbacks=[KnnMonitor(cfg2), HealthMonitor(cfg2)])
    summary2 = trainer2.train()
    cleanup()
    print_pretrain_summary(summary2)
    times[f"stage 2 (mimco, {cfg2.train.epochs} ep)"] = time.perf_counter() - t

    print("cmim pipeline: [3/3] k-NN of the teacher and the student", flush=True)
    t = time.perf_counter()
    method = trainer2.method
    knn[f"{cfg1.method} teacher"] = knn_eval(method.encoder("contrastive_teacher"), sets, cfg2, device)
    knn["mimco student"] = knn_eval(method.encoder("student"), sets, cfg2, device)
    times["k-NN teacher + student"] = time.perf_counter() - t
    times["total"] = sum(times.values())

    result = {
        "knn_top1": knn, "seconds": times, "k": mon.k, "knn_train_images": len(sets[0]),
        "knn_test_images": len(sets[1]), "dataset": cfg2.data.name,
        "teacher": {"config": str(args.teacher_config), "checkpoint": summary1["checkpoint"],
                    "steps": summary1["steps"], "source": method.contrastive_teacher.source},
        "student": {"config": str(args.student_config), "checkpoint": summary2["checkpoint"],
                    "steps": summary2["steps"]},
    }
    table = summary_table(result)
    print(table, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline_summary.json", json.dumps(result, indent=2))
    atomic_write_text(out / "pipeline_summary.md", table + "\n")
    return 0


def summary_table(result: dict[str, Any]) -> str:
    """Markdown tables: k-NN top-1 per encoder and feature, then the wall time of each stage."""
    lines = [f"k-NN top-1 on {result['dataset']} (k={result['k']}, {result['knn_train_images']} train / "
             f"{result['knn_test_images']} test images)", "",
             "| encoder | CLS token | mean of patch tokens |", "|---|---:|---:|"]
    for name, acc in result["knn_top1"].items():
        lines.append(f"| {name} | {acc['cls']:.2f}% | {acc['mean']:.2f}% |")
    lines += ["", "| stage | wall time |", "|---|---:|"]
    lines += [f"| {name} | {_fmt_time(s)} |" for name, s in result["seconds"].items()]
    return "\n".join(lines)
