"""``cmim report RUN_DIR``: one self-contained HTML page for a run.

The page holds the run's config, its summary, the training curves, every evaluation result found in
``RUN_DIR/eval/*.json`` as a table (with the raw-pixel baseline of each k-NN / linear result, run when
missing), and every picture in ``RUN_DIR/viz/*.png``, embedded as base64 so the file can be mailed or attached
as it is. Missing pictures are drawn first (curves always; patch similarity, CLS attention and t-SNE of the
trained vs a random-init encoder when the run has a checkpoint and its data are available); ``--no-pictures``
only uses what is already there.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cmim.config import ConfigError
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.core.errors import CheckpointError, UnsafeCheckpointError
from cmim.core.io import atomic_write_text

__all__ = ["add_parser", "draw_pictures", "write_report"]

log = logging.getLogger("cmim")

_PICTURE_ORDER = ("curves", "tsne", "patches", "attention")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.8rem;max-height:30rem}
figure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
.note{color:#a15c00;font-size:.85rem}
"""


def draw_pictures(run_dir: Path, refresh: bool = False, overrides: list[str] | None = None) -> list[str]:
    """Draw the run's standard pictures into ``run_dir/viz``; returns notes on pictures that were skipped."""
    from cmim.viz.curves import plot_curves

    viz, notes = run_dir / "viz", []
    if (run_dir / "metrics.jsonl").is_file() and (refresh or not (viz / "curves.png").is_file()):
        try:
            plot_curves([run_dir], viz / "curves.png", [run_dir.name])
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"training curves skipped: {e}")
    ckpt = run_dir / CHECKPOINT_FILE
    wanted = [n for n in ("tsne", "patches", "attention") if refresh or not (viz / f"{n}.png").is_file()]
    if not ckpt.is_file() or not wanted:
        if not ckpt.is_file():
            notes.append(f"no {CHECKPOINT_FILE} in {run_dir}: encoder pictures not drawn (a DCP run: "
                         "`cmim checkpoint consolidate`)")
        return notes
    try:
        from cmim.eval.datasets import eval_dataset
        from cmim.viz.maps import pick_images, plot_attention, plot_patch_similarity
        from cmim.viz.sources import class_names, load_sources
        from cmim.viz.tsne import plot_tsne

        ov = ["test_subset=1000", "train_subset=5000", *(overrides or [])]
        sources, cfg = load_sources([str(ckpt)], None, ov, random_init=True)
        names = class_names(cfg)
        if "tsne" in wanted:
            plot_tsne(sources, cfg, viz / "tsne.png", n_points=1000, class_names=names)
        if "patches" in wanted or "attention" in wanted:
            images, idx, labels = pick_images(eval_dataset(cfg, "test"), 3)
            text = [f"#{i}: {names[y] if 0 <= y < len(names) else y}" for i, y in zip(idx, labels)]
            mean, std = list(cfg.data.mean), list(cfg.data.std)
            if "patches" in wanted:
                plot_patch_similarity(sources, images, text, mean, std, viz / "patches.png")
            if "attention" in wanted:
                plot_attention(sources, images, text, mean, std, viz / "attention.png")
    except UnsafeCheckpointError:
        raise  # a file that would run code is an error to report loudly, not a picture to skip
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        notes.append(f"encoder pictures skipped: {e}")
    return notes


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for p in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and "protocol" in r and "top1" in r:
            r["_file"] = p.name
            rows.append(r)
    order = {"knn": 0, "linear": 1, "finetune": 2}
    return sorted(rows, key=lambda r: (order.get(r["protocol"], 9), r.get("features", {}).get("init", ""),
                                       r["_file"]))


def _baseline_key(r: dict[str, Any]) -> tuple:
    f, d = r.get("features", {}), r.get("dataset", {})
    return (r["protocol"], d.get("name"), d.get("root"), f.get("train_samples"), f.get("test_samples"),
            f.get("label_fraction"))


def add_pixel_baselines(run_dir: Path) -> list[str]:
    """For every k-NN / linear result in ``run_dir/eval`` that has no raw-pixel twin (same protocol, data, sample
    counts and label fraction), run the raw-pixel baseline with that result's own config and store it beside it:
    no table of encoder results goes without the level the pixels reach. Returns notes on baselines not run."""

    from cmim.eval.run import open_source, run_eval

    rows = _eval_rows(run_dir)
    have = {_baseline_key(r) for r in rows if r.get("checkpoint", {}).get("kind") == "pixels"}
    notes = []
    for r in rows:
        key = _baseline_key(r)
        if r["protocol"] not in ("knn", "linear") or key in have or not isinstance(r.get("config"), dict):
            continue
        cfg = dict(r["config"], feature="pixels", init="random", out=None)
        cfg.pop("encoder", None)
        try:
            src, ecfg = open_source(None, cfg, [], raw_pixels=True)
            label = "" if key[-1] is None else f"-labels{key[-1]:g}"
            name = f"{r['protocol']}-{key[1]}-pixels-{key[3]}x{key[4]}{label}.json"
            run_eval(r["protocol"], src, ecfg, out=run_dir / "eval" / name)
            have.add(key)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            notes.append(f"raw-pixel baseline for {r['_file']} skipped: {e}")
    return notes


