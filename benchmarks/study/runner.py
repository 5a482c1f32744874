"""The study's runs: `cmim pretrain` as a child process per (row, seed), resumed exactly after an interruption,
and the evaluations in-process through cmim's eval API, each skipped while a valid record of it exists."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.eval.loading import sha256_file

from . import choice
from .data import ClipArt, clipart_folder, fmnist_root
from .design import (
    BENCH,
    CHOSEN,
    CLIPART_ROOT,
    CONFIGS,
    DESIGNS,
    REPO,
    VAL_FRACTION,
    Claim,
    Design,
    StudyError,
    rel,
    slug,
)
from .records import (
    LOST,
    RUN_IGNORE,
    Records,
    arch_weights,
    config_fingerprint,
    flatten,
    machine,
    made_on,
    read_json,
    result_fingerprint,
    write_json,
)

# every pre-training run of the study (beside train.seed, train.out_dir and the data): the study evaluates the
# encoders itself, so the online k-NN monitor is off (it does not change training, only the wall time)
PRETRAIN_COMMON: list[str] = ["monitor.every_epochs=0", "train.progress=false", "train.tensorboard=false"]
CHOICE_PROTOCOL = "feature_choice " + json.dumps({"candidates": list(choice.GLOBAL_FEATURES), "k": choice.K,
                                                  "val_fraction": choice.VAL_FRACTION,
                                                  "seed_offset": choice.SEED_OFFSET})


@dataclass
class Spec:
    """What computes one (row, metric, seed): `cmim eval <protocol>` with a recipe and overrides, on a
    checkpoint (``path``), fresh weights of a recipe (``arch``) or the raw pixels. ``ready`` is False while the
    row's chosen feature is not known yet."""

    protocol: str
    recipe: Path
    overrides: list[str]
    kind: str
    path: Path | None = None
    arch: Path | None = None
    raw_pixels: bool = False
    ready: bool = True


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.design: Design = DESIGNS[getattr(args, "dataset", None) or "fashion-mnist"]
        d = self.design
        self.quick: bool = args.quick
        # --rerun-lost: re-make lost checkpoints (not in --work) only to fill in backfill metrics
        self.rerun: bool = getattr(args, "rerun_lost", False)
        self.seeds: list[int] = args.seeds or ([0] if self.quick else [0, 1, 2])
        self.work: Path = (args.work or (d.quick_work if self.quick else d.work)).resolve()
        self.records: Path = (args.records or (self.work / "records" if self.quick else d.records)).resolve()
        self.store = Records(self.records, self.work)
        self.out_dir = self.work if self.quick else BENCH  # the RESULTS page, its JSON and plot
        self.pretrain_rows = dict(d.pretrain, **(d.ablations if args.ablations else {}))
        self.all_pretrain = dict(d.pretrain, **d.ablations)
        self.all_evals = dict(d.evals, **d.eval_ablations)
        self.eval_rows = dict(d.evals, **(d.eval_ablations if args.ablations else {}))
        self.clipart_root = Path(getattr(args, "clipart_root", None) or CLIPART_ROOT)
        self.args = args
        self.t_start = time.perf_counter()
        self._clipart: ClipArt | None = None
        self._diff: dict[tuple[str, int], list[str]] = {}
        self._config_fp: dict[tuple[str, int | str], str] = {}
        self._warned: set[tuple[str, int]] = set()
        self._rerun_notes: dict[tuple[str, int], dict[str, Any]] = {}
        self.log_path = self.work / "study.log"

    # --- logging ---------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    # --- data ------------------------------------------------------------------------------------------------
    @property
    def folder(self) -> bool:
        return self.design.data == "clipart"

    def clipart(self) -> ClipArt:
        if self._clipart is None:
            self._clipart = clipart_folder(self.clipart_root, self.work)
            path = self.records / "data.json"  # committed beside the results: which categories were dropped
            if read_json(path) != self._clipart.manifest():
                write_json(path, self._clipart.manifest())
        return self._clipart

    def data_root(self) -> str:
        return self.clipart().folder if self.folder else fmnist_root()

    def data_files(self) -> str | None:
        """The folder's content, which fingerprints name instead of its path (None: Fashion-MNIST, by path)."""
        return self.clipart().files_sha256 if self.folder else None

    def data_overrides(self, seed: int | str) -> list[str]:
        ov = [f"data.root={self.data_root()}"]
        if self.folder:
            ov += [f"data.val_fraction={VAL_FRACTION}", f"data.split_seed={seed}"]
        return ov

    def portable(self, overrides: list[str]) -> list[str]:
        """Overrides as fingerprints see them: a folder's path (in the work dir) as its design prints it."""
        if not self.folder:
            return overrides
        root = self.data_root()
        return [o.replace(root, self.design.texts.root_var) for o in overrides]

    def show(self, cmd: str) -> str:
        """A command as the RESULTS page and the records print it: repository paths relative, the data directory
        as its variable."""
        return cmd.replace(self.data_root(), self.design.texts.root_var).replace(str(REPO) + "/", "")

    # --- rows and recipes ------------------------------------------------------------------------------------
    def recipe(self, row: str) -> Path:
        name = self.all_pretrain[row].recipe
        return CONFIGS / (self.design.quick_recipes.get(name, name) if self.quick else name)

    def metrics_of(self, name: str) -> list[str]:
        return self.design.kind_metrics[self.all_evals[name].kind]

    def reads_chosen_feature(self, name: str, metric: str) -> bool:
        """Whether the row's metric probes the global feature chosen per seed (the pixels are their own)."""
        ev, m = self.all_evals[name], self.design.metrics[metric]
        return m.probe and ev.kind != "pixels" and (m.feature or ev.feature) == CHOSEN

    def select(self, names: list[str] | None) -> tuple[list[str], list[str]]:
        """(pre-training rows to run, in dependency order; eval rows to compute) for --rows."""
        if names is None:
            evals = list(self.eval_rows)
            pre = {self.eval_rows[e].pretrain_row for e in evals if self.eval_rows[e].kind == "pretrained"}
        else:
            known = {n.lower(): n for n in [*self.all_pretrain, *self.all_evals]}
            bad = [n for n in names if n.lower() not in known]
            if bad:
                raise StudyError(f"--rows: unknown row {bad[0]!r}; rows: " + ", ".join(repr(k) for k in
                                 dict.fromkeys([*self.all_pretrain, *self.all_evals])))
            chosen = [known[n.lower()] for n in names]
            evals = [e for e in self.all_evals if e in chosen]
            pre = {e for e in chosen if e in self.all_pretrain}
            pre |= {self.all_evals[e].pretrain_row for e in evals if self.all_evals[e].kind == "pretrained"}
            # a chosen pre-training row is evaluated as its eval rows
            evals += [e for e, v in self.all_evals.items()
                      if v.kind == "pretrained" and v.pretrain_row in pre and e not in evals]
        order: list[str] = []

        def visit(r: str) -> None:
            dep = self.all_pretrain[r].teacher
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
            row = self.all_evals[e]
            if row.kind in ("random", "scratch"):
                assert row.pretrain_row is not None
                need.setdefault(self.recipe(row.pretrain_row), []).append(e)
                model_ov = [o for o in self.all_pretrain[row.pretrain_row].extra if o.startswith("model.")]
                if model_ov:
                    raise StudyError(f"row {e!r} takes the architecture of {rel(self.recipe(row.pretrain_row))}, "
                                     f"but row {row.pretrain_row!r} changes it with {model_ov[0]}: put it into the "
                                     f"recipe file")
            for m in self.metrics_of(e):
                need.setdefault(CONFIGS / self.design.metrics[m].recipe, []).append(e)
        missing = [f"{rel(p)} (for {', '.join(dict.fromkeys(rows))})" for p, rows in need.items() if not p.is_file()]
        if missing:
            raise StudyError(f"missing recipe{'s' if len(missing) > 1 else ''}: " + "; ".join(missing)
                             + ("" if self.quick else " -- add it first (--quick uses the CPU recipes)"))

    # --- pre-training ----------------------------------------------------------------------------------------
    def run_dir(self, row: str, seed: int | str, rerun: bool | None = None) -> Path:
        """Where the row's run lives in --work (``rerun``: a re-run's place or the recorded run's; default: this
        sitting's)."""
        return self.work / ("rerun" if (self.rerun if rerun is None else rerun) else "") / f"seed{seed}" / slug(row)

    def pretrain_overrides(self, row: str, seed: int | str) -> list[str]:
        p = self.all_pretrain[row]
        ov = [f"train.seed={seed}", f"train.out_dir={self.run_dir(row, seed)}", *self.data_overrides(seed),
              *PRETRAIN_COMMON, *(self.design.quick_pretrain if self.quick else ()), *p.extra]
        if p.teacher is not None:
            ov.append(f"mimco.teacher={self.run_dir(p.teacher, seed) / CHECKPOINT_FILE}")
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
        if (row, seed) not in self._config_fp:
            self._config_fp[(row, seed)] = config_fingerprint(self.recipe(row), self.pretrain_overrides(row, seed),
                                                              self.data_files())
        return self._config_fp[(row, seed)]

    def has_checkpoint(self, row: str, seed: int) -> bool:
        """A finished run of the config the study would run now is in --work."""
        return self.finished(row, seed) is not None and not self.config_diff(row, seed)

    def record_path(self, row: str, seed: int | str) -> Path:
        return self.store.pretrain_path(row, seed)

    def record(self, row: str, seed: int) -> dict[str, Any] | None:
        """The committed record of the row's pre-training run, if it was made with the config the study would run
        now (and, for MimCo, from the teacher whose weights are current)."""
        rec = self.store.pretrain(row, seed, self.config_fingerprint(row, seed))
        dep = self.all_pretrain[row].teacher
        if rec and dep is not None and rec.get("teacher_sha256") != self.weights(dep, seed):
            return None
        return rec

    def weights(self, row: str, seed: int) -> str | None:
        """The sha256 of the row's pre-trained weights for this seed: of the checkpoint in --work when it is there
        (its record is written or renewed from it), else of the recorded run; None when there is neither. With
        --rerun-lost always the recorded run's: a re-run stands in for it (rerun_record) and renews nothing."""
        if self.has_checkpoint(row, seed) and not self.rerun:
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
        dep = self.all_pretrain[row].teacher
        s = self.finished(row, seed)
        assert s is not None
        t = self.pretrain_time(row, seed)
        write_json(path, {"row": row, "seed": seed, "checkpoint_sha256": sha,
                          "teacher_sha256": self.weights(dep, seed) if dep else None, "config_fingerprint": fp,
                          "steps": s["steps"], "seconds": t["seconds"], "img_per_s": t["img_per_s"],
                          "timing": t["source"], "machine": machine(), "command": self.pretrain_command(row, seed)})

    def pretrain_command(self, row: str, seed: int | str) -> str:
        """The row's `cmim pretrain` command as the RESULTS page and the records print it."""
        return self.show(f"cmim pretrain {rel(self.recipe(row))} " + " ".join(self.pretrain_overrides(row, seed)))

    def complete(self, row: str, seed: int) -> bool:
        """Every evaluation of the row's encoders for this seed is recorded (so its checkpoint is not needed);
        backfill metrics do not count."""
        return all(self.cached(e, m, seed) for e, ev in self.eval_rows.items()
                   if ev.kind == "pretrained" and ev.pretrain_row == row for m in self.metrics_of(e)
                   if not self.design.metrics[m].backfill)

    def needs_run(self, row: str, seed: int, rows: list[str]) -> bool:
        """Whether this sitting needs the row's checkpoint in --work: it has no recorded run, some of its results
        are missing, or a row of this sitting that depends on it has to be pre-trained. With --rerun-lost: the
        recorded run's checkpoint was lost and a backfill metric of the row is missing (or its student's)."""
        if self.rerun:
            if not self.lost(row, seed):
                return False
            missing = any(not self.cached(e, m, seed) for e, ev in self.eval_rows.items()
                          if ev.kind == "pretrained" and ev.pretrain_row == row for m in self.metrics_of(e)
                          if self.design.metrics[m].backfill)
            return missing or any(self.all_pretrain[d].teacher == row and self.needs_run(d, seed, rows)
                                  for d in rows)
        if self.weights(row, seed) is None or not self.complete(row, seed):
            return True
        return any(self.all_pretrain[d].teacher == row and not self.has_checkpoint(d, seed)
                   and self.needs_run(d, seed, rows) for d in rows)

    def lost(self, row: str, seed: int) -> bool:
        """The row's recorded run stands for weights that are not in --work: imported from an older results.json
        without them (``lost:...``), or recorded with their sha256 from a work dir that is gone."""
        rec = self.record(row, seed)
        if rec is None:
            return False
        sha = str(rec["checkpoint_sha256"])
        if sha.startswith(LOST):
            return True
        ckpt = self.run_dir(row, seed, rerun=False) / CHECKPOINT_FILE  # where the recorded run wrote it
        return not ckpt.is_file() or sha256_file(ckpt) != sha

    def rerun_record_path(self, row: str, seed: int | str) -> Path:
        return self.records / f"seed{seed}" / "rerun" / f"{slug(row)}.json"

    def rerun_record(self, row: str, seed: int) -> dict[str, Any] | None:
        """What stands in for a lost checkpoint: a finished re-run of the recorded command in <work>/rerun (its
        record is written here), when there is one."""
        if not (self.rerun and self.has_checkpoint(row, seed)):
            return None
        rec = self.record(row, seed)
        assert rec is not None
        sha = self.checkpoint_sha(row, seed)
        dep = self.all_pretrain[row].teacher
        t = self.pretrain_time(row, seed)
        new = {"row": row, "seed": seed, "rerun_of": rec["checkpoint_sha256"], "checkpoint_sha256": sha,
               "teacher_sha256": self.checkpoint_sha(dep, seed) if dep else None,
               "config_fingerprint": self.config_fingerprint(row, seed), "seconds": t["seconds"],
               "img_per_s": t["img_per_s"], "machine": machine(), "command": self.pretrain_command(row, seed)}
        path = self.rerun_record_path(row, seed)
        old = read_json(path)
        if old and all(old.get(k) == new[k] for k in ("rerun_of", "checkpoint_sha256", "config_fingerprint")):
            return old
        write_json(path, new)
        return new

    def finished(self, row: str, seed: int) -> dict[str, Any] | None:
        out = self.run_dir(row, seed)
        s = read_json(out / "summary.json")
        if s and s.get("steps") == s.get("total_steps") and (out / CHECKPOINT_FILE).is_file():
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
            self.rerun_record(row, seed) if self.rerun else self.weights(row, seed)  # its record
            return
        cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(self.recipe(row)), *self.pretrain_overrides(row, seed)]
        out.mkdir(parents=True, exist_ok=True)
        resumed = (out / CHECKPOINT_FILE).is_file()
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
        self.rerun_record(row, seed) if self.rerun else self.weights(row, seed)  # its record
        t = self.pretrain_time(row, seed)
        self.log(f"seed {seed} {row}: pre-trained {s['steps']} steps in {t['seconds'] / 60:.1f} min of training "
                 f"({t['img_per_s']:.0f} img/s; {(time.perf_counter() - t0) / 60:.1f} min wall)")

    def pretrain_time(self, row: str, seed: int) -> dict[str, Any]:
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
        return sha256_file(self.run_dir(row, seed) / CHECKPOINT_FILE)  # memoized by path, size and mtime

    # --- evaluation ------------------------------------------------------------------------------------------
    def _base_overrides(self, name: str, seed: int | str) -> list[str]:
        ov = [f"seed={seed}", *self.data_overrides(seed), "data.subset=null"]
        if self.all_evals[name].kind == "pretrained":
            ov.append(f"encoder={self.all_evals[name].encoder}")
        return ov

    def _spec(self, name: str, seed: int | str, protocol: str, recipe: str, ov: list[str],
              ready: bool = True) -> Spec:
        row = self.all_evals[name]
        spec = Spec(protocol, CONFIGS / recipe, ov, row.kind, raw_pixels=row.kind == "pixels", ready=ready)
        if row.kind == "pretrained":
            assert row.pretrain_row is not None
            spec.path = self.run_dir(row.pretrain_row, seed) / CHECKPOINT_FILE
        elif row.kind in ("random", "scratch"):
            assert row.pretrain_row is not None
            spec.arch = self.recipe(row.pretrain_row)
        return spec

    def eval_spec(self, name: str, metric: str, seed: int | str) -> Spec:
        """What computes one (row, metric, seed); seed "S" spells the command for any seed (a chosen feature
        then reads F)."""
        row, m = self.all_evals[name], self.design.metrics[metric]
        ov = self._base_overrides(name, seed)
        feature = None if row.kind == "pixels" else m.feature or row.feature  # pixels are their own feature
        ready = True
        if m.protocol != "finetune" and feature is not None:
            if feature == CHOSEN:
                feature = "F" if isinstance(seed, str) else self.chosen_feature(name, seed)
                ready = feature is not None
            ov.append(f"feature={feature}")
        ov += m.extra
        if m.protocol == "finetune":
            ov += [*self.design.ft_common, *(self.design.scratch if row.kind == "scratch" else ())]
        if self.quick:
            ov += [*self.design.quick_eval, *(self.design.quick_ft if m.protocol == "finetune" else ())]
        return self._spec(name, seed, m.protocol, m.recipe, ov, ready)

    def command(self, spec: Spec) -> str:
        what = ("--raw-pixels" if spec.raw_pixels else f"--arch {rel(spec.arch)}" if spec.arch
                else rel(spec.path))  # type: ignore[arg-type]
        return f"cmim eval {spec.protocol} {what} -c {rel(spec.recipe)} {' '.join(spec.overrides)}"

    def spec_weights(self, name: str, spec: Spec, seed: int) -> str | None:
        """The weights a spec evaluates, as fingerprints name them; None when its checkpoint is not ready."""
        if spec.kind == "pretrained":
            source = self.all_evals[name].pretrain_row
            assert source is not None
            return self.weights(source, seed)
        if spec.arch is not None:  # fresh weights: only the architecture and data sections matter
            return arch_weights(spec.arch)
        return "pixels"

    def fingerprint(self, name: str, spec: Spec, seed: int) -> str | None:
        """Identifies what a result was computed from; None when its checkpoint (or chosen feature) is not
        ready."""
        if not spec.ready:
            return None
        weights = self.spec_weights(name, spec, seed)
        if weights is None:
            return None
        return result_fingerprint(spec.protocol, spec.recipe, self.portable(spec.overrides), spec.kind, weights,
                                  self.data_files())

    def result_path(self, name: str, metric: str, seed: int) -> Path:
        return self.store.result_path(name, metric, seed)

    def cached(self, name: str, metric: str, seed: int) -> dict[str, Any] | None:
        return self.store.result(name, metric, seed,
                                 lambda: self.fingerprint(name, self.eval_spec(name, metric, seed), seed))

    # --- the chosen global feature ---------------------------------------------------------------------------
    def choice_spec(self, name: str, seed: int | str) -> Spec:
        """The feature choice reads the train part as the k-NN of its row would (recipe, overrides, subset)."""
        m = next(self.design.metrics[k] for k in self.metrics_of(name)
                 if (self.design.metrics[k].feature or self.all_evals[name].feature) == CHOSEN)
        ov = [*self._base_overrides(name, seed), *(self.design.quick_eval if self.quick else ())]
        return self._spec(name, seed, CHOICE_PROTOCOL, m.recipe, ov)

    def choice_record(self, name: str, seed: int) -> dict[str, Any] | None:
        spec = self.choice_spec(name, seed)
        return self.store.choice(name, seed, lambda: self.fingerprint(name, spec, seed))

    def chosen_feature(self, name: str, seed: int) -> str | None:
        rec = self.choice_record(name, seed)
        return rec["choice"] if rec else None

    def choose(self, name: str, seed: int) -> bool:
        """Choose and record the row's global feature for this seed (needs its checkpoint); False if not ready."""
        if self.choice_record(name, seed):
            return True
        spec = self.choice_spec(name, seed)
        fp = self.fingerprint(name, spec, seed)
        if fp is None:
            return False
        from cmim.eval.run import open_source

        t0 = time.perf_counter()
        src, cfg = open_source(spec.path, spec.recipe, [*spec.overrides, f"cache_dir={self.work / 'features'}"],
                               arch=spec.arch)
        res = choice.choose_global_feature(src, cfg, seed)
        secs = time.perf_counter() - t0
        write_json(self.store.choice_path(name, seed), {
            "row": name, "seed": seed, **res, "seconds": secs, "fingerprint": fp,
            # the features it compared: those of this k-NN command's train part, with feature=cls and feature=mean
            "features_of": self.show(self.command(dataclasses.replace(spec, protocol="knn"))),
            "machine": machine(), **self.rerun_note(name, seed)})
        scores = ", ".join(f"{f} {v:.2f}" for f, v in res["val_top1"].items())
        self.log(f"seed {seed} {name}: global feature {res['choice']} (validation k-NN {scores}; {secs:.0f} s)")
        return True

    def available(self, name: str, seed: int) -> bool:
        """The row's weights can be evaluated in this sitting (a pre-trained row: its checkpoint is in --work;
        with --rerun-lost: a re-run of its lost checkpoint is)."""
        row = self.all_evals[name]
        if row.kind != "pretrained":
            return True
        assert row.pretrain_row is not None
        return self.has_checkpoint(row.pretrain_row, seed) and (not self.rerun or self.lost(row.pretrain_row, seed))

    def rerun_note(self, name: str, seed: int) -> dict[str, Any]:
        """Where a result made from a re-run came from (empty for any other result): the re-run's record, and its
        row's first recorded metric recomputed from the re-run beside the recorded value, which says how close the
        re-run came to the lost weights."""
        row = self.all_evals[name]
        if not self.rerun or row.kind != "pretrained":
            return {}
        if (name, seed) in self._rerun_notes:
            return self._rerun_notes[(name, seed)]
        assert row.pretrain_row is not None
        rec = self.rerun_record(row.pretrain_row, seed)
        assert rec is not None
        check = next(m for m in self.metrics_of(name) if not self.design.metrics[m].backfill)
        recorded = self.cached(name, check, seed)
        from cmim.eval.run import open_source, run_eval

        spec = self.eval_spec(name, check, seed)
        src, cfg = open_source(spec.path, spec.recipe, [*spec.overrides, f"cache_dir={self.work / 'features'}"],
                               raw_pixels=spec.raw_pixels, arch=spec.arch)
        top1 = float(run_eval(spec.protocol, src, cfg, write=False)["top1"])
        self.log(f"seed {seed} {name}: the re-run's {check} {top1:.2f}% (recorded: "
                 f"{recorded['top1'] if recorded else 'none'})")
        note = {"rerun": {"record": rel(self.rerun_record_path(row.pretrain_row, seed)),
                          "checkpoint_sha256": rec["checkpoint_sha256"], "rerun_of": rec["rerun_of"],
                          "check": {"metric": check, "rerun_top1": top1,
                                    "recorded_top1": recorded["top1"] if recorded else None}}}
        self._rerun_notes[(name, seed)] = note
        return note

    def evaluate(self, name: str, seed: int) -> None:
        from cmim.eval.run import open_source, run_eval

        for metric in self.metrics_of(name):
            if self.cached(name, metric, seed):
                continue
            if self.rerun and self.all_evals[name].kind == "pretrained" and not self.design.metrics[metric].backfill:
                continue  # a re-run fills in backfill metrics only; the recorded results stand
            if self.design.metrics[metric].backfill and not self.available(name, seed):
                self.log(f"seed {seed} {name} {metric}: skipped, it needs the row's checkpoint in {rel(self.work)}")
                continue
            spec = self.eval_spec(name, metric, seed)
            if not spec.ready and self.choose(name, seed):
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
            src, cfg = open_source(spec.path, spec.recipe, [*spec.overrides, f"cache_dir={self.work / 'features'}"],
                                   raw_pixels=spec.raw_pixels, arch=spec.arch)
            res = run_eval(spec.protocol, src, cfg, write=False)
            secs = time.perf_counter() - t0
            write_json(path, {"row": name, "metric": metric, "seed": seed, "top1": res["top1"], "top5": res["top5"],
                              "seconds": secs, "fingerprint": fp, "command": self.show(cmd), "machine": machine(),
                              "result": res, **self.rerun_note(name, seed)})
            self.log(f"seed {seed} {name} {metric}: top-1 {res['top1']:.2f}% ({secs:.0f} s)")

    # --- gathering -------------------------------------------------------------------------------------------
    def gather(self) -> dict[str, Any]:
        """Everything valid in --records: per eval row, metric -> [(seed, top-1)], the chosen features, and
        timings."""
        rows: dict[str, dict[str, list[tuple[int, float]]]] = {}
        features: dict[str, dict[str, list[tuple[int, str]]]] = {}  # metrics read on a chosen feature
        choices: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        eval_seconds, untimed = 0.0, 0
        machines: dict[str, set[int]] = {}  # where the evaluations were made -> seeds
        pretrain_machines: dict[str, set[int]] = {}  # where the encoders were pre-trained -> seeds
        reruns: dict[str, dict[int, dict[str, Any]]] = {}  # results made from a re-run of a lost checkpoint
        for name in self.all_evals:
            got: dict[str, list[tuple[int, float]]] = {}
            for seed in self.seeds:
                for metric in self.metrics_of(name):
                    r = self.cached(name, metric, seed)
                    if r:
                        got.setdefault(metric, []).append((seed, float(r["top1"])))
                        eval_seconds += float(r.get("seconds") or 0.0)
                        untimed += r.get("seconds") is None
                        machines.setdefault(made_on(r), set()).add(seed)
                        if r.get("rerun"):  # with where the recorded run and the re-run were pre-trained
                            reruns.setdefault(name, {})[seed] = {
                                **r["rerun"], "pretrained_on": (made_on(read_json(self.record_path(name, seed))),
                                                                made_on(read_json(self.rerun_record_path(name, seed))))}
                        if self.reads_chosen_feature(name, metric):
                            feat = (r.get("result") or {}).get("features", {}).get("feature", "?")
                            features.setdefault(name, {}).setdefault(metric, []).append((seed, feat))
                if any(self.reads_chosen_feature(name, m) for m in self.metrics_of(name)):
                    rec = self.choice_record(name, seed)
                    if rec:
                        choices.setdefault(name, []).append((seed, rec))
                        eval_seconds += float(rec.get("seconds") or 0.0)
            if got:
                rows[name] = got
        own: dict[str, dict[int, dict[str, float]]] = {}
        for row in self.all_pretrain:
            for seed in self.seeds:
                if self.weights(row, seed) is not None:
                    rec = self.record(row, seed)
                    assert rec is not None
                    own.setdefault(row, {})[seed] = {"seconds": float(rec["seconds"]), "img_per_s": rec["img_per_s"]}
                    pretrain_machines.setdefault(made_on(rec), set()).add(seed)
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
            dep = self.all_pretrain[row].teacher
            if dep is None:
                return t["seconds"]
            d = total(dep, seed)
            return None if d is None else t["seconds"] + d

        minutes: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for name, ev in self.all_evals.items():
            if ev.kind != "pretrained" or ev.pretrain_row not in own:
                continue
            m = minutes.setdefault(name, {"total": [], "own": [], "img_per_s": []})
            for seed, t in sorted(own[ev.pretrain_row].items()):
                tot = total(ev.pretrain_row, seed)
                if tot is not None:
                    m["total"].append((seed, tot / 60))
                m["own"].append((seed, t["seconds"] / 60))
                if t["img_per_s"]:  # not kept for the runs imported from an older results.json
                    m["img_per_s"].append((seed, t["img_per_s"]))
        pre_seconds = sum(t["seconds"] for r in own.values() for t in r.values())
        return {"rows": rows, "minutes": minutes, "eval_seconds": eval_seconds, "pretrain_seconds": pre_seconds,
                "untimed": untimed, "machines": machines, "pretrain_machines": pretrain_machines,
                "features": features, "choices": choices,
                "reruns": reruns}

    def random_init_claims(self) -> list[Claim]:
        """"Pre-training beats random init" (knn, linear) for every main row that random init is a fair baseline
        of: the same recipe architecture and the same probed feature."""
        ri = self.all_evals.get("random init")
        if not self.design.random_init_claims or ri is None or ri.pretrain_row is None:
            return []
        out = []
        for name, ev in self.design.evals.items():
            if ev.kind != "pretrained" or ev.pretrain_row is None:
                continue
            same_arch = self.all_pretrain[ev.pretrain_row].recipe == self.all_pretrain[ri.pretrain_row].recipe and \
                not any(o.startswith("model.") for o in self.all_pretrain[ev.pretrain_row].extra)
            if same_arch and ev.feature == ri.feature:
                out.append(Claim(f"{name} pre-training beats random init", "sanity", name, "random init",
                                 ("knn", "linear")))
        return out

    def write_outputs(self, g: dict[str, Any]) -> None:
        from cmim.core.io import atomic_write_text

        from . import report

        d = self.design
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / d.results_json, report.results_json(self, g))
        try:
            report.plot(self, g, self.out_dir / d.plot)
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the table
            self.log(f"plot not written: {type(e).__name__}: {e}")
        atomic_write_text(self.out_dir / d.results_md, report.markdown(self, g))
        self.log(f"wrote {rel(self.out_dir / d.results_md)}, {d.results_json}, {d.plot}")
