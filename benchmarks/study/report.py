"""From what the records hold to what a reader sees: statistics over seeds, claim verdicts, the RESULTS page,
its JSON and its plot. Nothing here runs anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .design import CHOSEN, Claim, LimitClaim, rel
from .records import cpu_of, machine

if TYPE_CHECKING:
    from .runner import Study


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


def limit_verdict(values: list[float], limit: float) -> str:
    """A budget is a promise for every run: 'held' when no seed's run took longer than ``limit``."""
    return "held" if max(values) <= limit else "did not hold"


def stat(pairs: list[tuple[int, float]], digits: int = 3) -> dict[str, Any]:
    vals = [v for _, v in sorted(pairs)]
    m, sd = mean_std(vals)
    return {"mean": round(m, digits), "std": round(sd, digits), "values": [round(v, digits) for v in vals]}


def shown_metrics(study: Study, g: dict[str, Any]) -> list[str]:
    """The design's metrics, less backfill metrics that no row has yet."""
    return [m for m, spec in study.design.metrics.items()
            if not spec.backfill or any(m in r for r in g["rows"].values())]


def results_json(study: Study, g: dict[str, Any]) -> dict[str, Any]:
    out_rows = []
    for name, got in g["rows"].items():
        row: dict[str, Any] = {"name": name}
        for m in study.design.metrics:
            if got.get(m):
                row[m] = stat(got[m])
                chosen = g["features"].get(name, {}).get(m)
                if chosen:  # the global feature chosen per seed, in the order of "values"
                    row[m]["feature"] = [f for _, f in sorted(chosen)]
        probes = [m for m in study.design.metrics if got.get(m) and study.design.metrics[m].probe]
        if probes and study.all_evals[name].kind == "pixels":
            row["feature"] = "pixels"
        elif probes and all("feature" in row[m] for m in probes):  # every probe of the row read the chosen one
            row["feature"] = row[probes[0]]["feature"]
        mt = g["minutes"].get(name)
        if mt and mt["total"]:
            row["pretrain_minutes"] = stat(mt["total"], 2)
            row["pretrain_minutes_own"] = stat(mt["own"], 2)
        out_rows.append(row)
    out: dict[str, Any] = {"dataset": study.design.name, "seeds": list(study.seeds), "rows": out_rows}
    if study.folder:
        out["data"] = study.clipart().manifest()
    return out


