"""Small-scale study on Fashion-MNIST: does contrast help masked image modeling, as the papers claim?

Rows: random init, SimMIM (pixels), ConMIM, ConMIM with both views weak, ConMIM without EMA (teacher =
student under stop-gradient), MoCo v3, MimCo (with that seed's MoCo v3 teacher). Every pre-training run gets
the same budget in *epochs* over the same data subset, the same backbone, batch, masking and optimizer; each
is evaluated by k-NN, a linear probe on cached features and a short fine-tuning run with equal budgets.

    python benchmarks/study.py                 # full study (3 seeds); writes benchmarks/RESULTS.md
    python benchmarks/study.py --quick         # smoke run, <= 15 min on 2 cores; writes to a temp dir
    nohup python benchmarks/study.py > /tmp/study.log 2>&1 &     # the way to run the full study

Runs already finished in --work are reused (each pre-training run resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# row -> (recipe, overrides). Same backbone/data/optimizer everywhere: the ConMIM CPU recipe's.
ROWS: dict[str, tuple[str | None, list[str]]] = {
    "random init": (None, []),
    "SimMIM": ("conmim_fmnist_cpu.yaml", ["method=simmim"]),
    "ConMIM": ("conmim_fmnist_cpu.yaml", []),
    "ConMIM, both views weak": ("conmim_fmnist_cpu.yaml", ["conmim.teacher_view=none"]),
    "ConMIM, no EMA": ("conmim_fmnist_cpu.yaml", ["conmim.momentum=0", "conmim.momentum_final=0"]),
    "MoCo v3": ("mocov3_fmnist_cpu.yaml", []),
    "MimCo (MoCo v3 teacher)": ("mimco_fmnist_cpu.yaml", []),
}
SLUG = {name: name.split(" (")[0].lower().replace(", ", "-").replace(" ", "-") for name in ROWS}


def budget(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(subset=4000, epochs=1, knn_train=4000, knn_test=1000, ft_subset=2000, ft_epochs=1,
                    lin_epochs=20, seeds=[0])
    return dict(subset=10000, epochs=2, knn_train=10000, knn_test=2000, ft_subset=3000, ft_epochs=2,
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


# The pooled feature each row is probed with: the one its method trains (MoCo v3 and MimCo's image loss train
# the CLS token; ConMIM and SimMIM train patch tokens, and their references fine-tune with mean pooling).
FEATURE = {name: ("cls" if name.startswith(("MoCo", "MimCo")) else "mean") for name in ROWS}


def evaluate(ckpt: Path, b: dict[str, Any], seed: int, random_init: bool, encoder: str,
             feature: str) -> dict[str, float]:
    from cmim.eval.run import open_source, run_eval

    common = [f"encoder={encoder}", f"seed={seed}", "data.root=" + fmnist_root(), "data.subset=null",
              f"feature={feature}"]
    if random_init:
        common.append("init=random")
    out: dict[str, float] = {}
    knn_ov = [*common, f"train_subset={b['knn_train']}", f"test_subset={b['knn_test']}"]
    recipe = CONFIGS / "eval_fmnist_cpu.yaml"
    src, cfg = open_source(ckpt, recipe, knn_ov)
    out["knn"] = run_eval("knn", src, cfg, write=False)["top1"]
    src, cfg = open_source(ckpt, recipe, [*knn_ov, f"linear.epochs={b['lin_epochs']}"])
    out["linear"] = run_eval("linear", src, cfg, write=False)["top1"]
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


def verdict(a: list[float], b: list[float], what: str) -> tuple[str, str]:
    """'held' when the mean gap exceeds twice its standard error (and the sign is right), 'did not hold' when
    it is that far the other way, else 'inconclusive'. Returns (verdict, numbers)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gap = ma - mb
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b)) if len(a) > 1 and len(b) > 1 else 0.0
    nums = f"{what}: {ma:.2f} vs {mb:.2f} (gap {gap:+.2f}, 2·SE {2 * se:.2f}, n={len(a)})"
    if se == 0.0:
        return ("inconclusive (one seed)" if abs(gap) > 0 else "inconclusive"), nums
    if gap > 2 * se:
        return "held", nums
    if gap < -2 * se:
        return "did not hold", nums
    return "inconclusive", nums


