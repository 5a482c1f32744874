"""``cmim viz tsne|patches|attention|curves``: pictures as PNG files.

Checkpoint commands take one or more checkpoints (or exported files) side by side, ``--random-init`` adds the
same architecture with fresh weights as a baseline, and ``key=value`` arguments override the eval config
(data, subsets, encoder, feature), exactly as for ``cmim eval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cmim.core.cli_args import is_override
from cmim.core.errors import ConfigError
from cmim.eval.datasets import eval_dataset
from cmim.viz.sources import class_names, load_sources

__all__ = ["add_parser"]


def _split_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    overrides = [a for a in args.inputs if is_override(a)]
    return [a for a in args.inputs if a not in overrides], overrides


def _labels(args: argparse.Namespace) -> list[str] | None:
    return [s.strip() for s in args.labels.split(",")] if args.labels else None


def _default_out(path: str, name: str) -> Path:
    return Path(path).resolve().parent / "viz" / f"{name}.png"


def _tsne(args: argparse.Namespace) -> int:
    from cmim.viz.tsne import plot_tsne

    paths, overrides = _split_args(args)
    defaults = [f"test_subset={args.points}", "train_subset=10000"]
    sources, cfg = load_sources(paths, args.config, defaults + overrides, args.random_init, _labels(args))
    out = plot_tsne(sources, cfg, args.out or _default_out(paths[0], "tsne"), n_points=args.points,
                    class_names=class_names(cfg))
    print(f"cmim viz tsne: {len(sources)} panel(s) -> {out}")
    return 0


def _maps(args: argparse.Namespace, kind: str) -> int:
    from cmim.viz.maps import pick_images, plot_attention, plot_patch_similarity

    paths, overrides = _split_args(args)
    sources, cfg = load_sources(paths, args.config, overrides, args.random_init, _labels(args))
    ds = eval_dataset(cfg, "test")
    try:
        index = [int(i) for i in args.index.split(",")] if args.index else None
    except ValueError:
        raise ConfigError(f"--index: expected comma-separated integers, got {args.index!r}") from None
    if index and not all(0 <= i < len(ds) for i in index):  # type: ignore[arg-type]
        raise ConfigError(f"--index: the test set has {len(ds)} images")  # type: ignore[arg-type]
    images, idx, labels = pick_images(ds, args.images, index)
    names = class_names(cfg)
    text = [f"#{i}: {names[y] if 0 <= y < len(names) else y}" for i, y in zip(idx, labels)]
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    out = args.out or _default_out(paths[0], kind)
    if kind == "patches":
        queries = None
        if args.query:
            try:
                queries = [tuple(int(v) for v in q.split(",")) for q in args.query]
            except ValueError:
                raise ConfigError(f"--query: expected ROW,COL pairs, got {args.query}") from None
            gh, gw = sources[0][1].encoder.grid_size
            if any(len(q) != 2 or not (0 <= q[0] < gh and 0 <= q[1] < gw) for q in queries):
                raise ConfigError(f"--query: patches must be ROW,COL inside the {gh}x{gw} grid")
        out = plot_patch_similarity(sources, images, text, mean, std, out, queries)  # type: ignore[arg-type]
    else:
        out = plot_attention(sources, images, text, mean, std, out)
    print(f"cmim viz {kind}: {len(sources)} encoder(s) x {len(idx)} image(s) -> {out}")
    return 0


def _curves(args: argparse.Namespace) -> int:
    from cmim.viz.curves import plot_curves

    runs = args.runs
    run_dir = Path(runs[0]) if Path(runs[0]).is_dir() else Path(runs[0]).parent
    out = args.out or run_dir / "viz" / "curves.png"
    path = plot_curves(runs, out, _labels(args))
    print(f"cmim viz curves: {len(runs)} run(s) -> {path}")
    return 0


def _checkpoint_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    q = sub.add_parser(name, help=help_text, description=help_text, intermixed=True)
    q.add_argument("inputs", nargs="+", metavar="CHECKPOINT_OR_KEY=VALUE",
                   help="checkpoints / exported files (PATH@student for a run's student), and key=value "
                        "overrides of the eval config")
    q.add_argument("-c", "--config", help="eval recipe YAML (data, subsets, encoder, feature)")
    q.add_argument("--random-init", action="store_true", help="add the same architecture, fresh weights")
    q.add_argument("--labels", help="comma-separated panel names")
    q.add_argument("--out", help="PNG path (default: <checkpoint dir>/viz/<command>.png)")
    return q


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("viz", help="pictures: tsne | patches | attention | curves (PNG)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="viz", required=True)
    q = _checkpoint_parser(sub, "tsne", "t-SNE of test features by class, k-NN/linear top-1 in the titles")
    q.add_argument("--points", type=int, default=2000, help="test samples to embed (default 2000)")
    q.set_defaults(func=_tsne)
    for name, text in (("patches", "cosine similarity of query patch tokens to every patch of the image"),
                       ("attention", "last-block CLS attention maps, per head and averaged")):
        q = _checkpoint_parser(sub, name, text)
        q.add_argument("--images", type=int, default=4, help="test images, one per class (default 4)")
        q.add_argument("--index", help="comma-separated test-set indices of the images to show")
        if name == "patches":
            q.add_argument("--query", action="append",
                           help="a query patch as ROW,COL; repeat for more (default: centre + two)")
        q.set_defaults(func=lambda a, _k=name: _maps(a, _k))
    q = sub.add_parser("curves", help="training curves from metrics.jsonl (loss, lr, momentum, online k-NN)")
    q.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) or metrics.jsonl files")
    q.add_argument("--labels", help="comma-separated run names")
    q.add_argument("--out", help="PNG path (default: <run dir>/viz/curves.png)")
    q.set_defaults(func=_curves)