def plot(study: Study, g: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = g["rows"], study.all_evals
    metrics = shown_metrics(study, g)
    ncol = 3
    nrow = math.ceil(len(metrics) / ncol)
    n_bars = max(1, max(sum(1 for r in rows.values() if m in r) for m in metrics))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, nrow * (0.42 * n_bars + 1.8)), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        bars = [(n, mean_std([v for _, v in rows[n][metric]])) for n in rows
                if metric in rows[n] and evals[n].kind in ("pretrained", "random")]
        lines = [(n, mean_std([v for _, v in rows[n][metric]])) for n in rows
                 if metric in rows[n] and evals[n].kind in ("pixels", "scratch")]
        ax.set_title(f"{study.design.label(metric)}: top-1 (%)")
        if not bars and not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        names = [n for n, _ in bars]
        means = [m for _, (m, _) in bars]
        stds = [s for _, (_, s) in bars]
        colors = ["#999999" if evals[n].kind == "random" else "#9ab0d6" if n in study.design.eval_ablations
                  else "#4c72b0" for n in names]
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
    fig.suptitle(study.design.texts.plot_title + (" [--quick smoke run]" if study.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(study: Study, g: dict[str, Any]) -> None:
    rows = g["rows"]
    cols = [m for m in study.design.metrics if any(m in r for r in rows.values())]
    head = ["row", *cols, "pretrain_min"]
    table = [head]
    for name in study.all_evals:
        if name in rows:
            mt = g["minutes"].get(name)
            table.append([name, *(fmt([v for _, v in rows[name].get(m, [])]) for m in cols),
                          fmt([v for _, v in mt["total"]], 1) if mt else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), flush=True)


def _data_section(study: Study) -> list[str]:
    """A folder design's data: which categories were kept and dropped."""
    if not study.folder:
        return []
    art = study.clipart()
    kept = ", ".join(f"{c} {n}" for c, n in art.kept.items())
    dropped = ", ".join(f"{c} {n}" for c, n in art.dropped.items()) or "none"
    return ["## Data", "",
            f"`{art.source}` (Debian's clip-art): each top-level category is a class, its nested sub-folders "
            f"included. Categories with fewer than {art.min_images} images are dropped; the study links the others "
            f"into one folder (`$CLIPART`), the `data.root` of every run. Kept ({len(art.kept)} categories, "
            f"{sum(art.kept.values())} images): {kept}. Dropped: {dropped}. The list is also in "
            f"`{rel(study.records / 'data.json')}`.", ""]


def _choice_section(study: Study, g: dict[str, Any]) -> list[str]:
    if not g["choices"]:
        return []
    d = study.design
    read = sorted({m for e in g["choices"] for m in study.metrics_of(e)
                   if study.reads_chosen_feature(e, m)}, key=list(d.metrics).index)
    twins = ", near-duplicate files kept together as the folder split keeps them" if study.folder else ""
    L = ["## Global feature chosen per row", "",
         "k-NN (k=20) from the rest of the training part to a validation part of it (20%, drawn with seed 1000 + "
         f"the seed{twins}), on CLS and on the mean of the patch tokens; the better one is the row's feature for "
         + ", ".join(d.label(m) for m in read) + " of that seed. The test split plays no part.", "",
         "| row | seed | chosen | validation k-NN, cls | validation k-NN, mean | fit / validation images |",
         "|---" * 6 + "|"]
    for name, recs in g["choices"].items():
        for seed, r in sorted(recs, key=lambda x: x[0]):
            v = r["val_top1"]
            L.append(f"| {name} | {seed} | {r['choice']} | {v.get('cls', float('nan')):.2f} | "
                     f"{v.get('mean', float('nan')):.2f} | {r['fit_samples']} / {r['val_samples']} |")
    return [*L, ""]


def _rerun_section(study: Study, g: dict[str, Any]) -> list[str]:
    """Results made from re-runs of lost checkpoints: how close each re-run came to the weights it stands for."""
    if not g.get("reruns"):
        return []
    L = ["## Re-runs for the metrics added later", "",
         "These rows' checkpoints were lost after their results were recorded, so the metrics added since "
         "(" + ", ".join(study.design.label(m) for m, spec in study.design.metrics.items() if spec.backfill)
         + ") come from a re-run of the recorded command (`study.py --rerun-lost`, in `<work>/rerun`; record in "
         f"`{rel(study.records)}/seedN/rerun/`): same config, seed and code path, possibly another machine. "
         "A checkpoint file holds its run's config, output folder included, so its sha256 cannot show whether the "
         "re-run made the same weights; the row's first recorded metric, recomputed from the re-run, says how "
         "close it came (a run pre-trained on another CPU kind rounds its bf16 matmuls differently, so it cannot "
         "come back bit for bit):", "",
         "| row | seed | metric | recorded | re-run | pre-trained on: recorded / re-run | re-run checkpoint (sha256) |",
         "|---" * 7 + "|"]

    for name, by_seed in g["reruns"].items():
        for seed, r in sorted(by_seed.items()):
            c = r["check"]
            rec = c["recorded_top1"]
            recorded_on, rerun_on = map(cpu_of, r["pretrained_on"])
            L.append(f"| {name} | {seed} | {study.design.label(c['metric'])} | "
                     f"{'-' if rec is None else f'{rec:.2f}'} | {c['rerun_top1']:.2f} | "
                     f"{recorded_on} / {rerun_on} | {r['checkpoint_sha256'][:12]} |")
    return [*L, ""]


def where_made(machines: dict[str, set[int]]) -> str:
    """"CPU line (seeds 0, 1) and other CPU line (seed 2)", in seed order."""
    return " and ".join(f"{m} (seed{'s' if len(sd) > 1 else ''} {', '.join(map(str, sorted(sd)))})"
                        for m, sd in sorted(machines.items(), key=lambda kv: min(kv[1])))


def markdown(study: Study, g: dict[str, Any]) -> str:
    d, t = study.design, study.design.texts
    rows, minutes = g["rows"], g["minutes"]
    metrics = shown_metrics(study, g)
    n = len(study.seeds)
    mins = (g["pretrain_seconds"] + g["eval_seconds"]) / 60
    quick = " --quick" if study.quick else ""
    L = [t.title, ""]
    evaluated_on = where_made(g["machines"]) or machine()
    where = f"on {evaluated_on}"
    if g["pretrain_machines"] and g["pretrain_machines"] != g["machines"]:
        # a CPU kind changes bf16 rounding, so a seed pre-trained elsewhere cannot be re-made bit for bit here
        where = f"(evaluated on {evaluated_on}; pre-trained on {where_made(g['pretrain_machines'])})"
    untimed = (f"; {g['untimed']} results imported from an earlier results.json carry no time"
               if g["untimed"] else "")
    L += [f"Made by `{d.command}{quick}` {where}, seeds {study.seeds}: {mins:.0f} min of "
          f"runs in all ({g['pretrain_seconds'] / 60:.0f} min pre-training, {g['eval_seconds'] / 60:.0f} min "
          f"evaluation{untimed}; times of the runs themselves, summed). Times and img/s are comparable only "
          f"between runs made on an otherwise idle machine. The numbers are also in "
          f"[`{d.results_json}`]({d.results_json}); each "
          f"(seed, row, metric) result and each pre-training run's record (checkpoint sha256, config "
          f"fingerprint, training time, command, machine) is a JSON file in `{rel(study.records)}`, the runs "
          f"themselves (checkpoints, logs) are in `{rel(study.work)}`.", ""]
    if study.quick:
        L += [f"**This is a --quick smoke run** {t.quick_note}: its numbers only show that the pipeline runs.", ""]
    L += _data_section(study)
    L += ["## Design", ""]
    L += [t.pretrain_intro, ""]
    for row, p in study.all_pretrain.items():
        if row in study.pretrain_rows or row in minutes:
            ex = f" `{' '.join(p.extra)}`" if p.extra else ""
            L.append(f"- **{row}**: `{rel(study.recipe(row))}`{ex}"
                     + (f", `mimco.teacher=` the {p.teacher} checkpoint" if p.teacher else ""))
    L += ["", t.eval_intro, ""]
    for m in metrics:
        spec = d.metrics[m]
        L.append(f"- **{spec.label}**: `cmim eval {spec.protocol} -c configs/{spec.recipe}`"
                 + (f" `{' '.join(spec.extra)}`" if spec.extra else "")
                 + (" (on the chosen global feature)" if spec.feature == CHOSEN else ""))
    probed = "; ".join(
        f"{e}: {ev.encoder} encoder" + ("" if ev.feature == CHOSEN else f", {ev.feature} feature")
        for e, ev in study.all_evals.items() if ev.kind == "pretrained" and (e in rows or e in study.eval_rows))
    ri = study.all_evals.get("random init")
    L += ["", t.probe_note.format(probed=probed, random_feature=ri.feature if ri else "-",
                                  ft_low_steps=d.ft_low_steps), ""]
    L += ["## Results (top-1 %, mean ± std over seeds)", ""]
    L += ["| row | " + " | ".join(d.label(m) for m in metrics) + " | pre-train min (own) | pre-train img/s |",
          "|---" * (len(metrics) + 3) + "|"]
    for name in study.all_evals:
        if name not in rows:
            continue
        cells = []
        for m in metrics:
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
    L += ["", f"![study]({d.plot})", ""]
    L += _choice_section(study, g)
    L += _rerun_section(study, g)
    L += ["## Claims", ""]
    L += ["| claim [source] | a vs b | metric | a | b | gap | 2·SE | verdict |", "|---" * 8 + "|"]
    limits = False
    for c in [*d.claims, *study.random_init_claims()]:
        if isinstance(c, LimitClaim):
            mt = minutes.get(c.row)
            vals = [v for _, v in mt["total"]] if mt else []
            if not vals:
                continue
            limits = True
            L.append(f"| {c.text} [{c.source}] | {c.row} vs {c.minutes:g} min | pre-train min (all seeds) | "
                     f"{fmt(vals, 1)} (max {max(vals):.1f}) | ≤ {c.minutes:g} | {max(vals) - c.minutes:+.1f} | - | "
                     f"*{limit_verdict(vals, c.minutes)}* |")
            continue
        assert isinstance(c, Claim)
        for m in c.metrics:
            va = [v for _, v in rows.get(c.a, {}).get(m, [])]
            vb = [v for _, v in rows.get(c.b, {}).get(m, [])]
            if not va or not vb:
                continue
            v, gap, two_se = verdict(va, vb, c.margin)
            L.append(f"| {c.text} [{c.source}] | {c.a} vs {c.b} | {d.label(m)} | {fmt(va)} | {fmt(vb)} | "
                     f"{gap:+.2f} | {two_se:.2f} | *{v}* |")
    L += ["", "Verdict rule, per metric: *held* when the mean gap over seeds (minus the claimed margin, if any) "
          "exceeds twice its standard error (unpaired: √(s_a²/n_a + s_b²/n_b)), *did not hold* when it is that "
          "far the other way, otherwise *inconclusive* (always with a single seed)."
          + (" A time budget *held* when no seed's pre-training (with its teacher's) took longer." if limits
             else ""), ""]
    if d.notes is not None and d.notes.exists():
        L += [d.notes.read_text().strip(), ""]
    L += ["## Commands", "", "Every run and result above, `S` standing for the seed "
          f"(the study runs them in-process and in `{rel(study.work)}`):", "", "```bash"]
    for row in study.all_pretrain:
        if row in study.pretrain_rows or row in minutes:
            L.append(study.pretrain_command(row, "S"))
    for name in study.all_evals:
        if name not in rows:
            continue
        for m in study.metrics_of(name):
            if m in metrics:
                L.append(study.show(study.command(study.eval_spec(name, m, "S"))))
    L += ["```", ""]
    if any(study.reads_chosen_feature(e, m) for e in rows for m in study.metrics_of(e) if m in metrics):
        L += ["`F` is the global feature chosen for the row and seed (table above).", ""]
    L += [t.root_note.format(root=rel(study.data_root())), ""]
    return "\n".join(L)
