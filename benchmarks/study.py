"""Study on Fashion-MNIST: does self-supervised pre-training pay off at CPU scale, and do the papers' claims hold?

Pre-training rows (PRETRAIN below): ConMIM, MoCo v3, MimCo (student of that seed's MoCo v3 teacher) and SimMIM,
each with its own <= 30-minute CPU recipe; with --ablations also ConMIM with both views weak and ConMIM
without EMA. Evaluation rows (EVAL): those encoders, plus three baselines that need no pre-training: raw pixels,
random init and supervised from scratch. Metrics (METRICS), all on the full 60k / 10k split: k-NN (k=20),
linear probe, linear probe on 1% of the labels, fine-tune on all labels (3 epochs), and fine-tunes on 1% and 10%
of the labels at an equal optimizer-step budget (FT_LOW_STEPS) for the pre-trained rows and from scratch.
Claims (CLAIMS) are judged per metric with a two-standard-error rule over seeds.

    python benchmarks/study.py                      # full study, seeds 0 1 2 -> benchmarks/RESULTS.md,
                                                    #   benchmarks/results.json, benchmarks/study.png
    python benchmarks/study.py --ablations          # also the two ConMIM ablation rows (and their claims)
    python benchmarks/study.py --rows ConMIM "raw pixels"   # only these rows this sitting (MimCo brings its
                                                    #   MoCo v3 teacher's pre-training); the rest stays in --work
    python benchmarks/study.py --rows               # run nothing: rewrite the outputs from what --work holds
    python benchmarks/study.py --quick              # smoke run: the *_fmnist_cpu recipes on 2000 images, small
                                                    #   eval subsets, one seed; outputs in /tmp/cmim_study_quick
    nohup python benchmarks/study.py > /tmp/study.out 2>&1 &      # the way to run the full study (hours)

Budget: every pre-training row costs up to 30 min per seed (MimCo: its own run plus its MoCo v3 teacher's), so the
four main rows over 3 seeds are up to about 6 h of pre-training on 2 cores, plus the evaluations (each encoder: one
feature extraction of 70k images, the probes, three fine-tunes).

Resuming: runs land in --work (default benchmarks/study_runs, ignored by git: checkpoints, logs, cached features).
A pre-training run that finished is reused; one that was interrupted is continued exactly (`cmim pretrain`
resumes from its last checkpoint, train.resume=auto). What the tables are made of lands in --records (default
benchmarks/study_records, committed, a few KB): each (seed, eval row, metric) result is its own JSON file, reused
while the weights, the recipe and the overrides that made it are unchanged; each finished pre-training run leaves
a record of its checkpoint's sha256, a fingerprint of its config and its training time. So a sitting whose --work
was lost loses no result: a row whose results are all recorded is not pre-trained again, unless a row that
depends on it (MimCo on its MoCo v3 teacher) has to be, in which case both are re-run and re-evaluated (the new
checkpoint has another sha256). Re-invoke the same command after an interruption. A run directory made with a
different pre-training config stops the study with one line rather than being mixed in or overwritten. Every
step is logged with a timestamp to <work>/study.log and stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BENCH = REPO / "benchmarks"

# ---------------------------------------------------------------------------------------------------------------
# The design. Edit these tables; nothing below needs to change with them.
# ---------------------------------------------------------------------------------------------------------------

# pre-training row -> (recipe under configs/, extra overrides, the row whose checkpoint it needs or None).
# A row with a dependency gets `mimco.teacher=<that seed's checkpoint of the dependency>`.
PRETRAIN: dict[str, tuple[str, list[str], str | None]] = {
    "ConMIM": ("conmim_fmnist_30min.yaml", [], None),
    "MoCo v3": ("mocov3_fmnist_30min.yaml", [], None),
    "MimCo": ("mimco_fmnist_30min.yaml", [], "MoCo v3"),
    "SimMIM": ("conmim_fmnist_30min.yaml", ["method=simmim"], None),
}
# with --ablations
ABLATIONS: dict[str, tuple[str, list[str], str | None]] = {
    "ConMIM, both views weak": ("conmim_fmnist_30min.yaml", ["conmim.teacher_view=none"], None),
    "ConMIM, no EMA": ("conmim_fmnist_30min.yaml", ["conmim.momentum=0", "conmim.momentum_final=0"], None),
}
# --quick: the recipe each study recipe stands in for, and the tiny budget
QUICK_RECIPES: dict[str, str] = {
    "conmim_fmnist_30min.yaml": "conmim_fmnist_cpu.yaml",
    "mocov3_fmnist_30min.yaml": "mocov3_fmnist_cpu.yaml",
    "mimco_fmnist_30min.yaml": "mimco_fmnist_cpu.yaml",
}
QUICK_PRETRAIN: list[str] = ["data.subset=2000", "train.epochs=1"]
# config keys that are not part of what a pre-training run learns: logging, resuming, loader workers, the host
# allocator; and BatchNorm sync across processes, which does nothing in the study's one-process runs
RUN_IGNORE = ("monitor.", "train.progress", "train.tensorboard", "train.resume", "data.num_workers", "train.sync_bn",
              "train.keep_freed_memory")
# ... and the paths, which differ between machines and work dirs (the teacher is identified by its sha256)
RUN_PATHS = ("train.out_dir", "data.root", "mimco.teacher")
# every pre-training run of the study (beside train.seed, train.out_dir, data.root): the study evaluates the
# encoders itself, so the online k-NN monitor is off (it does not change training, only the wall time)
PRETRAIN_COMMON: list[str] = ["monitor.every_epochs=0", "train.progress=false", "train.tensorboard=false"]

# the pooled feature each row is probed on (k-NN, linear): mean | cls | gridG (e.g. grid2). One for every row,
# so rows compare like for like: grid4 = the whole 4x4 patch-token map (16 x 192 values), which keeps the layout
# a global mean discards. Chosen on a validation split of the training set (k-NN, train[:50k] -> train[50k:]),
# seed 0's ConMIM teacher and MimCo student, over mean / cls / grid2 / grid3 / grid4 of the last block: grid4 was
# best for both (benchmarks/study_notes.md); the test split played no part.
FEATURE: dict[str, str] = {
    "ConMIM": "grid4",
    "SimMIM": "grid4",
    "MoCo v3": "grid4",
    "MimCo": "grid4",
    "ConMIM, both views weak": "grid4",
    "ConMIM, no EMA": "grid4",
}

# eval row -> (pre-training row or None, encoder, feature, kind). kind: "pretrained" (that row's checkpoint),
# "random" (that row's recipe architecture with fresh weights), "scratch" (the same, fine-tuned with labels:
# supervised from scratch), "pixels" (no encoder: the normalized, flattened images).
EVAL: dict[str, tuple[str | None, str | None, str | None, str]] = {
    "raw pixels": (None, None, None, "pixels"),
    "random init": ("ConMIM", "teacher", FEATURE["ConMIM"], "random"),
    "supervised from scratch": ("ConMIM", None, None, "scratch"),
    "ConMIM": ("ConMIM", "teacher", FEATURE["ConMIM"], "pretrained"),
    "MoCo v3": ("MoCo v3", "teacher", FEATURE["MoCo v3"], "pretrained"),
    "MimCo": ("MimCo", "student", FEATURE["MimCo"], "pretrained"),
    "SimMIM": ("SimMIM", "student", FEATURE["SimMIM"], "pretrained"),
}
EVAL_ABLATIONS: dict[str, tuple[str | None, str | None, str | None, str]] = {
    "ConMIM, both views weak": ("ConMIM, both views weak", "teacher", FEATURE["ConMIM, both views weak"],
                                "pretrained"),
    "ConMIM, no EMA": ("ConMIM, no EMA", "teacher", FEATURE["ConMIM, no EMA"], "pretrained"),
}

# optimizer steps of the 1% and 10% label fine-tunes, the same for the pre-trained rows and from scratch
FT_LOW_STEPS = 500
# metric -> (protocol, eval recipe under configs/, overrides). All on the full split (data.subset=null, no
# train_subset / test_subset); the linear probes read the k-NN's cached features.
METRICS: dict[str, tuple[str, str, list[str]]] = {
    "knn": ("knn", "eval_fmnist_cpu.yaml", []),
    "linear": ("linear", "eval_fmnist_cpu.yaml", []),
    "linear_1pct": ("linear", "eval_fmnist_cpu.yaml", ["label_fraction=0.01"]),
    "finetune": ("finetune", "finetune_fmnist_cpu.yaml", []),
    "finetune_1pct": ("finetune", "finetune_fmnist_cpu.yaml",
                      ["label_fraction=0.01", f"finetune.steps={FT_LOW_STEPS}"]),
    "finetune_10pct": ("finetune", "finetune_fmnist_cpu.yaml",
                       ["label_fraction=0.1", f"finetune.steps={FT_LOW_STEPS}"]),
}
# which metrics each kind of row gets (random init gets no fine-tune: that is "supervised from scratch")
KIND_METRICS: dict[str, list[str]] = {
    "pixels": ["knn", "linear", "linear_1pct"],
    "random": ["knn", "linear", "linear_1pct"],
    "scratch": ["finetune", "finetune_1pct", "finetune_10pct"],
    "pretrained": list(METRICS),
}
# every fine-tune: the test split is scored once, at the end (the 1%-label runs cycle their 600 images for
# 125 short epochs and would otherwise be tested after each); the final number is the same
FT_COMMON: list[str] = ["finetune.eval_every_epochs=0"]
# from scratch: layer decay only protects pre-trained layers
SCRATCH: list[str] = ["finetune.layer_decay=1.0"]
# --quick: small eval subsets and a few fine-tune steps, so the smoke run stays at a few minutes on 2 cores
QUICK_EVAL: list[str] = ["train_subset=2000", "test_subset=1000", "linear.epochs=20"]
QUICK_FT: list[str] = ["finetune.max_steps=20"]

LABEL = {"knn": "k-NN (k=20)", "linear": "linear", "linear_1pct": "linear, 1% labels", "finetune": "fine-tune",
         "finetune_1pct": "fine-tune, 1% labels", "finetune_10pct": "fine-tune, 10% labels"}

# (claim, source, row a, row b, metrics, margin): "a beats b by more than margin points" on each metric.
# A claim whose rows have no data (e.g. ablations not run) is left out.
CLAIMS: list[tuple[str, str, str, str, list[str], float]] = [
    ("ConMIM beats raw pixels", "issue #10", "ConMIM", "raw pixels", ["knn", "linear"], 0.0),
    ("ConMIM beats supervised from scratch", "issue #10", "ConMIM", "supervised from scratch",
     ["finetune", "finetune_1pct", "finetune_10pct"], 0.0),
    ("ConMIM beats supervised from scratch by > 5 points with 1% of the labels", "issue #10", "ConMIM",
     "supervised from scratch", ["finetune_1pct"], 5.0),
    ("MimCo beats raw pixels", "issue #10", "MimCo", "raw pixels", ["knn", "linear"], 0.0),
    ("MimCo beats supervised from scratch", "issue #10", "MimCo", "supervised from scratch",
     ["finetune", "finetune_1pct", "finetune_10pct"], 0.0),
    ("MimCo beats supervised from scratch by > 5 points with 1% of the labels", "issue #10", "MimCo",
     "supervised from scratch", ["finetune_1pct"], 5.0),
    ("ConMIM beats pixel MIM (SimMIM)", "ConMIM Tab. 1", "ConMIM", "SimMIM", ["knn", "linear", "finetune"], 0.0),
    ("MimCo's student is more linearly separable than SimMIM's", "MimCo", "MimCo", "SimMIM", ["linear"], 0.0),
    ("MimCo's student ends above its MoCo v3 teacher", "MimCo", "MimCo", "MoCo v3", ["knn", "linear", "finetune"],
     0.0),
    ("The strong teacher view helps", "ConMIM ablation", "ConMIM", "ConMIM, both views weak",
     ["knn", "linear", "finetune"], 0.0),
    ("The slowly progressing (EMA) teacher helps", "ConMIM ablation", "ConMIM", "ConMIM, no EMA",
     ["knn", "linear", "finetune"], 0.0),
]
# "pre-training beats random init" (knn, linear) is added for every main row that random init is a fair
# baseline of: the same recipe architecture and the same probed feature (see random_init_claims)

# ---------------------------------------------------------------------------------------------------------------


class StudyError(Exception):
    """A problem the study reports in one line and stops on."""


def slug(name: str) -> str:
    return name.lower().replace(", ", "-").replace(" ", "-")


def rel(p: Path | str) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


@functools.cache
def fmnist_root() -> str:
    r = subprocess.run(["bash", str(REPO / "scripts" / "get_fashion_mnist.sh")], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise StudyError("Fashion-MNIST not found: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return r.stdout.strip().splitlines()[-1]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


@functools.cache
def parsed_recipe(path: Path) -> str:
    """The recipe's content (comments and layout ignored, ``_base_`` followed) as canonical JSON."""
    from cmim.config import read_recipe

    return json.dumps(read_recipe(path.resolve()), sort_keys=True, default=str)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.seeds: list[int] = args.seeds or ([0] if self.quick else [0, 1, 2])
        self.work: Path = (args.work or (Path("/tmp/cmim_study_quick") if self.quick
                                         else BENCH / "study_runs")).resolve()
        self.records: Path = (args.records or (self.work / "records" if self.quick else BENCH / "study_records")
                              ).resolve()
        self.out_dir = self.work if self.quick else BENCH  # RESULTS.md, results.json, study.png
        self.pretrain_rows = dict(PRETRAIN, **(ABLATIONS if args.ablations else {}))
        self.all_pretrain = dict(PRETRAIN, **ABLATIONS)
        self.all_evals = dict(EVAL, **EVAL_ABLATIONS)
        self.eval_rows = dict(EVAL, **(EVAL_ABLATIONS if args.ablations else {}))
        self.args = args
        self.t_start = time.perf_counter()
        self._sha: dict[Path, str] = {}
        self._diff: dict[tuple[str, int], list[str]] = {}
        self._config_fp: dict[tuple[str, int], str] = {}
        self._warned: set[tuple[str, int]] = set()
        self.log_path = self.work / "study.log"

    # --- logging ---------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    # --- rows and recipes ------------------------------------------------------------------------------------
    def recipe(self, row: str) -> Path:
        name = self.all_pretrain[row][0]
        return CONFIGS / (QUICK_RECIPES.get(name, name) if self.quick else name)

    def select(self, names: list[str] | None) -> tuple[list[str], list[str]]:
        """(pre-training rows to run, in dependency order; eval rows to compute) for --rows."""
        if names is None:
            evals = list(self.eval_rows)
            pre = {self.eval_rows[e][0] for e in evals if self.eval_rows[e][3] == "pretrained"}
        else:
            known = {n.lower(): n for n in [*self.all_pretrain, *self.all_evals]}
            bad = [n for n in names if n.lower() not in known]
            if bad:
                raise StudyError(f"--rows: unknown row {bad[0]!r}; rows: " + ", ".join(repr(k) for k in
                                 dict.fromkeys([*self.all_pretrain, *self.all_evals])))
            chosen = [known[n.lower()] for n in names]
            evals = [e for e in self.all_evals if e in chosen]
            pre = {e for e in chosen if e in self.all_pretrain}
            pre |= {self.all_evals[e][0] for e in evals if self.all_evals[e][3] == "pretrained"}
            # a chosen pre-training row is evaluated as its eval rows
            evals += [e for e, v in self.all_evals.items() if v[3] == "pretrained" and v[0] in pre and e not in evals]
        order: list[str] = []

        def visit(r: str) -> None:
            dep = self.all_pretrain[r][2]
            if dep is not None and dep not in order:
                visit(dep)
            if r not in order:
                order.append(r)

        for r in self.all_pretrain:
            if r in pre:
                visit(r)
        return order, [e for e in self.all_evals if e in evals]

    def check_recipes(self, pre: list[str], evals: list[str]) -> None:
        need: dict[Path, list[str]] = {}
        for r in pre:
            need.setdefault(self.recipe(r), []).append(r)
        for e in evals:
            source, _, _, kind = self.all_evals[e]
            if kind in ("random", "scratch"):
                assert source is not None
                need.setdefault(self.recipe(source), []).append(e)
                model_ov = [o for o in self.all_pretrain[source][1] if o.startswith("model.")]
                if model_ov:
                    raise StudyError(f"row {e!r} takes the architecture of {rel(self.recipe(source))}, but row "
                                     f"{source!r} changes it with {model_ov[0]}: put it into the recipe file")
            for m in KIND_METRICS[kind]:
                need.setdefault(CONFIGS / METRICS[m][1], []).append(e)
        missing = [f"{rel(p)} (for {', '.join(dict.fromkeys(rows))})" for p, rows in need.items() if not p.is_file()]
        if missing:
            raise StudyError(f"missing recipe{'s' if len(missing) > 1 else ''}: " + "; ".join(missing)
                             + ("" if self.quick else " -- add it first (--quick uses the CPU recipes)"))

    # --- pre-training ----------------------------------------------------------------------------------------
    def run_dir(self, row: str, seed: int | str) -> Path:
        return self.work / f"seed{seed}" / slug(row)

    def pretrain_overrides(self, row: str, seed: int | str) -> list[str]:
        _, extra, dep = self.all_pretrain[row]
        ov = [f"train.seed={seed}", f"train.out_dir={self.run_dir(row, seed)}", f"data.root={fmnist_root()}",
              *PRETRAIN_COMMON, *(QUICK_PRETRAIN if self.quick else []), *extra]
        if dep is not None:
            ov.append(f"mimco.teacher={self.run_dir(dep, seed) / 'checkpoint.pt'}")
        return ov

    def config_diff(self, row: str, seed: int) -> list[str]:
        """Keys where the run directory's config.yaml differs from what the study would run now."""
        if (row, seed) not in self._diff:
            self._diff[(row, seed)] = self._config_diff(row, seed)
        return self._diff[(row, seed)]

    def _config_diff(self, row: str, seed: int) -> list[str]:
        from omegaconf import OmegaConf

        from cmim.config import load_config

        stored = self.run_dir(row, seed) / "config.yaml"
        if not stored.is_file():
            return []
        want = flatten(OmegaConf.to_container(load_config(self.recipe(row), self.pretrain_overrides(row, seed)),
                                              resolve=True))
        have = flatten(OmegaConf.to_container(OmegaConf.load(stored)))
        return [f"{k}: {have[k]!r} -> {want[k]!r}" for k in sorted(set(want) & set(have))
                if not k.startswith(RUN_IGNORE) and have[k] != want[k]]

    def config_fingerprint(self, row: str, seed: int | str) -> str:
        """What a pre-training run learns from, wherever it runs: its resolved config less RUN_IGNORE and RUN_PATHS."""
        if (row, seed) not in self._config_fp:
            from omegaconf import OmegaConf

            from cmim.config import Config, merge_config

            # not validated: MimCo's teacher file need not exist (its weights are named by the record's sha256)
            cfg = flatten(OmegaConf.to_container(merge_config(Config, [], self.recipe(row),
                                                              self.pretrain_overrides(row, seed), lambda c: None),
                                                 resolve=True))
            kept = {k: v for k, v in cfg.items() if not k.startswith(RUN_IGNORE) and k not in RUN_PATHS}
            self._config_fp[(row, seed)] = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str)
                                                          .encode()).hexdigest()
        return self._config_fp[(row, seed)]

    def has_checkpoint(self, row: str, seed: int) -> bool:
        """A finished run of the config the study would run now is in --work."""
        return self.finished(row, seed) is not None and not self.config_diff(row, seed)

    def record_path(self, row: str, seed: int | str) -> Path:
        return self.records / f"seed{seed}" / "pretrain" / f"{slug(row)}.json"

    def record(self, row: str, seed: int) -> dict[str, Any] | None:
        """The committed record of the row's pre-training run, if it was made with the config the study would run
        now (and, for MimCo, from the teacher whose weights are current)."""
        rec = read_json(self.record_path(row, seed))
        if not rec or rec.get("config_fingerprint") != self.config_fingerprint(row, seed):
            return None
        dep = self.all_pretrain[row][2]
        if dep is not None and rec.get("teacher_sha256") != self.weights(dep, seed):
            return None
        return rec

    def weights(self, row: str, seed: int) -> str | None:
        """The sha256 of the row's pre-trained weights for this seed: of the checkpoint in --work when it is there
        (its record is written or renewed from it), else of the recorded run; None when there is neither."""
        if self.has_checkpoint(row, seed):
            self.write_record(row, seed)
            return self.checkpoint_sha(row, seed)
        rec = self.record(row, seed)
        return rec["checkpoint_sha256"] if rec else None

    def write_record(self, row: str, seed: int) -> None:
        sha, fp = self.checkpoint_sha(row, seed), self.config_fingerprint(row, seed)
        path = self.record_path(row, seed)
        old = read_json(path)
        if old and old.get("checkpoint_sha256") == sha and old.get("config_fingerprint") == fp:
            return
        dep = self.all_pretrain[row][2]
        s = self.finished(row, seed)
        assert s is not None
        t = self.pretrain_time(row, seed)
        write_json(path, {"row": row, "seed": seed, "checkpoint_sha256": sha,
                          "teacher_sha256": self.weights(dep, seed) if dep else None, "config_fingerprint": fp,
                          "steps": s["steps"], "seconds": t["seconds"], "img_per_s": t["img_per_s"],
                          "timing": t["source"], "machine": machine(), "command": self.pretrain_command(row, seed)})

    def pretrain_command(self, row: str, seed: int | str) -> str:
        """The row's `cmim pretrain` command as RESULTS.md and the records print it."""
        return show(f"cmim pretrain {rel(self.recipe(row))} " + " ".join(self.pretrain_overrides(row, seed)))

    def metrics_of(self, name: str) -> list[str]:
        return KIND_METRICS[self.all_evals[name][3]]

    def complete(self, row: str, seed: int) -> bool:
        """Every evaluation of the row's encoders for this seed is recorded (so its checkpoint is not needed)."""
        return all(self.cached(e, m, seed) for e, (src, _, _, kind) in self.eval_rows.items()
                   if kind == "pretrained" and src == row for m in self.metrics_of(e))

    def needs_run(self, row: str, seed: int, rows: list[str]) -> bool:
        """Whether this sitting needs the row's checkpoint in --work: it has no recorded run, some of its results
        are missing, or a row of this sitting that depends on it has to be pre-trained."""
        if self.weights(row, seed) is None or not self.complete(row, seed):
            return True
        return any(self.all_pretrain[d][2] == row and not self.has_checkpoint(d, seed) and self.needs_run(d, seed, rows)
                   for d in rows)

    def finished(self, row: str, seed: int) -> dict[str, Any] | None:
        out = self.run_dir(row, seed)
        s = read_json(out / "summary.json")
        if s and s.get("steps") == s.get("total_steps") and (out / "checkpoint.pt").is_file():
            return s
        return None

    def pretrain(self, row: str, seed: int) -> None:
        out = self.run_dir(row, seed)
        diff = self.config_diff(row, seed)
        if diff:
            raise StudyError(f"seed {seed} {row}: {rel(out)} was pre-trained with another config ({diff[0]}"
                             f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); move it away or use "
                             f"another --work")
        if self.finished(row, seed):
            self.log(f"seed {seed} {row}: pre-training finished earlier, reused ({rel(out)})")
            self.weights(row, seed)  # its record
            return
        cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(self.recipe(row)), *self.pretrain_overrides(row, seed)]
        out.mkdir(parents=True, exist_ok=True)
        resumed = (out / "checkpoint.pt").is_file()
        self.log(f"seed {seed} {row}: pre-training{' (resuming)' if resumed else ''}; log {rel(out / 'pretrain.log')}")
        self.log("$ " + " ".join(cmd))
        t0 = time.perf_counter()
        self._diff.pop((row, seed), None)  # the run writes its config.yaml
        with open(out / "pretrain.log", "a") as logf:
            logf.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
            pidfile = self.work / "pretrain.pid"
            pidfile.write_text(f"{proc.pid} {out}\n")
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM: stop the run too (it resumes from its last checkpoint)
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                pidfile.unlink(missing_ok=True)
        if rc != 0:
            tail = (out / "pretrain.log").read_text().strip().splitlines()[-15:]
            for line in tail:
                self.log(f"  | {line}")
            raise StudyError(f"seed {seed} {row}: `cmim pretrain` failed (exit {rc}); see {rel(out / 'pretrain.log')}")
        s = self.finished(row, seed)
        if s is None:
            raise StudyError(f"seed {seed} {row}: pre-training ended without finishing its steps; see "
                             f"{rel(out / 'pretrain.log')}")
        self._sha.pop((out / "checkpoint.pt").resolve(), None)
        self.weights(row, seed)  # its record
        t = self.pretrain_time(row, seed)
        self.log(f"seed {seed} {row}: pre-trained {s['steps']} steps in {t['seconds'] / 60:.1f} min of training "
                 f"({t['img_per_s']:.0f} img/s; {(time.perf_counter() - t0) / 60:.1f} min wall)")

    def pretrain_time(self, row: str, seed: int) -> dict[str, float]:
        """Training seconds and img/s of a finished run. summary.json covers the last invocation only, so a run
        that was resumed is timed from metrics.jsonl instead (each step counted once, replayed steps at their
        last timing)."""
        out = self.run_dir(row, seed)
        s = self.finished(row, seed)
        assert s is not None
        from omegaconf import OmegaConf

        bs = int(OmegaConf.load(out / "config.yaml").train.batch_size)
        secs, ips = float(s["train_seconds"]), s.get("img_per_s") or 0.0
        if secs > 0 and round(ips * secs / bs) == s["steps"]:  # one uninterrupted invocation
            return {"seconds": secs, "img_per_s": ips, "source": "summary.json"}
        by_step: dict[int, float] = {}
        for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "train" and r.get("img_per_s"):
                by_step[int(r["step"])] = float(r["img_per_s"])
        total, prev = 0.0, 0
        for step in sorted(by_step):
            total += (step - prev) * bs / by_step[step]
            prev = step
        if total <= 0:
            return {"seconds": secs, "img_per_s": ips, "source": "summary.json"}
        return {"seconds": total, "img_per_s": prev * bs / total, "source": "metrics.jsonl"}

    def checkpoint_sha(self, row: str, seed: int) -> str:
        p = self.run_dir(row, seed) / "checkpoint.pt"
        key = p.resolve()
        if key not in self._sha:
            self._sha[key] = sha256_file(p)
        return self._sha[key]

    # --- evaluation ------------------------------------------------------------------------------------------
    def eval_spec(self, name: str, metric: str, seed: int | str) -> dict[str, Any]:
        """What computes one (row, metric, seed): protocol, recipe, overrides and source arguments."""
        source, encoder, feature, kind = self.all_evals[name]
        protocol, recipe, extra = METRICS[metric]
        ov = [f"seed={seed}", f"data.root={fmnist_root()}", "data.subset=null"]
        if kind == "pretrained":
            ov.append(f"encoder={encoder}")
        if protocol != "finetune" and feature is not None:
            ov.append(f"feature={feature}")
        ov += extra
        if protocol == "finetune":
            ov += FT_COMMON + (SCRATCH if kind == "scratch" else [])
        if self.quick:
            ov += QUICK_EVAL + (QUICK_FT if protocol == "finetune" else [])
        spec: dict[str, Any] = {"protocol": protocol, "recipe": CONFIGS / recipe, "overrides": ov, "kind": kind,
                                "path": None, "arch": None, "raw_pixels": kind == "pixels"}
        if kind == "pretrained":
            spec["path"] = self.run_dir(source, seed) / "checkpoint.pt"  # type: ignore[arg-type]
        elif kind in ("random", "scratch"):
            spec["arch"] = self.recipe(source)  # type: ignore[arg-type]
        return spec

    def command(self, spec: dict[str, Any]) -> str:
        what = ("--raw-pixels" if spec["raw_pixels"] else f"--arch {rel(spec['arch'])}" if spec["arch"]
                else rel(spec["path"]))
        return f"cmim eval {spec['protocol']} {what} -c {rel(spec['recipe'])} {' '.join(spec['overrides'])}"

    def fingerprint(self, name: str, spec: dict[str, Any], seed: int) -> str | None:
        """Identifies what a result was computed from; None when its checkpoint is not ready."""
        source = self.all_evals[name][0]
        if spec["kind"] == "pretrained":
            assert source is not None
            weights = self.weights(source, seed)
            if weights is None:
                return None
        elif spec["arch"] is not None:  # fresh weights: only the architecture and data sections matter
            recipe = json.loads(parsed_recipe(spec["arch"]))
            weights = json.dumps({k: recipe.get(k) for k in ("model", "data")}, sort_keys=True)
        else:
            weights = "pixels"
        blob = json.dumps({"protocol": spec["protocol"], "recipe": parsed_recipe(spec["recipe"]),
                           "overrides": spec["overrides"], "kind": spec["kind"], "weights": weights})
        return hashlib.sha256(blob.encode()).hexdigest()

    def result_path(self, name: str, metric: str, seed: int) -> Path:
        return self.records / f"seed{seed}" / "eval" / slug(name) / f"{metric}.json"

    def cached(self, name: str, metric: str, seed: int) -> dict[str, Any] | None:
        path = self.result_path(name, metric, seed)
        # where results were kept before they were committed: moved into the records when still valid
        legacy = self.work / f"seed{seed}" / "eval" / slug(name) / f"{metric}.json"
        found = [(p, r) for p in (path, legacy) if (r := read_json(p))]
        if not found:
            return None
        fp = self.fingerprint(name, self.eval_spec(name, metric, seed), seed)
        for p, r in found:
            if fp is not None and r.get("fingerprint") == fp:
                if p != path:
                    write_json(path, r)
                return r
        return None

    def evaluate(self, name: str, seed: int) -> None:
        from cmim.eval.run import open_source, run_eval

        for metric in KIND_METRICS[self.all_evals[name][3]]:
            if self.cached(name, metric, seed):
                continue
            spec = self.eval_spec(name, metric, seed)
            fp = self.fingerprint(name, spec, seed)
            if fp is None:
                self.log(f"seed {seed} {name} {metric}: skipped, its pre-training run is not finished")
                return
            path = self.result_path(name, metric, seed)
            if path.exists():
                self.log(f"seed {seed} {name} {metric}: stored result is stale (checkpoint, recipe or overrides "
                         f"changed), recomputing")
            cmd = self.command(spec)
            self.log(f"seed {seed} {name} {metric}: $ {cmd} cache_dir={rel(self.work / 'features')}")
            t0 = time.perf_counter()
            src, cfg = open_source(spec["path"], spec["recipe"],
                                   [*spec["overrides"], f"cache_dir={self.work / 'features'}"],
                                   raw_pixels=spec["raw_pixels"], arch=spec["arch"])
            res = run_eval(spec["protocol"], src, cfg, write=False)
            secs = time.perf_counter() - t0
            write_json(path, {"row": name, "metric": metric, "seed": seed, "top1": res["top1"], "top5": res["top5"],
                              "seconds": secs, "fingerprint": fp, "command": show(cmd), "machine": machine(),
                              "result": res})
            self.log(f"seed {seed} {name} {metric}: top-1 {res['top1']:.2f}% ({secs:.0f} s)")

    # --- gathering and reporting -----------------------------------------------------------------------------
    def gather(self) -> dict[str, Any]:
        """Everything valid in --work: per eval row, metric -> [(seed, top-1)], and timings."""
        rows: dict[str, dict[str, list[tuple[int, float]]]] = {}
        eval_seconds, untimed = 0.0, 0
        machines: dict[str, set[int]] = {}  # where the results were made -> seeds
        for name, (_, _, _, kind) in self.all_evals.items():
            got: dict[str, list[tuple[int, float]]] = {}
            for seed in self.seeds:
                for metric in KIND_METRICS[kind]:
                    r = self.cached(name, metric, seed)
                    if r:
                        got.setdefault(metric, []).append((seed, float(r["top1"])))
                        eval_seconds += float(r.get("seconds") or 0.0)
                        untimed += r.get("seconds") is None
                        machines.setdefault(r.get("machine") or "machine not recorded", set()).add(seed)
            if got:
                rows[name] = got
        own: dict[str, dict[int, dict[str, float]]] = {}
        for row in self.all_pretrain:
            for seed in self.seeds:
                if self.weights(row, seed) is not None:
                    rec = self.record(row, seed)
                    assert rec is not None
                    own.setdefault(row, {})[seed] = {"seconds": float(rec["seconds"]), "img_per_s": rec["img_per_s"]}
                diff = self.finished(row, seed) and self.config_diff(row, seed)
                if diff and (row, seed) not in self._warned:
                    self._warned.add((row, seed))
                    more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
                    self.log(f"seed {seed} {row}: {rel(self.run_dir(row, seed))} was pre-trained with another config "
                             f"({diff[0]}{more}); it is not used")

        def total(row: str, seed: int) -> float | None:
            t = own.get(row, {}).get(seed)
            if t is None:
                return None
            dep = self.all_pretrain[row][2]
            if dep is None:
                return t["seconds"]
            d = total(dep, seed)
            return None if d is None else t["seconds"] + d

        minutes: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for name, (source, _, _, kind) in self.all_evals.items():
            if kind != "pretrained" or source not in own:
                continue
            m = minutes.setdefault(name, {"total": [], "own": [], "img_per_s": []})
            for seed, t in sorted(own[source].items()):
                tot = total(source, seed)
                if tot is not None:
                    m["total"].append((seed, tot / 60))
                m["own"].append((seed, t["seconds"] / 60))
                if t["img_per_s"]:  # not kept for the runs imported from an older results.json
                    m["img_per_s"].append((seed, t["img_per_s"]))
        pre_seconds = sum(t["seconds"] for r in own.values() for t in r.values())
        return {"rows": rows, "minutes": minutes, "eval_seconds": eval_seconds, "pretrain_seconds": pre_seconds,
                "untimed": untimed, "machines": machines}

    def random_init_claims(self) -> list[tuple[str, str, str, str, list[str], float]]:
        src, _, feat, _ = self.all_evals["random init"] if "random init" in self.all_evals else (None,) * 4
        out = []
        for name, (source, _, feature, kind) in EVAL.items():
            if kind != "pretrained" or source is None or src is None:
                continue
            same_arch = self.all_pretrain[source][0] == self.all_pretrain[src][0] and not any(
                o.startswith("model.") for o in self.all_pretrain[source][1])
            if same_arch and feature == feat:
                out.append((f"{name} pre-training beats random init", "sanity", name, "random init",
                            ["knn", "linear"], 0.0))
        return out

    def write_outputs(self, g: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "results.json", results_json(g, self.seeds))
        try:
            plot(g, self.all_evals, self.out_dir / "study.png", self.quick)
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the table
            self.log(f"plot not written: {type(e).__name__}: {e}")
        (self.out_dir / "RESULTS.md").write_text(self.markdown(g))
        self.log(f"wrote {rel(self.out_dir / 'RESULTS.md')}, results.json, study.png")

    def markdown(self, g: dict[str, Any]) -> str:
        rows, minutes = g["rows"], g["minutes"]
        n = len(self.seeds)
        mins = (g["pretrain_seconds"] + g["eval_seconds"]) / 60
        quick = " --quick" if self.quick else ""
        L = ["# Does self-supervised pre-training pay off at CPU scale? (Fashion-MNIST, 2 CPU cores)", ""]
        where = "; ".join(f"{m} (seed{'s' if len(sd) > 1 else ''} {', '.join(map(str, sorted(sd)))})"
                          for m, sd in sorted(g["machines"].items(), key=lambda kv: min(kv[1]))) or machine()
        untimed = (f"; {g['untimed']} results imported from an earlier results.json carry no time"
                   if g["untimed"] else "")
        L += [f"Made by `python benchmarks/study.py{quick}` on {where}, seeds {self.seeds}: {mins:.0f} min of "
              f"runs in all ({g['pretrain_seconds'] / 60:.0f} min pre-training, {g['eval_seconds'] / 60:.0f} min "
              f"evaluation{untimed}; times of the runs themselves, summed). Times and img/s are comparable only "
              f"between runs made on an otherwise idle machine. The numbers are also in "
              f"[`results.json`](results.json); each "
              f"(seed, row, metric) result and each pre-training run's record (checkpoint sha256, config "
              f"fingerprint, training time, command, machine) is a JSON file in `{rel(self.records)}`, the runs "
              f"themselves (checkpoints, logs) are in `{rel(self.work)}`.", ""]
        if self.quick:
            L += ["**This is a --quick smoke run** (CPU recipes on 2000 images for one epoch, 2000 / 1000 eval "
                  "images, 20 fine-tune steps): its numbers only show that the pipeline runs.", ""]
        L += ["## Design", ""]
        L += ["Pre-training (one run per row and seed; `train.seed` = the seed; MimCo's teacher is the MoCo v3 "
              "checkpoint of the same seed):", ""]
        for row, (_, extra, dep) in self.all_pretrain.items():
            if row in self.pretrain_rows or row in minutes:
                ex = f" `{' '.join(extra)}`" if extra else ""
                L.append(f"- **{row}**: `{rel(self.recipe(row))}`{ex}"
                         + (f", `mimco.teacher=` the {dep} checkpoint" if dep else ""))
        L += ["", "Evaluation on the test split (10k images) after training on the train split (60k), full split "
              "unless a label share is given (class-balanced, drawn with the seed, the same images for every row):",
              ""]
        for m, (proto, recipe, extra) in METRICS.items():
            L.append(f"- **{LABEL[m]}**: `cmim eval {proto} -c configs/{recipe}`"
                     + (f" `{' '.join(extra)}`" if extra else ""))
        probed = "; ".join(f"{e}: {enc} encoder, {feat} feature" for e, (_, enc, feat, kind) in self.all_evals.items()
                           if kind == "pretrained" and (e in rows or e in self.eval_rows))
        L += ["", f"Encoders and probed features (k-NN, linear; fine-tuning mean-pools the patch tokens): {probed}. "
              "Baselines: *raw pixels* = the normalized, "
              "flattened image as the feature (same protocol); *random init* = ConMIM's architecture with fresh "
              f"weights (seeded), probed on {self.all_evals['random init'][2]} features; *supervised from scratch* = "
              f"that architecture fine-tuned from fresh weights with the same fine-tune recipe and budget "
              f"(`finetune.layer_decay=1.0`). The 1% and 10% fine-tunes all take {FT_LOW_STEPS} optimizer steps. "
              f"`pretrain_minutes` is the training time of the row's run (MimCo: plus its MoCo v3 teacher's; "
              f"`pretrain_minutes_own` without it), from each run's summary (or its metrics log when it was "
              f"resumed); in results.json it is given as {{mean, std, values}} like the metrics.", ""]
        L += ["## Results (top-1 %, mean ± std over seeds)", ""]
        L += ["| row | " + " | ".join(LABEL[m] for m in METRICS) + " | pre-train min (own) | pre-train img/s |",
              "|---" * (len(METRICS) + 3) + "|"]
        for name in self.all_evals:
            if name not in rows:
                continue
            cells = []
            for m in METRICS:
                vals = [v for _, v in rows[name].get(m, [])]
                cells.append(fmt(vals) + (f" (n={len(vals)})" if 0 < len(vals) < n else ""))
            mt = minutes.get(name)
            if mt:
                tot, own = [v for _, v in mt["total"]], [v for _, v in mt["own"]]
                pm = fmt(tot, 1) + (f" ({fmt(own, 1)})" if own != tot else "")
                ips = fmt([v for _, v in mt["img_per_s"]], 0)
            else:
                pm = ips = "-"
            L.append(f"| {name} | " + " | ".join(cells) + f" | {pm} | {ips} |")
        L += ["", "![study](study.png)", "", "## Claims", ""]
        L += ["| claim [source] | a vs b | metric | a | b | gap | 2·SE | verdict |", "|---" * 8 + "|"]
        for text, source, a, b, metrics, margin in [*CLAIMS, *self.random_init_claims()]:
            for m in metrics:
                va = [v for _, v in rows.get(a, {}).get(m, [])]
                vb = [v for _, v in rows.get(b, {}).get(m, [])]
                if not va or not vb:
                    continue
                v, gap, two_se = verdict(va, vb, margin)
                L.append(f"| {text} [{source}] | {a} vs {b} | {LABEL[m]} | {fmt(va)} | {fmt(vb)} | {gap:+.2f} | "
                         f"{two_se:.2f} | *{v}* |")
        L += ["", "Verdict rule, per metric: *held* when the mean gap over seeds (minus the claimed margin, if any) "
              "exceeds twice its standard error (unpaired: √(s_a²/n_a + s_b²/n_b)), *did not hold* when it is that "
              "far the other way, otherwise *inconclusive* (always with a single seed).", ""]
        notes = BENCH / "study_notes.md"
        if notes.exists():
            L += [notes.read_text().strip(), ""]
        L += ["## Commands", "", "Every run and result above, `S` standing for the seed "
              f"(the study runs them in-process and in `{rel(self.work)}`):", "", "```bash"]
        for row in self.all_pretrain:
            if row in self.pretrain_rows or row in minutes:
                L.append(self.pretrain_command(row, "S"))
        for name, (_, _, _, kind) in self.all_evals.items():
            if name not in rows:
                continue
            for m in KIND_METRICS[kind]:
                L.append(show(self.command(self.eval_spec(name, m, "S"))))
        L += ["```", "", f"`$FMNIST` is the Fashion-MNIST directory (`scripts/get_fashion_mnist.sh` prints it; here "
              f"`{fmnist_root()}`).", ""]
        return "\n".join(L)


