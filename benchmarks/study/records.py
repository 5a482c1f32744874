"""What the tables are made of, kept in small committed JSON files: a record per finished pre-training run (its
checkpoint's sha256 and a fingerprint of its config) and a record per (seed, row, metric) result (with a
fingerprint of what computed it). A record is used only while its fingerprint matches what the study would run
now, so a changed recipe, override or checkpoint makes its results stale instead of silently reused.

The fingerprints are part of the committed records: changing how one is computed invalidates every record made
before (tests/test_study_records.py recomputes those of benchmarks/study_records/ to catch that).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmim.core.io import atomic_write_text

from .design import slug

# config keys that are not part of what a pre-training run learns: logging, resuming, checkpoint format and
# retention, loader workers, the host allocator; and BatchNorm sync across processes, which does nothing in the
# study's one-process runs
RUN_IGNORE = ("monitor.", "train.progress", "train.tensorboard", "train.resume", "train.checkpoint_format",
              "train.keep_checkpoints", "data.num_workers", "train.sync_bn", "train.keep_freed_memory")
# ... and the paths, which differ between machines and work dirs (the teacher is identified by its sha256, the
# folder by the list of its files, the decoded-image cache by content)
RUN_PATHS = ("train.out_dir", "data.root", "mimco.teacher", "data.cache_dir")
# Settings that act on folders only, joined cmim after the Fashion-MNIST records were made: on any other dataset
# they change nothing, so at these (default) values they stay out of its fingerprint and those records stand.
FOLDER_ONLY = {"data.split_twins": True, "data.twin_cosine": 0.99, "data.cache_images": True,
               "data.cache_short_side": None}
# Settings that joined cmim later still and, at these (default) values, change nothing anywhere: an 8-bit 1- or
# 3-channel run (data.bit_depth=auto) from a random init (model.init_from=null), DDP (a single process ignores
# train.strategy), activations kept for backward (train.grad_checkpointing=false).
LATER_DEFAULTS = {"data.bit_depth": "auto", "model.init_from": None, "train.strategy": "ddp",
                  "train.grad_checkpointing": False}
# the checkpoint_sha256 of a run whose weights are gone (its results were imported from an older results.json):
# "lost:<row slug>:seed<N>"; `study.py --rerun-lost` re-makes such a run to fill in metrics added since
LOST = "lost:"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


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


NOT_RECORDED = "machine not recorded"


def made_on(record: dict[str, Any] | None) -> str:
    """The machine a record names (records imported from an earlier results.json name none)."""
    return (record or {}).get("machine") or NOT_RECORDED


def cpu_of(machine_line: str) -> str:
    """The CPU part of a :func:`machine` line, for a table cell."""
    return "not recorded" if machine_line == NOT_RECORDED else machine_line.split(",")[0]


def machine() -> str:
    from cmim.bench import machine as bench_machine
    from cmim.core.precision import native_bf16

    info = bench_machine()  # the CPU's model name and core count, as `cmim bench` reports them
    bf16 = "" if native_bf16("cpu") else ", no native bf16 (the bf16 recipes compute in fp32)"
    return f"{info['cpu']}, {info['cores']} cores, Python {platform.python_version()}{bf16}"


def config_fingerprint(recipe: Path, overrides: list[str], data_files: str | None = None) -> str:
    """What a pre-training run learns from, wherever it runs: its resolved config less RUN_IGNORE and RUN_PATHS
    (and FOLDER_ONLY off folders, LATER_DEFAULTS at their defaults); ``data_files`` names a folder's content
    in place of its path."""
    from omegaconf import OmegaConf

    from cmim.config import Config, merge_config

    # not validated: MimCo's teacher file need not exist (its weights are named by the record's sha256)
    cfg = flatten(OmegaConf.to_container(merge_config(Config, [], recipe, overrides, lambda c: None), resolve=True))
    folder = cfg.get("data.name") == "folder"
    kept = {k: v for k, v in cfg.items() if not k.startswith(RUN_IGNORE) and k not in RUN_PATHS
            and (folder or k not in FOLDER_ONLY or v != FOLDER_ONLY[k])
            and (k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k])}
    if data_files is not None:
        kept["data.files"] = data_files
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def arch_weights(arch: Path) -> str:
    """Fresh weights are named by the architecture and data sections of the recipe that builds them."""
    recipe = json.loads(parsed_recipe(arch))
    return json.dumps({k: recipe.get(k) for k in ("model", "data")}, sort_keys=True)


def result_fingerprint(protocol: str, recipe: Path, overrides: list[str], kind: str, weights: str,
                       data_files: str | None = None) -> str:
    """What a result was computed from: protocol, eval recipe, overrides (with the data directory as its
    design prints it where it is not the same on every machine), kind of row and weights."""
    blob: dict[str, Any] = {"protocol": protocol, "recipe": parsed_recipe(recipe), "overrides": overrides,
                            "kind": kind, "weights": weights}
    if data_files is not None:
        blob["data"] = data_files
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


class Records:
    """The record files under ``root`` (--records), and where results were kept before they were committed."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work

    def pretrain_path(self, row: str, seed: int | str) -> Path:
        return self.root / f"seed{seed}" / "pretrain" / f"{slug(row)}.json"

    def result_path(self, name: str, metric: str, seed: int | str) -> Path:
        return self.root / f"seed{seed}" / "eval" / slug(name) / f"{metric}.json"

    def choice_path(self, name: str, seed: int | str) -> Path:
        # not a metric's name: gather() reads results by metric, so this file is never taken for one
        return self.root / f"seed{seed}" / "eval" / slug(name) / "feature_choice.json"

    def pretrain(self, row: str, seed: int, fingerprint: str) -> dict[str, Any] | None:
        rec = read_json(self.pretrain_path(row, seed))
        return rec if rec and rec.get("config_fingerprint") == fingerprint else None

    def result(self, name: str, metric: str, seed: int,
               fingerprint: Callable[[], str | None]) -> dict[str, Any] | None:
        """The recorded result if its fingerprint matches (computed only when there is a file to compare); one
        still in the work dir's old place is moved in."""
        path = self.result_path(name, metric, seed)
        legacy = self.work / f"seed{seed}" / "eval" / slug(name) / f"{metric}.json"
        return self._valid([path, legacy], fingerprint)

    def choice(self, name: str, seed: int, fingerprint: Callable[[], str | None]) -> dict[str, Any] | None:
        return self._valid([self.choice_path(name, seed)], fingerprint)

    @staticmethod
    def _valid(paths: list[Path], fingerprint: Callable[[], str | None]) -> dict[str, Any] | None:
        found = [(p, r) for p in paths if (r := read_json(p))]
        if not found:
            return None
        fp = fingerprint()
        for p, r in found:
            if fp is not None and r.get("fingerprint") == fp:
                if p != paths[0]:
                    write_json(paths[0], r)
                return r
        return None
