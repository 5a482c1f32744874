"""``cmim eval knn|linear|finetune CHECKPOINT [RECIPE options] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cmim.core.cli_args import is_override
from cmim.eval.run import PROTOCOLS, open_source, run_eval, summary_line
from cmim.models.stored_encoder import ENCODER_ROLES

__all__ = ["add_parser"]

_HELP = {
    "knn": "k-NN on frozen features (DINO: k=10/20/100/200, cosine, votes exp(sim/0.07)); cached features",
    "linear": "linear probe on frozen features (BN w/o affine + linear; SGD/LARS, cosine); "
              "linear.mode=cached (fast) | reference (MoCo v3 / MAE, augmented images)",
    "finetune": "end-to-end fine-tuning (layer decay, drop path, Mixup/CutMix, RandAugment, random erasing; "
                "BEiT/ConMIM, MAE and CPU recipes in configs/finetune_*.yaml)",
}


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.checkpoint is not None and is_override(args.checkpoint):
        overrides.insert(0, args.checkpoint)  # no checkpoint given (a baseline): the first word is an override
        args.checkpoint = None
    if args.encoder:
        overrides.append(f"encoder={args.encoder}")
    if args.random_init:
        overrides.append("init=random")
    if args.feature:
        overrides.append(f"feature={args.feature}")
    if args.label_fraction is not None:
        overrides.append(f"label_fraction={args.label_fraction}")
    args.raw_pixels = getattr(args, "raw_pixels", False)
    src, cfg = open_source(args.checkpoint, args.config, overrides, raw_pixels=args.raw_pixels, arch=args.arch)
    if args.no_cache:
        import tempfile

        cfg.cache_dir = tempfile.mkdtemp(prefix="cmim-features-")  # fresh features, nothing reused
    if args.protocol == "finetune" or (args.protocol == "linear" and cfg.linear.mode == "reference"):
        logging.getLogger("cmim").setLevel(logging.INFO)
    result = run_eval(args.protocol, src, cfg, out=args.out)
    print(summary_line(result))
    return 0


def add_parser(subparsers: Any) -> None:
    desc = ("Evaluate a checkpoint (any method; teacher or student) or an exported .safetensors file. Data "
            "defaults to what the encoder was pre-trained on; a recipe (configs/eval_*.yaml, "
            "configs/finetune_*.yaml) and key=value overrides change it. Writes a JSON result and prints one "
            "summary line.")
    p = subparsers.add_parser("eval", help="evaluate an encoder: knn | linear | finetune", description=desc)
    sub = p.add_subparsers(dest="protocol", required=True)
    for name in PROTOCOLS:
        q = sub.add_parser(name, help=_HELP[name], description=_HELP[name], intermixed=True)
        q.add_argument("checkpoint", nargs="?", default=None,
                       help="cmim checkpoint (.pt) or file written by `cmim export` (none with --raw-pixels/--arch)")
        q.add_argument("overrides", nargs="*", help="key=value eval-config overrides (test_subset=2000)")
        q.add_argument("-c", "--config", help="eval recipe YAML")
        q.add_argument("--encoder", choices=ENCODER_ROLES, help="which encoder (default: teacher)")
        q.add_argument("--feature", help="pooled feature: mean (default) | cls | gridG (G x G mean-pooled cells)")
        q.add_argument("--random-init", action="store_true",
                       help="evaluate the same architecture with fresh weights (the baseline)")
        q.add_argument("--arch", metavar="RECIPE",
                       help="no checkpoint: the encoder of this pre-training recipe with fresh weights (finetune: "
                            "the supervised-from-scratch baseline)")
        if name != "finetune":
            q.add_argument("--raw-pixels", action="store_true",
                           help="no encoder: the normalized, flattened images are the features (the baseline)")
        q.add_argument("--label-fraction", type=float, metavar="F",
                       help="train with a class-balanced share of the labels (0.01 = 1%%; label_fraction=F)")
        q.add_argument("--out", help="result JSON (default: <checkpoint dir>/eval/<protocol>-...json)")
        q.add_argument("--no-cache", action="store_true", help="recompute features in a throw-away cache")
        q.set_defaults(func=_run)
