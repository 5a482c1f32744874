"""Small-scale study on Fashion-MNIST: does contrast help masked image modeling, as the papers claim?

Rows: random init, SimMIM (per-patch normalized pixels, and raw pixels as a check), ConMIM (its EMA teacher,
and its student), ConMIM with both views weak, ConMIM without EMA (teacher = student under stop-gradient),
MoCo v3, MimCo (with that seed's MoCo v3 teacher).
Every pre-training run gets the same budget in *epochs* over the same data subset, the same backbone, batch,
masking and optimizer; each is evaluated by k-NN and a linear probe on cached features (mean-pooled patch
tokens and CLS token) and by a short fine-tuning run with an equal budget. Claims are judged per metric with a
two-standard-error rule over seeds.

    python benchmarks/study.py                 # full study (3 seeds, ~2 h on 2 cores); benchmarks/RESULTS.md
    python benchmarks/study.py --quick         # smoke run, ~5 min on 2 cores; writes to /tmp/cmim_study_quick
    nohup python benchmarks/study.py > /tmp/study.log 2>&1 &     # the way to run the full study

Runs and evaluations already finished in --work are reused, so an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# row -> (recipe, overrides). Same backbone/data/optimizer everywhere: the ConMIM CPU recipe's.
ROWS: dict[str, tuple[str, list[str]]] = {
    "SimMIM": ("conmim_fmnist_cpu.yaml", ["method=simmim"]),
    "SimMIM, raw pixels": ("conmim_fmnist_cpu.yaml", ["method=simmim", "simmim.norm_pix=false"]),
    "ConMIM": ("conmim_fmnist_cpu.yaml", []),
    "ConMIM, both views weak": ("conmim_fmnist_cpu.yaml", ["conmim.teacher_view=none"]),
    "ConMIM, no EMA": ("conmim_fmnist_cpu.yaml", ["conmim.momentum=0", "conmim.momentum_final=0"]),
    "MoCo v3": ("mocov3_fmnist_cpu.yaml", []),
    "MimCo (MoCo v3 teacher)": ("mimco_fmnist_cpu.yaml", []),
}
# evaluated row -> (pre-training row whose checkpoint it reads, encoder, fresh weights?). Random init: that run's
# architecture with fresh weights (MoCo v3's differs: fixed sin-cos position embedding, frozen patch projection).
# ConMIM and MoCo v3 are evaluated by their EMA teacher, as the references fine-tune it; "ConMIM, student" shows
# what the online network learned in the same run.
EVALS: dict[str, tuple[str, str, bool]] = {
    "random init": ("ConMIM", "teacher", True),
    "SimMIM": ("SimMIM", "student", False),
    "SimMIM, raw pixels": ("SimMIM, raw pixels", "student", False),
    "ConMIM": ("ConMIM", "teacher", False),
    "ConMIM, student": ("ConMIM", "student", False),
    "ConMIM, both views weak": ("ConMIM, both views weak", "teacher", False),
    "ConMIM, no EMA": ("ConMIM, no EMA", "teacher", False),
    "random init, MoCo v3 architecture": ("MoCo v3", "teacher", True),
    "MoCo v3": ("MoCo v3", "teacher", False),
    "MimCo (MoCo v3 teacher)": ("MimCo (MoCo v3 teacher)", "student", False),
}
SLUG = {name: name.split(" (")[0].lower().replace(", ", "-").replace(" ", "-") for name in EVALS}


def budget(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(subset=4000, epochs=1, knn_train=4000, knn_test=1000, ft_subset=2000, ft_epochs=1,
                    lin_epochs=20, seeds=[0])
    return dict(subset=20000, epochs=2, knn_train=20000, knn_test=10000, ft_subset=10000, ft_epochs=3,
                lin_epochs=30, seeds=[0, 1, 2])


def pretrain_overrides(b: dict[str, Any], seed: int, out: Path) -> list[str]:
    return [f"data.subset={b['subset']}", f"train.epochs={b['epochs']}", f"train.seed={seed}",
            f"train.out_dir={out}", "monitor.every_epochs=0", "train.progress=false", "train.tensorboard=false",
            "data.root=" + fmnist_root()]


@functools.cache
def fmnist_root() -> str:
    return subprocess.run(["bash", str(REPO / "scripts" / "get_fashion_mnist.sh")], capture_output=True,
                          text=True, check=True).stdout.strip().splitlines()[-1]


def run_pretrain(recipe: str, overrides: list[str], out: Path, log) -> dict[str, Any]:
    summary_path = out / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        if s["steps"] == s["total_steps"]:
            return s
    cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(CONFIGS / recipe), *overrides]
    log(f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pre-training failed ({recipe} {overrides}):\n{r.stderr[-3000:]}")
    s = json.loads(summary_path.read_text())
    s["wall_seconds"] = time.perf_counter() - t0
    summary_path.write_text(json.dumps(s, indent=2))
    return s


# The pooled feature each method trains (MoCo v3 and MimCo's image loss train the CLS token; ConMIM and SimMIM
# train patch tokens, and their references fine-tune with mean pooling). k-NN and the linear probe are run on
# both features for every row, so that every comparison can also be made like for like.
FEATURE = {name: ("cls" if name.startswith(("MoCo", "MimCo")) else "mean") for name in EVALS}
METRICS = ["knn_mean", "knn_cls", "linear_mean", "linear_cls", "finetune"]


def evaluate(ckpt: Path, b: dict[str, Any], seed: int, random_init: bool, encoder: str) -> dict[str, float]:
    from cmim.eval.run import open_source, run_eval

    common = [f"encoder={encoder}", f"seed={seed}", "data.root=" + fmnist_root(), "data.subset=null"]
    if random_init:
        common.append("init=random")
    out: dict[str, float] = {}
    recipe = CONFIGS / "eval_fmnist_cpu.yaml"
    for feature in ("mean", "cls"):
        # one encoder and config for both probes; the features are extracted once (the linear probe reads the
        # k-NN's feature cache)
        src, cfg = open_source(ckpt, recipe, [*common, f"feature={feature}", f"train_subset={b['knn_train']}",
                                              f"test_subset={b['knn_test']}", f"linear.epochs={b['lin_epochs']}"])
        out[f"knn_{feature}"] = run_eval("knn", src, cfg, write=False)["top1"]
        out[f"linear_{feature}"] = run_eval("linear", src, cfg, write=False)["top1"]
    ft_ov = [*common, f"train_subset={b['ft_subset']}", f"test_subset={b['knn_test']}",
             f"finetune.epochs={b['ft_epochs']}"]
    src, cfg = open_source(ckpt, CONFIGS / "finetune_fmnist_cpu.yaml", ft_ov)
    out["finetune"] = run_eval("finetune", src, cfg, write=False)["top1"]
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def verdict(a: list[float], b: list[float]) -> tuple[str, float, float]:
    """(verdict, gap, 2·SE): 'held' when mean(a) - mean(b) exceeds twice its standard error, 'did not hold' when
    it is that far the other way, else 'inconclusive' (always, with a single seed)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gap = ma - mb
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b)) if len(a) > 1 and len(b) > 1 else 0.0
    if se == 0.0:
        return ("inconclusive (one seed)" if min(len(a), len(b)) < 2 else "inconclusive"), gap, 0.0
    if gap > 2 * se:
        return "held", gap, 2 * se
    if gap < -2 * se:
        return "did not hold", gap, 2 * se
    return "inconclusive", gap, 2 * se