def _eval_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No evaluation results yet (run <code>cmim eval knn|linear|finetune</code>).</p>"
    head = ("<tr><th>protocol</th><th>encoder</th><th>feature</th><th>init</th><th>dataset</th>"
            "<th>train / test</th><th>top-1 (%)</th><th>top-5 (%)</th><th>notes</th><th>file</th></tr>")
    body = []
    for r in rows:
        f, d, det = r.get("features", {}), r.get("dataset", {}), r.get("details", {})
        if r["protocol"] == "knn":
            note = ", ".join(f"k={k}: {v['top1']:.2f}" for k, v in det.get("per_k", {}).items())
        elif r["protocol"] == "linear":
            hist = det.get("history") or [{}]
            note = f"{det.get('mode', '')}, {hist[-1].get('epoch', '?')} epochs, lr {det.get('lr', 0):.3g}"
        else:
            note = (f"{det.get('steps', '?')} steps, batch {det.get('batch_size', '?')}, "
                    f"lr {det.get('lr', 0):.3g}")
        cells = [r["protocol"], f.get("encoder", ""), f.get("feature", ""), f.get("init", ""),
                 f"{d.get('name', '')} {f.get('test_split', '')}",
                 f"{f.get('train_samples', '?')} / {f.get('test_samples', '?')}"]
        tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        tds += f'<td class="num">{r["top1"]:.2f}</td><td class="num">{r["top5"]:.2f}</td>'
        tds += f"<td>{html.escape(note)}</td><td>{html.escape(r['_file'])}</td>"
        body.append(f"<tr>{tds}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _summary_table(run_dir: Path) -> str:
    p = run_dir / "summary.json"
    if not p.is_file():
        return "<p>No summary.json (run unfinished or interrupted).</p>"
    s = json.loads(p.read_text())
    rows = [("method", s.get("method")), ("steps", f"{s.get('steps')} / {s.get('total_steps')}"),
            ("epochs done", s.get("epochs_done")),
            ("throughput", f"{s['img_per_s']:.1f} img/s" if s.get("img_per_s") else "-"),
            ("training time", f"{s.get('train_seconds', 0) / 60:.1f} min")]
    knn = s.get("knn") or []
    if knn:
        rows.append(("online k-NN top-1", " → ".join(f"{k['knn_top1']:.2f} (ep {k['epoch']})" for k in knn)))
    if s.get("knn_raw_pixels"):
        rows.append(("k-NN top-1 on raw pixels (same images)", f"{s['knn_raw_pixels']['knn_top1']:.2f}"))
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def write_report(run_dir: str | Path, out: str | Path | None = None, pictures: bool = True,
                 refresh: bool = False, overrides: list[str] | None = None, baselines: bool = True) -> Path:
    """Build ``run_dir/report.html`` (or ``out``); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    notes = draw_pictures(run_dir, refresh, overrides) if pictures else []
    if baselines:
        notes += add_pixel_baselines(run_dir)
    cfg_path = run_dir / "config.yaml"
    config_text = cfg_path.read_text() if cfg_path.is_file() else "(no config.yaml)"
    pngs = sorted((run_dir / "viz").glob("*.png")) if (run_dir / "viz").is_dir() else []
    pngs.sort(key=lambda p: (_PICTURE_ORDER.index(p.stem) if p.stem in _PICTURE_ORDER else 99, p.name))
    captions = {
        "curves": "Training curves from metrics.jsonl.",
        "tsne": "t-SNE of test features, random init vs trained; k-NN / linear top-1 in the titles.",
        "patches": "Cosine similarity of query patch tokens (boxes) to every patch of the same image.",
        "attention": "CLS-token attention over the patches in the last block, head mean and per head.",
    }
    figs = "".join(f"<figure>{_img_tag(p)}<figcaption>{html.escape(captions.get(p.stem, p.name))}"
                   f"</figcaption></figure>" for p in pngs)
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    title = f"cmim run report: {run_dir.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(run_dir.resolve()))} · generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}</p>
<h2>Summary</h2>{_summary_table(run_dir)}
<h2>Evaluation</h2>{_eval_table(_eval_rows(run_dir))}
<h2>Pictures</h2>{note_html}{figs or "<p>No pictures.</p>"}
<h2>Config</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


def _run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir, args.out, pictures=not args.no_pictures, refresh=args.refresh,
                        overrides=args.overrides, baselines=not args.no_baselines)
    n_img = path.read_text(encoding="utf-8").count("data:image/png;base64,")
    print(f"cmim report: {path} ({n_img} picture(s), {path.stat().st_size / 1024:.0f} KiB)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="one self-contained HTML page for a run",
                              description=__doc__.splitlines()[0], intermixed=True)
    p.add_argument("run_dir", help=f"run folder (config.yaml, metrics.jsonl, {CHECKPOINT_FILE}, eval/, viz/)")
    p.add_argument("overrides", nargs="*", help="key=value eval-config overrides for drawn pictures")
    p.add_argument("--out", help="HTML path (default: RUN_DIR/report.html)")
    p.add_argument("--no-pictures", action="store_true", help="only embed pictures already in RUN_DIR/viz")
    p.add_argument("--refresh", action="store_true", help="redraw pictures that already exist")
    p.add_argument("--no-baselines", action="store_true",
                   help="do not run the raw-pixel k-NN / linear baselines missing beside the eval results")
    p.set_defaults(func=_run)
