"""``cmim checkpoint consolidate DIR OUT.pt``: a sharded (DCP) checkpoint as the single file every reader takes."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]


def _consolidate(args: argparse.Namespace) -> int:
    from cmim.engine.checkpoint.checkpointer import consolidate

    folder, ckpt = consolidate(args.source, args.out)
    print(f"cmim: consolidated {folder} (step {ckpt.get('step')}, method {ckpt.get('method')}) into {args.out}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("checkpoint", help="work with training checkpoints (consolidate DCP shards)",
                              description="Training checkpoints. A run with train.checkpoint_format=dcp writes "
                                          "sharded step folders (OUT_DIR/checkpoints/step_*/); `consolidate` turns "
                                          "one into the single-file format of train.checkpoint_format=file.")
    sub = p.add_subparsers(dest="checkpoint_command", required=True)
    c = sub.add_parser("consolidate", help="a DCP checkpoint -> one checkpoint file (for eval, export, viz, report)",
                       description="Read a DCP checkpoint on one process (no process group, any number of shards) "
                                   "and write it as one weights-only checkpoint file: the same layout as "
                                   "train.checkpoint_format=file, which `cmim eval`, `export`, `viz`, `report` and "
                                   "a resume (train.resume=OUT.pt, on any world size) read.")
    c.add_argument("source", help="a DCP step folder, or a run folder / its checkpoints/ folder (the newest "
                                  "complete step folder in it)")
    c.add_argument("out", help="the checkpoint file to write, e.g. consolidated.pt")
    c.set_defaults(func=_consolidate)