def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["knn", "linear", "finetune"]
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, metric in zip(axes, metrics):
        means = [mean_std(results[n][metric])[0] if results[n][metric] else 0 for n in names]
        stds = [mean_std(results[n][metric])[1] if results[n][metric] else 0 for n in names]
        ax.barh(names, means, xerr=stds, color=["#999"] + ["#4c72b0"] * (len(names) - 1))
        lo = min(m for m in means if m > 0) - 5
        ax.set_xlim(max(0, lo), min(100, max(means) + 3))
        ax.set_title(f"{metric} top-1 (%)")
        ax.invert_yaxis()
        for i, (m, s) in enumerate(zip(means, stds)):
            ax.text(m + s + 0.2, i, f"{m:.1f}", va="center", fontsize=8)
    fig.suptitle("Fashion-MNIST, equal pre-training epochs, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results, timing, b, args, total_seconds, out_md: Path, notes: Path) -> None:
    lines = ["# Small-scale study: does contrast help MIM? (Fashion-MNIST, CPU)", ""]
    lines += [f"Made by `python benchmarks/study.py{' --quick' if args.quick else ''}` in "
              f"{total_seconds / 60:.1f} min on {machine()}.", ""]
    lines += [f"Budget (equal **epochs** for every method): {b['epochs']} epochs over the first {b['subset']} "
              f"Fashion-MNIST training images, the ConMIM CPU recipe's backbone (ViT, 128 wide, 4 blocks, 4 px "
              f"patches on 28x28), batch, masking and optimizer; seeds {b['seeds']}. Evaluation on the test split: "
              f"k-NN (k=20, {b['knn_train']} train / {b['knn_test']} test images; the EMA teacher for ConMIM and "
              f"MoCo v3, the trained student for SimMIM and MimCo), linear probe (BN + linear on cached features, "
              f"{b['lin_epochs']} epochs), fine-tuning ({b['ft_epochs']} epoch on {b['ft_subset']} images, "
              f"`configs/finetune_fmnist_cpu.yaml`, {b['knn_test']} test images).", ""]
    lines += ["| method | probed feature | k-NN top-1 | linear top-1 | fine-tune top-1 | pre-train img/s | "
              "pre-train time (s) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = timing.get(name, {})
        speed = fmt(t.get("img_per_s", []), 0)
        secs = fmt(t.get("seconds", []), 0)
        if name.startswith("MimCo") and t.get("teacher_seconds"):
            secs += f" (+ teacher {fmt(t['teacher_seconds'], 0)})"
        lines.append(f"| {name} | {FEATURE[name]} | {fmt(r['knn'])} | {fmt(r['linear'])} | {fmt(r['finetune'])} | "
                     f"{speed} | {secs} |")
    lines += ["", "![study](study.png)", "", "## The papers' claims at this scale", ""]
    R = results

    def claim(text: str, a: str, bname: str, metric: str) -> None:
        if R.get(a, {}).get(metric) and R.get(bname, {}).get(metric):
            v, nums = verdict(R[a][metric], R[bname][metric], f"{a} vs {bname}, {metric}")
            lines.append(f"- **{text}** — {v}. {nums}.")

    claim("ConMIM beats pixel MIM (SimMIM) [ConMIM Tab. 1]", "ConMIM", "SimMIM", "finetune")
    claim("ConMIM beats pixel MIM, k-NN", "ConMIM", "SimMIM", "knn")
    claim("ConMIM beats pixel MIM, linear", "ConMIM", "SimMIM", "linear")
    claim("The strong teacher view helps [ConMIM ablation]", "ConMIM", "ConMIM, both views weak", "finetune")
    claim("The strong teacher view helps, k-NN", "ConMIM", "ConMIM, both views weak", "knn")
    claim("The EMA teacher helps [ConMIM ablation]", "ConMIM", "ConMIM, no EMA", "finetune")
    claim("The EMA teacher helps, k-NN", "ConMIM", "ConMIM, no EMA", "knn")
    claim("A contrastive teacher makes MIM features linearly separable [MimCo]", "MimCo (MoCo v3 teacher)",
          "SimMIM", "linear")
    claim("MimCo's student ends above its teacher, fine-tune [MimCo]", "MimCo (MoCo v3 teacher)", "MoCo v3",
          "finetune")
    claim("MimCo's student ends above its teacher, linear", "MimCo (MoCo v3 teacher)", "MoCo v3", "linear")
    claim("Pre-training beats random init (sanity), k-NN", "ConMIM", "random init", "knn")
    lines += ["", "Verdict rule: *held* when the mean gap exceeds twice its standard error over seeds, *did not "
              "hold* when it is that far the other way, otherwise *inconclusive*.", ""]
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
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, tiny budget (<= 15 min on 2 cores)")
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
    results = {name: {"knn": [], "linear": [], "finetune": []} for name in ROWS}
    timing: dict[str, dict[str, list[float]]] = {name: {} for name in ROWS}
    for seed in b["seeds"]:
        ckpts: dict[str, Path] = {}
        for name, (recipe, extra) in ROWS.items():
            if recipe is None:
                continue
            out = work / f"seed{seed}" / SLUG[name]
            ov = pretrain_overrides(b, seed, out) + extra
            if name.startswith("MimCo"):
                ov.append(f"mimco.teacher={ckpts['MoCo v3']}")
            s = run_pretrain(recipe, ov, out, log)
            ckpts[name] = out / "checkpoint.pt"
            timing[name].setdefault("img_per_s", []).append(s["img_per_s"])
            timing[name].setdefault("seconds", []).append(s["train_seconds"])
            log(f"seed {seed} {name}: pre-trained {s['steps']} steps, {s['img_per_s']:.0f} img/s, "
                f"{s['train_seconds']:.0f} s")
        timing["MimCo (MoCo v3 teacher)"].setdefault("teacher_seconds", []).append(timing["MoCo v3"]["seconds"][-1])
        for name in ROWS:
            random_init = name == "random init"
            ckpt = ckpts["ConMIM"] if random_init else ckpts[name]
            encoder = "student" if name.startswith(("SimMIM", "MimCo")) else "teacher"
            cache = work / f"seed{seed}" / f"eval-{SLUG[name]}.json"
            if cache.exists():
                res = json.loads(cache.read_text())
            else:
                t0 = time.perf_counter()
                res = evaluate(ckpt, b, seed, random_init, encoder, FEATURE[name])
                cache.write_text(json.dumps(res))
                log(f"seed {seed} {name}: {res} ({time.perf_counter() - t0:.0f} s)")
            for k, v in res.items():
                results[name][k].append(v)
        # write after every seed, so a partial study still leaves a table
        plot(results, out_md.parent / "study.png")
        write_results(results, timing, b, args, time.perf_counter() - t_start, out_md,
                      REPO / "benchmarks" / "study_notes.md")
        log(f"seed {seed} done; wrote {out_md}")
    log(f"study finished in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
