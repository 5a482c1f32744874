"""The command line: one study at a time per work dir (a lock), baselines first, then each pre-training row and
its evaluations, the outputs rewritten after every result."""

from __future__ import annotations

import argparse
import fcntl
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __doc__ as DOC
from . import report
from .design import DESIGNS, StudyError, rel
from .records import machine
from .runner import Study


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


def parser() -> argparse.ArgumentParser:
    doc = DOC or ""
    ap = argparse.ArgumentParser(prog="study.py", description=doc.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(x for x in doc.splitlines() if x.startswith("    ")))
    ap.add_argument("--dataset", choices=list(DESIGNS), default="fashion-mnist",
                    help="which design (default fashion-mnist; openclipart: the clip-art folder study)")
    ap.add_argument("--clipart-root", type=Path, default=None, metavar="DIR",
                    help="--dataset openclipart: the clip-art tree (default /usr/share/openclipart/png)")
    ap.add_argument("--quick", action="store_true", help="smoke run: CPU recipes, tiny budget, one seed; "
                    "outputs in the work dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--work", type=Path, default=None, help="runs and results (default benchmarks/study_runs, "
                    "benchmarks/study_runs_folder; --quick: /tmp/cmim_study_quick[_folder])")
    ap.add_argument("--records", type=Path, default=None, help="committed results and pre-training records "
                    "(default benchmarks/study_records, benchmarks/study_records_folder; --quick: <work>/records)")
    ap.add_argument("--ablations", action="store_true", help="also the ablation rows of the design")
    ap.add_argument("--rows", nargs="*", default=None, metavar="NAME",
                    help="only these pre-training / baseline rows (none: only rewrite the outputs)")
    ap.add_argument("--rerun-lost", action="store_true",
                    help="re-make the recorded pre-training runs whose checkpoints are not in --work (records named "
                    "lost:..., or whose recorded sha256 is missing there) in "
                    "<work>/rerun, only to fill in the metrics added since (knn_global); the recorded results stand")
    return ap


def run(study: Study, rows: list[str] | None) -> dict[str, Any]:
    pre, evals = study.select(rows)
    study.check_recipes(pre, evals)
    study.log(f"study{' --quick' if study.quick else ''} ({study.design.name}): seeds {study.seeds}, work "
              f"{study.work}, pre-training rows {pre or 'none'}, eval rows {evals or 'none'}; {machine()}")
    study.data_root()
    if study.folder:
        art = study.clipart()
        study.log(f"data: {art.folder} -> {art.source}: {len(art.kept)} categories, {sum(art.kept.values())} "
                  f"images; dropped (< {art.min_images} images): "
                  + (", ".join(f"{c} ({n})" for c, n in art.dropped.items()) or "none"))
    for seed in study.seeds:  # baselines first, then each pre-training row and its evaluations
        for name in [e for e in evals if study.all_evals[e].kind != "pretrained"]:
            study.evaluate(name, seed)
            study.write_outputs(study.gather())
        for row in pre:
            if study.needs_run(row, seed, pre):
                study.pretrain(row, seed)
            else:
                study.log(f"seed {seed} {row}: every result is in {rel(study.records)}, not pre-trained again")
            for name in evals:
                ev = study.all_evals[name]
                if ev.kind == "pretrained" and ev.pretrain_row == row:
                    study.evaluate(name, seed)
                    study.write_outputs(study.gather())
    g = study.gather()
    study.write_outputs(g)
    return g


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
        g = run(study, args.rows)
    except (StudyError, ConfigError) as e:
        study.log(f"study: error: {e}")
        return 1
    except KeyboardInterrupt as e:
        study.log(f"study: interrupted ({e or 'Ctrl-C'}); re-invoke the same command to continue")
        return 130
    report.print_table(study, g)
    study.log(f"study finished in {(time.perf_counter() - study.t_start) / 60:.1f} min; "
              f"outputs in {rel(study.out_dir)}")
    return 0