LABEL = {"knn_mean": "k-NN, mean", "knn_cls": "k-NN, CLS", "linear_mean": "linear, mean",
         "linear_cls": "linear, CLS", "finetune": "fine-tune"}


def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.45 * len(names) + 1.6))
    for ax, metric in zip(axes, METRICS):
        means = [mean_std(results[n][metric])[0] if results[n][metric] else 0 for n in names]
        stds = [mean_std(results[n][metric])[1] if results[n][metric] else 0 for n in names]
        ax.barh(names, means, xerr=stds, color=["#999" if n.startswith("random") else "#4c72b0" for n in names])
        lo = min(m for m in means if m > 0) - 5
        ax.set_xlim(max(0, lo), min(100, max(m + s for m, s in zip(means, stds)) + 4))
        ax.set_title(f"{LABEL[metric]} top-1 (%)")
        ax.invert_yaxis()
        if ax is not axes[0]:
            ax.set_yticklabels([])
        for i, (m, sd) in enumerate(zip(means, stds)):
            ax.text(m + sd + 0.2, i, f"{m:.1f}", va="center", fontsize=8)
    fig.suptitle("Fashion-MNIST, equal pre-training epochs, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (claim, its source, row a, row b, metrics): "a beats b" on each metric
CLAIMS = [
    ("ConMIM beats pixel MIM (SimMIM)", "ConMIM Tab. 1", "ConMIM", "SimMIM",
     ["finetune", "knn_mean", "linear_mean"]),
    ("The strong teacher view helps", "ConMIM ablation", "ConMIM", "ConMIM, both views weak",
     ["finetune", "knn_mean", "linear_mean"]),
    ("The slowly progressing (EMA) teacher helps", "ConMIM ablation", "ConMIM", "ConMIM, no EMA",
     ["finetune", "knn_mean", "linear_mean"]),
    ("A contrastive teacher makes MIM features more linearly separable", "MimCo", "MimCo (MoCo v3 teacher)",
     "SimMIM", ["linear_cls", "linear_mean", "knn_cls", "knn_mean"]),
    ("MimCo's student ends above its contrastive teacher", "MimCo", "MimCo (MoCo v3 teacher)", "MoCo v3",
     ["finetune", "linear_cls", "knn_cls"]),
    ("Sanity: ConMIM pre-training beats random init", "-", "ConMIM", "random init",
     ["finetune", "knn_mean", "linear_mean"]),
    ("Sanity: SimMIM pre-training beats random init", "-", "SimMIM", "random init",
     ["finetune", "knn_mean", "linear_mean"]),
    ("Sanity: MoCo v3 pre-training beats random init of its architecture", "-", "MoCo v3",
     "random init, MoCo v3 architecture", ["finetune", "knn_cls", "linear_cls"]),
    ("Raw-pixel targets do better than normalized ones (our check)", "-", "SimMIM, raw pixels", "SimMIM",
     ["finetune", "knn_mean", "linear_mean"]),
]


def write_results(results, timing, b, args, spent: dict[str, float], out_md: Path, notes: Path) -> None:
    n_seeds = max(len(r["finetune"]) for r in results.values())
    total = (spent["pretrain"] + spent["eval"]) / 60
    lines = ["# Small-scale study: does contrast help MIM? (Fashion-MNIST, CPU)", ""]
    lines += [f"Made by `python benchmarks/study.py{' --quick' if args.quick else ''}` on {machine()}: "
              f"{n_seeds} of {len(b['seeds'])} seeds, {total:.0f} min in all ({spent['pretrain'] / 60:.0f} min "
              f"pre-training, {spent['eval'] / 60:.0f} min evaluation; wall-clock of each run, summed).", ""]
    steps = b["subset"] * b["epochs"] // 256
    lines += [f"**Budget: equal epochs** for every method: {b['epochs']} epochs over the first {b['subset']} "
              f"Fashion-MNIST training images ({steps} steps of 256), the same backbone (ViT, 128 wide, 4 blocks, "
              f"4 heads, 4 px patches on 28x28), batch, masking (random 50%) and AdamW; each method's own recipe "
              f"for the rest (`configs/*_fmnist_cpu.yaml`). Seeds {b['seeds']} (seed = pre-training seed = "
              f"evaluation seed). Evaluation on the test split: k-NN (k=20, {b['knn_train']} train / "
              f"{b['knn_test']} test images) and linear probe (BN + linear on cached features, {b['lin_epochs']} "
              f"epochs), each on the mean of the patch tokens and on the CLS token; fine-tuning "
              f"({b['ft_epochs']} epochs on {b['ft_subset']} train images, `configs/finetune_fmnist_cpu.yaml`: "
              f"mean pooling, Mixup, RandAugment, layer decay; {b['knn_test']} test images). The evaluated "
              f"encoder is the EMA teacher for ConMIM and MoCo v3 (what the references fine-tune) and the student "
              f"for SimMIM and MimCo; the row *ConMIM, student* evaluates the ConMIM run's student. The feature "
              f"each method trains is in **bold**.", ""]
    lines += ["| method | " + " | ".join(LABEL[m] for m in METRICS) + " | pre-train img/s | pre-train time (s) |",
              "|---" * (len(METRICS) + 3) + "|"]
    for name, r in results.items():
        t = timing.get(name, {})
        cells = []
        for m in METRICS:
            cell = fmt(r[m])
            bold = m.endswith(FEATURE[name]) and cell != "-" and not name.startswith("random")
            cells.append(f"**{cell}**" if bold else cell)
        secs = fmt(t.get("seconds", []), 0)
        if name.startswith("MimCo") and t.get("teacher_seconds"):
            secs += f" (+ teacher {fmt(t['teacher_seconds'], 0)})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(t.get('img_per_s', []), 0)} | {secs} |")
    lines += ["", "![study](study.png)", "", "## The papers' claims at this scale", ""]
    lines += ["| claim [source] | rows compared (a vs b) | metric | a | b | gap | 2·SE | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for text, source, a, bname, metrics in CLAIMS:
        for m in metrics:
            if results.get(a, {}).get(m) and results.get(bname, {}).get(m):
                v, gap, two_se = verdict(results[a][m], results[bname][m])
                lines.append(f"| {text} [{source}] | {a} vs {bname} | {LABEL[m]} | {fmt(results[a][m])} | "
                             f"{fmt(results[bname][m])} | {gap:+.2f} | {two_se:.2f} | *{v}* |")
    lines += ["", "Verdict rule, per metric: *held* when the mean gap over seeds exceeds twice its standard error "
              "(unpaired), *did not hold* when it is that far the other way, otherwise *inconclusive*.", ""]
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += ["## Raw numbers", "", "```json", json.dumps({"results": results, "timing": timing, "budget": b},
                                                          indent=1), "```", ""]
    out_md.write_text("\n".join(lines))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, tiny budget (~5 min on 2 cores)")
    ap.add_argument("--work", type=Path, default=None, help="run directory (default benchmarks/study_runs, "
                    "or /tmp/cmim_study_quick with --quick)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--results", type=Path, default=None, help="markdown output (default benchmarks/RESULTS.md; "
                    "--quick: <work>/RESULTS.md)")
    args = ap.parse_args()
    b = budget(args.quick)
    if args.seeds:
        b["seeds"] = args.seeds
    work = args.work or (Path("/tmp/cmim_study_quick") if args.quick else REPO / "benchmarks" / "study_runs")
    out_md = args.results or (work / "RESULTS.md" if args.quick else REPO / "benchmarks" / "RESULTS.md")
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "study.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    t_start = time.perf_counter()
    results = {name: {m: [] for m in METRICS} for name in EVALS}
    timing: dict[str, dict[str, list[float]]] = {name: {} for name in ROWS}
    spent = {"pretrain": 0.0, "eval": 0.0}  # seconds, summed over the runs (reused ones included)
    for seed in b["seeds"]:
        ckpts: dict[str, Path] = {}
        for name, (recipe, extra) in ROWS.items():
            out = work / f"seed{seed}" / SLUG[name]
            ov = pretrain_overrides(b, seed, out) + extra
            if name.startswith("MimCo"):
                ov.append(f"mimco.teacher={ckpts['MoCo v3']}")
            s = run_pretrain(recipe, ov, out, log)
            spent["pretrain"] += s.get("wall_seconds", s["train_seconds"])
            ckpts[name] = out / "checkpoint.pt"
            timing[name].setdefault("img_per_s", []).append(s["img_per_s"])
            timing[name].setdefault("seconds", []).append(s["train_seconds"])
            log(f"seed {seed} {name}: pre-trained {s['steps']} steps, {s['img_per_s']:.0f} img/s, "
                f"{s['train_seconds']:.0f} s")
        timing["MimCo (MoCo v3 teacher)"].setdefault("teacher_seconds", []).append(timing["MoCo v3"]["seconds"][-1])
        for name, (source, encoder, random_init) in EVALS.items():
            cache = work / f"seed{seed}" / f"eval-{SLUG[name]}.json"
            res = json.loads(cache.read_text()) if cache.exists() else None
            if res is None or not set(METRICS) <= set(res):
                t0 = time.perf_counter()
                res = evaluate(ckpts[source], b, seed, random_init, encoder)
                res["seconds"] = time.perf_counter() - t0
                cache.write_text(json.dumps(res))
                log(f"seed {seed} {name}: {res} ({res['seconds']:.0f} s)")
            for k in METRICS:
                results[name][k].append(res[k])
            spent["eval"] += res.get("seconds", 0.0)
        # write after every seed, so a partial study still leaves a table
        plot(results, out_md.parent / "study.png")
        write_results(results, timing, b, args, spent, out_md, REPO / "benchmarks" / "study_notes.md")
        log(f"seed {seed} done; wrote {out_md}")
    log(f"study finished in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