def show(cmd: str) -> str:
    """A command as RESULTS.md prints it: repository paths relative, the data directory as $FMNIST."""
    return cmd.replace(fmnist_root(), "$FMNIST").replace(str(REPO) + "/", "")


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def verdict(a: list[float], b: list[float], margin: float = 0.0) -> tuple[str, float, float]:
    """(verdict, gap, 2·SE): 'held' when mean(a) - mean(b) - margin exceeds twice its standard error, 'did not
    hold' when it is that far the other way, else 'inconclusive' (always with a single seed)."""
    if min(len(a), len(b)) < 2:
        return "inconclusive (one seed)", mean_std(a)[0] - mean_std(b)[0], 0.0
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gap = ma - mb
    two_se = 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if gap - margin > two_se:
        return "held", gap, two_se
    if gap - margin < -two_se:
        return "did not hold", gap, two_se
    return "inconclusive", gap, two_se


def stat(pairs: list[tuple[int, float]], digits: int = 3) -> dict[str, Any]:
    vals = [v for _, v in sorted(pairs)]
    m, sd = mean_std(vals)
    return {"mean": round(m, digits), "std": round(sd, digits), "values": [round(v, digits) for v in vals]}


def results_json(g: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    out_rows = []
    for name, got in g["rows"].items():
        row: dict[str, Any] = {"name": name}
        for m in METRICS:
            if got.get(m):
                row[m] = stat(got[m])
        mt = g["minutes"].get(name)
        if mt and mt["total"]:
            row["pretrain_minutes"] = stat(mt["total"], 2)
            row["pretrain_minutes_own"] = stat(mt["own"], 2)
        out_rows.append(row)
    return {"dataset": "fashion-mnist", "seeds": list(seeds), "rows": out_rows}


def plot(g: dict[str, Any], evals: dict[str, tuple], path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = g["rows"]
    metrics = list(METRICS)
    ncol = 3
    nrow = math.ceil(len(metrics) / ncol)
    n_bars = max(1, max(sum(1 for r in rows.values() if m in r) for m in metrics))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, nrow * (0.42 * n_bars + 1.8)), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        bars = [(n, mean_std([v for _, v in rows[n][metric]])) for n in rows
                if metric in rows[n] and evals[n][3] in ("pretrained", "random")]
        lines = [(n, mean_std([v for _, v in rows[n][metric]])) for n in rows
                 if metric in rows[n] and evals[n][3] in ("pixels", "scratch")]
        ax.set_title(f"{LABEL[metric]}: top-1 (%)")
        if not bars and not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        names = [n for n, _ in bars]
        means = [m for _, (m, _) in bars]
        stds = [s for _, (_, s) in bars]
        colors = ["#999999" if evals[n][3] == "random" else "#9ab0d6" if n in EVAL_ABLATIONS else "#4c72b0"
                  for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        for i, (m, sd) in enumerate(zip(means, stds)):
            ax.text(m + sd + 0.3, i, f"{m:.1f}", va="center", fontsize=8)
        for (n, (m, sd)), color in zip(lines, ("#c44e52", "#dd8452")):
            ax.axvline(m, ls="--", color=color, lw=1.5, label=f"{n} {m:.1f}")
            if sd > 0:
                ax.axvspan(m - sd, m + sd, color=color, alpha=0.12)
        if lines:
            ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        lo = min([m - s for m, s in zip(means, stds)] + [m - s for _, (m, s) in lines])
        hi = max([m + s for m, s in zip(means, stds)] + [m + s for _, (m, s) in lines])
        ax.set_xlim(max(0.0, lo - 5), min(100.0, hi + 4))
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Fashion-MNIST, mean ± std over seeds; dashed: raw pixels (probes), supervised from scratch "
                 "(fine-tunes)" + (" [--quick smoke run]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    from cmim.bench import machine as bench_machine
    from cmim.core.precision import native_bf16

    info = bench_machine()  # the CPU's model name and core count, as `cmim bench` reports them
    bf16 = "" if native_bf16("cpu") else ", no native bf16 (the bf16 recipes compute in fp32)"
    return f"{info['cpu']}, {info['cores']} cores, Python {platform.python_version()}{bf16}"


def print_table(g: dict[str, Any], all_evals: dict[str, tuple]) -> None:
    rows = g["rows"]
    cols = [m for m in METRICS if any(m in r for r in rows.values())]
    head = ["row", *cols, "pretrain_min"]
    table = [head]
    for name in all_evals:
        if name in rows:
            mt = g["minutes"].get(name)
            table.append([name, *(fmt([v for _, v in rows[name].get(m, [])]) for m in cols),
                          fmt([v for _, v in mt["total"]], 1) if mt else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def orphan_run(work: Path) -> str | None:
    """A `cmim pretrain` child of an earlier study that is still running (its parent was killed)."""
    try:
        pid_s, out = (work / "pretrain.pid").read_text().split(maxsplit=1)
        cmdline = Path(f"/proc/{int(pid_s)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    return f"pid {pid_s} in {out.strip()}" if "pretrain" in cmdline else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(x for x in __doc__.splitlines() if x.startswith("    ")))
    ap.add_argument("--quick", action="store_true", help="smoke run: CPU recipes, tiny budget, one seed; "
                    "outputs in the work dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--work", type=Path, default=None, help="runs and results (default benchmarks/study_runs; "
                    "--quick: /tmp/cmim_study_quick)")
    ap.add_argument("--records", type=Path, default=None, help="committed results and pre-training records "
                    "(default benchmarks/study_records; --quick: <work>/records)")
    ap.add_argument("--ablations", action="store_true", help="also the ConMIM ablation rows")
    ap.add_argument("--rows", nargs="*", default=None, metavar="NAME",
                    help="only these pre-training / baseline rows (none: only rewrite the outputs)")
    args = ap.parse_args()
    study = Study(args)
    study.work.mkdir(parents=True, exist_ok=True)
    lock = open(study.work / "study.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"study: another study.py is running in {study.work}", file=sys.stderr)
        return 1
    orphan = orphan_run(study.work)
    if orphan:
        print(f"study: a pre-training run of an earlier study is still running ({orphan}); wait for it or stop "
              f"it first", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] cmim: %(message)s", "%Y-%m-%d %H:%M:%S"))
    file_handler = logging.FileHandler(study.log_path)
    file_handler.setFormatter(handler.formatter)
    cmim_log = logging.getLogger("cmim")
    cmim_log.setLevel(logging.INFO)
    cmim_log.addHandler(handler)
    cmim_log.addHandler(file_handler)
    cmim_log.propagate = False
    from cmim.config import ConfigError

    try:
        pre, evals = study.select(args.rows)
        study.check_recipes(pre, evals)
        study.log(f"study{' --quick' if study.quick else ''}: seeds {study.seeds}, work {study.work}, "
                  f"pre-training rows {pre or 'none'}, eval rows {evals or 'none'}; {machine()}")
        fmnist_root()
        for seed in study.seeds:  # baselines first, then each pre-training row and its evaluations
            for name in [e for e in evals if study.all_evals[e][3] != "pretrained"]:
                study.evaluate(name, seed)
                study.write_outputs(study.gather())
            for row in pre:
                if study.needs_run(row, seed, pre):
                    study.pretrain(row, seed)
                else:
                    study.log(f"seed {seed} {row}: every result is in {rel(study.records)}, not pre-trained again")
                for name in evals:
                    source, _, _, kind = study.all_evals[name]
                    if kind == "pretrained" and source == row:
                        study.evaluate(name, seed)
                        study.write_outputs(study.gather())
        g = study.gather()
        study.write_outputs(g)
    except (StudyError, ConfigError) as e:
        study.log(f"study: error: {e}")
        return 1
    except KeyboardInterrupt as e:
        study.log(f"study: interrupted ({e or 'Ctrl-C'}); re-invoke the same command to continue")
        return 130
    print_table(g, study.all_evals)
    study.log(f"study finished in {(time.perf_counter() - study.t_start) / 60:.1f} min; "
              f"outputs in {rel(study.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
