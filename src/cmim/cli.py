"""``cmim`` command line: pretrain | eval | export | embed | viz | report | bench | pipeline | shards | checkpoint.

Errors a user can fix (bad config, missing path, incompatible checkpoint) print one ``cmim: error:`` line and
exit with status 2; nothing is written before the config has been validated.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from cmim.config import ConfigError, load_config
from cmim.core.cli_args import CliParser
from cmim.core.distributed import end_worker
from cmim.core.errors import CheckpointError, TrainingError

USER_ERRORS = (ConfigError, CheckpointError, TrainingError, FileNotFoundError, NotADirectoryError)

# sub-command -> module with `add_parser(subparsers)`; each sets `func` on its parser.
COMMAND_MODULES: dict[str, str] = {}


def register(name: str, module: str) -> None:
    COMMAND_MODULES[name] = module


register("eval", "cmim.eval.cli")
register("export", "cmim.export")
register("embed", "cmim.eval.embed")
register("viz", "cmim.viz.cli")
register("report", "cmim.report")
register("bench", "cmim.bench")
register("pipeline", "cmim.pipeline")
register("shards", "cmim.data.shards.cli")
register("checkpoint", "cmim.engine.checkpoint.cli")


def _pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from cmim.train import pretrain, print_pretrain_summary

    summary = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print_pretrain_summary(summary)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen sub-command's module is imported (all of them for --help)."""
    parser = CliParser(prog="cmim", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pre-train an encoder (ConMIM, MoCo v3, MimCo, SimMIM)",
                       description="Pre-train from a YAML recipe; any value can be overridden as key=value, "
                                   "e.g. `cmim pretrain configs/conmim_fmnist_cpu.yaml train.epochs=2`. "
                                   "Multi-process: `torchrun --nproc_per_node=N -m cmim.cli pretrain ...`.")
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_pretrain)
    for name, module in COMMAND_MODULES.items():
        if command is None or command == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name)  # placeholder: not chosen, so its options are never parsed
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMAND_MODULES or chosen == "pretrain" else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = int(func(args) or 0)
    except USER_ERRORS as e:
        print(f"cmim: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("cmim: interrupted; resume with the same command (train.resume=auto)", file=sys.stderr)
        code = 130
    end_worker(code)  # a torchrun worker ends here
    return code


if __name__ == "__main__":
    sys.exit(main())
