"""The designs: which rows are pre-trained and evaluated, with which recipes, on which metrics, and which claims
are judged. One design per dataset.

Edit these tables; the runner, the records and the report follow them (the one row they know by name is
"random init", whose sanity claims a design may ask for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BENCH = REPO / "benchmarks"

# EvalRow.feature / Metric.feature: no fixed pooled feature, but the global feature (CLS or the mean of the patch
# tokens) that scores best on a validation part of the training split, chosen per row and seed (runner.py)
CHOSEN = "chosen"
GLOBAL_FEATURES = ("cls", "mean")  # the candidates, in the order a tie is broken

Kind = Literal["pixels", "random", "scratch", "pretrained"]


class StudyError(Exception):
    """A problem the study reports in one line and stops on."""


def slug(name: str) -> str:
    return name.lower().replace(", ", "-").replace(" ", "-")


def rel(p: Path | str) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class PretrainRow:
    """One pre-training run per seed: a recipe under configs/ plus overrides. A row with ``teacher`` gets
    ``mimco.teacher=<that seed's checkpoint of the teacher row>``."""

    recipe: str
    extra: tuple[str, ...] = ()
    teacher: str | None = None


@dataclass(frozen=True)
class EvalRow:
    """One row of the tables. ``kind``: "pretrained" (``pretrain_row``'s checkpoint, its ``encoder``),
    "random" (that row's recipe architecture with fresh weights), "scratch" (the same, fine-tuned with labels:
    supervised from scratch), "pixels" (no encoder: the normalized, flattened images). ``feature``: the pooled
    feature k-NN and the linear probe read (mean | cls | gridG | CHOSEN), None for pixels and scratch."""

    pretrain_row: str | None
    encoder: str | None
    feature: str | None
    kind: Kind


@dataclass(frozen=True)
class Metric:
    """``protocol`` of `cmim eval` with a recipe under configs/ and overrides. ``feature`` replaces the row's
    (e.g. CHOSEN). A ``backfill`` metric joined the design after its rows were pre-trained: it is computed where
    a row's checkpoint is in --work, and its absence never makes the study pre-train a row again."""

    protocol: str
    recipe: str
    extra: tuple[str, ...]
    label: str
    feature: str | None = None
    backfill: bool = False

    @property
    def probe(self) -> bool:
        """A probe of frozen features (k-NN, linear), which read a feature; a fine-tune mean-pools its own."""
        return self.protocol != "finetune"


@dataclass(frozen=True)
class Claim:
    """"``a`` beats ``b`` by more than ``margin`` points" on each metric (two-standard-error verdict)."""

    text: str
    source: str
    a: str
    b: str
    metrics: tuple[str, ...]
    margin: float = 0.0


@dataclass(frozen=True)
class LimitClaim:
    """"``row``'s pre-training (with its teacher's) takes at most ``minutes``", on every seed."""

    text: str
    source: str
    row: str
    minutes: float


@dataclass(frozen=True)
class Texts:
    """What the report says about a design that the tables cannot."""

    title: str
    quick_note: str
    pretrain_intro: str
    eval_intro: str
    probe_note: str  # format fields: {probed}, {random_feature}, {ft_low_steps}
    root_var: str  # how commands print the data directory
    root_note: str  # format field: {root}
    plot_title: str


@dataclass(frozen=True)
class Design:
    name: str  # --dataset, and "dataset" in the results JSON
    data: Literal["fashion-mnist", "clipart"]  # where the runs read (data.py)
    command: str  # what RESULTS says made it
    pretrain: dict[str, PretrainRow]
    ablations: dict[str, PretrainRow]
    evals: dict[str, EvalRow]
    eval_ablations: dict[str, EvalRow]
    metrics: dict[str, Metric]
    kind_metrics: dict[str, list[str]]  # which metrics each kind of row gets
    claims: list[Claim | LimitClaim]
    texts: Texts
    records: Path  # default --records (committed)
    work: Path  # default --work (ignored by git)
    quick_work: Path
    results_md: str  # output names, beside each other in benchmarks/ (--quick: in the work dir)
    results_json: str
    plot: str
    notes: Path | None = None  # appended to the RESULTS page
    quick_recipes: dict[str, str] = field(default_factory=dict)  # --quick: recipe -> the one it stands in for
    quick_pretrain: tuple[str, ...] = ()
    quick_eval: tuple[str, ...] = ()
    quick_ft: tuple[str, ...] = ()
    ft_common: tuple[str, ...] = ()  # every fine-tune
    scratch: tuple[str, ...] = ()  # from scratch
    ft_low_steps: int = 0
    # "pre-training beats random init" (knn, linear) for every main row of random init's architecture and feature
    random_init_claims: bool = False

    def label(self, metric: str) -> str:
        return self.metrics[metric].label


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (the default)
# ---------------------------------------------------------------------------------------------------------------

# the pooled feature each row is probed on (k-NN, linear): mean | cls | gridG (e.g. grid2). One for every row,
# so rows compare like for like: grid4 = the whole 4x4 patch-token map (16 x 192 values), which keeps the layout
# a global mean discards. Chosen on a validation split of the training set (k-NN, train[:50k] -> train[50k:]),
# seed 0's ConMIM teacher and MimCo student, over mean / cls / grid2 / grid3 / grid4 of the last block: grid4 was
# best for both (benchmarks/study_notes.md); the test split played no part.
FMNIST_FEATURE = "grid4"
# optimizer steps of the 1% and 10% label fine-tunes, the same for the pre-trained rows and from scratch
FMNIST_FT_LOW_STEPS = 500

FMNIST = Design(
    name="fashion-mnist",
    data="fashion-mnist",
    command="python benchmarks/study.py",
    pretrain={
        "ConMIM": PretrainRow("conmim_fmnist_30min.yaml"),
        "MoCo v3": PretrainRow("mocov3_fmnist_30min.yaml"),
        "MimCo": PretrainRow("mimco_fmnist_30min.yaml", teacher="MoCo v3"),
        "SimMIM": PretrainRow("conmim_fmnist_30min.yaml", ("method=simmim",)),
    },
    ablations={
        "ConMIM, both views weak": PretrainRow("conmim_fmnist_30min.yaml", ("conmim.teacher_view=none",)),
        "ConMIM, no EMA": PretrainRow("conmim_fmnist_30min.yaml", ("conmim.momentum=0", "conmim.momentum_final=0")),
    },
    evals={
        "raw pixels": EvalRow(None, None, None, "pixels"),
        "random init": EvalRow("ConMIM", "teacher", FMNIST_FEATURE, "random"),
        "supervised from scratch": EvalRow("ConMIM", None, None, "scratch"),
        "ConMIM": EvalRow("ConMIM", "teacher", FMNIST_FEATURE, "pretrained"),
        "MoCo v3": EvalRow("MoCo v3", "teacher", FMNIST_FEATURE, "pretrained"),
        "MimCo": EvalRow("MimCo", "student", FMNIST_FEATURE, "pretrained"),
        "SimMIM": EvalRow("SimMIM", "student", FMNIST_FEATURE, "pretrained"),
    },
    eval_ablations={
        "ConMIM, both views weak": EvalRow("ConMIM, both views weak", "teacher", FMNIST_FEATURE, "pretrained"),
        "ConMIM, no EMA": EvalRow("ConMIM, no EMA", "teacher", FMNIST_FEATURE, "pretrained"),
    },
    # all on the full split (data.subset=null, no train_subset / test_subset); the linear probes read the k-NN's
    # cached features
    metrics={
        "knn": Metric("knn", "eval_fmnist_cpu.yaml", (), "k-NN (k=20)"),
        # k-NN on a global feature chosen per row on a validation part of the training split (added after the
        # 3-seed runs: a sitting with their checkpoints in --work fills it in, or `--rerun-lost` re-makes the lost
        # ones for it); raw pixels: the pixels themselves
        "knn_global": Metric("knn", "eval_fmnist_cpu.yaml", (), "k-NN (k=20), global feature", feature=CHOSEN,
                             backfill=True),
        "linear": Metric("linear", "eval_fmnist_cpu.yaml", (), "linear"),
        "linear_1pct": Metric("linear", "eval_fmnist_cpu.yaml", ("label_fraction=0.01",), "linear, 1% labels"),
        "finetune": Metric("finetune", "finetune_fmnist_cpu.yaml", (), "fine-tune"),
        "finetune_1pct": Metric("finetune", "finetune_fmnist_cpu.yaml",
                                ("label_fraction=0.01", f"finetune.steps={FMNIST_FT_LOW_STEPS}"),
                                "fine-tune, 1% labels"),
        "finetune_10pct": Metric("finetune", "finetune_fmnist_cpu.yaml",
                                 ("label_fraction=0.1", f"finetune.steps={FMNIST_FT_LOW_STEPS}"),
                                 "fine-tune, 10% labels"),
    },
    # random init gets no fine-tune: that is "supervised from scratch"
    kind_metrics={
        "pixels": ["knn", "linear", "linear_1pct", "knn_global"],
        "random": ["knn", "linear", "linear_1pct", "knn_global"],
        "scratch": ["finetune", "finetune_1pct", "finetune_10pct"],
        "pretrained": ["knn", "knn_global", "linear", "linear_1pct", "finetune", "finetune_1pct", "finetune_10pct"],
    },
    # A claim whose rows have no data (e.g. ablations not run) is left out.
    claims=[
        Claim("ConMIM beats raw pixels", "issue #10", "ConMIM", "raw pixels", ("knn", "linear")),
        Claim("ConMIM beats supervised from scratch", "issue #10", "ConMIM", "supervised from scratch",
              ("finetune", "finetune_1pct", "finetune_10pct")),
        Claim("ConMIM beats supervised from scratch by > 5 points with 1% of the labels", "issue #10", "ConMIM",
              "supervised from scratch", ("finetune_1pct",), 5.0),
        Claim("MimCo beats raw pixels", "issue #10", "MimCo", "raw pixels", ("knn", "linear")),
        Claim("MimCo's global feature beats raw pixels", "real-folders issue", "MimCo", "raw pixels",
              ("knn_global",)),
        Claim("MimCo beats supervised from scratch", "issue #10", "MimCo", "supervised from scratch",
              ("finetune", "finetune_1pct", "finetune_10pct")),
        Claim("MimCo beats supervised from scratch by > 5 points with 1% of the labels", "issue #10", "MimCo",
              "supervised from scratch", ("finetune_1pct",), 5.0),
        Claim("ConMIM beats pixel MIM (SimMIM)", "ConMIM Tab. 1", "ConMIM", "SimMIM", ("knn", "linear", "finetune")),
        Claim("MimCo's student is more linearly separable than SimMIM's", "MimCo", "MimCo", "SimMIM", ("linear",)),
        Claim("MimCo's student ends above its MoCo v3 teacher", "MimCo", "MimCo", "MoCo v3",
              ("knn", "linear", "finetune")),
        Claim("The strong teacher view helps", "ConMIM ablation", "ConMIM", "ConMIM, both views weak",
              ("knn", "linear", "finetune")),
        Claim("The slowly progressing (EMA) teacher helps", "ConMIM ablation", "ConMIM", "ConMIM, no EMA",
              ("knn", "linear", "finetune")),
    ],
    random_init_claims=True,
    texts=Texts(
        title="# Does self-supervised pre-training pay off at CPU scale? (Fashion-MNIST, 2 CPU cores)",
        quick_note="(CPU recipes on 2000 images for one epoch, 2000 / 1000 eval images, 20 fine-tune steps)",
        pretrain_intro="Pre-training (one run per row and seed; `train.seed` = the seed; MimCo's teacher is the "
                       "MoCo v3 checkpoint of the same seed):",
        eval_intro="Evaluation on the test split (10k images) after training on the train split (60k), full split "
                   "unless a label share is given (class-balanced, drawn with the seed, the same images for every "
                   "row):",
        probe_note="Encoders and probed features (k-NN, linear; fine-tuning mean-pools the patch tokens): {probed}. "
                   "Baselines: *raw pixels* = the normalized, flattened image as the feature (same protocol); "
                   "*random init* = ConMIM's architecture with fresh weights (seeded), probed on {random_feature} "
                   "features; *supervised from scratch* = that architecture fine-tuned from fresh weights with "
                   "the same fine-tune recipe and budget (`finetune.layer_decay=1.0`). The 1% and 10% fine-tunes "
                   "all take {ft_low_steps} optimizer steps. `pretrain_minutes` is the training time of the "
                   "row's run (MimCo: plus its MoCo v3 teacher's; `pretrain_minutes_own` without it), from each "
                   "run's summary (or its metrics log when it was resumed); in results.json it is given as "
                   "{{mean, std, values}} like the metrics.",
        root_var="$FMNIST",
        root_note="`$FMNIST` is the Fashion-MNIST directory (`scripts/get_fashion_mnist.sh` prints it; here "
                  "`{root}`).",
        plot_title="Fashion-MNIST, mean ± std over seeds; dashed: raw pixels (probes), supervised from scratch "
                   "(fine-tunes)",
    ),
    records=BENCH / "study_records",
    work=BENCH / "study_runs",
    quick_work=Path("/tmp/cmim_study_quick"),
    results_md="RESULTS.md",
    results_json="results.json",
    plot="study.png",
    notes=BENCH / "study_notes.md",
    quick_recipes={
        "conmim_fmnist_30min.yaml": "conmim_fmnist_cpu.yaml",
        "mocov3_fmnist_30min.yaml": "mocov3_fmnist_cpu.yaml",
        "mimco_fmnist_30min.yaml": "mimco_fmnist_cpu.yaml",
    },
    quick_pretrain=("data.subset=2000", "train.epochs=1"),
    # small eval subsets and a few fine-tune steps, so the smoke run stays at a few minutes on 2 cores
    quick_eval=("train_subset=2000", "test_subset=1000", "linear.epochs=20"),
    quick_ft=("finetune.max_steps=20",),
    # the test split is scored once, at the end (the 1%-label runs cycle their 600 images for 125 short epochs
    # and would otherwise be tested after each); the final number is the same
    ft_common=("finetune.eval_every_epochs=0",),
    # layer decay only protects pre-trained layers
    scratch=("finetune.layer_decay=1.0",),
    ft_low_steps=FMNIST_FT_LOW_STEPS,
)

# ---------------------------------------------------------------------------------------------------------------
# A real folder: Debian's clip-art (--dataset openclipart)
# ---------------------------------------------------------------------------------------------------------------

CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_MIN_IMAGES = 20  # top-level categories with fewer images are dropped (too few to hold 20% out)
VAL_FRACTION = 0.2  # data.val_fraction of every run; data.split_seed = the seed
# optimizer steps of the 10% label fine-tunes (about 720 labeled images), the same for every row: about as many
# as the full fine-tune's (configs/finetune_folder_cpu.yaml: 4 epochs of ~7.2k images at batch 128, 224 steps)
CLIPART_FT_LOW_STEPS = 200
SOURCE = "real-folders issue"

CLIPART = Design(
    name="openclipart",
    data="clipart",
    command="python benchmarks/study.py --dataset openclipart",
    pretrain={
        "ConMIM": PretrainRow("conmim_folder_cpu.yaml"),
        "MoCo v3": PretrainRow("mocov3_folder_cpu.yaml"),
        "MimCo": PretrainRow("mimco_folder_cpu.yaml", teacher="MoCo v3"),
        "SimMIM": PretrainRow("conmim_folder_cpu.yaml", ("method=simmim",)),
    },
    ablations={},
    evals={
        "raw pixels": EvalRow(None, None, None, "pixels"),
        "random init": EvalRow("ConMIM", "teacher", CHOSEN, "random"),
        "supervised from scratch": EvalRow("ConMIM", None, None, "scratch"),
        "ConMIM": EvalRow("ConMIM", "teacher", CHOSEN, "pretrained"),
        "MoCo v3": EvalRow("MoCo v3", "teacher", CHOSEN, "pretrained"),
        "MimCo": EvalRow("MimCo", "student", CHOSEN, "pretrained"),
        "SimMIM": EvalRow("SimMIM", "student", CHOSEN, "pretrained"),
    },
    eval_ablations={},
    metrics={
        "knn": Metric("knn", "eval_folder_cpu.yaml", (), "k-NN (k=20)"),
        "linear": Metric("linear", "eval_folder_cpu.yaml", (), "linear"),
        "linear_10pct": Metric("linear", "eval_folder_cpu.yaml", ("label_fraction=0.1",), "linear, 10% labels"),
        "finetune": Metric("finetune", "finetune_folder_cpu.yaml", (), "fine-tune"),
        "finetune_10pct": Metric("finetune", "finetune_folder_cpu.yaml",
                                 ("label_fraction=0.1", f"finetune.steps={CLIPART_FT_LOW_STEPS}"),
                                 "fine-tune, 10% labels"),
    },
    kind_metrics={
        "pixels": ["knn", "linear", "linear_10pct"],
        "random": ["knn", "linear", "linear_10pct"],
        "scratch": ["finetune", "finetune_10pct"],
        "pretrained": ["knn", "linear", "linear_10pct", "finetune", "finetune_10pct"],
    },
    claims=[
        *(c for row in ("ConMIM", "MimCo") for c in (
            Claim(f"{row} beats raw pixels", SOURCE, row, "raw pixels", ("knn", "linear")),
            Claim(f"{row} beats random init by > 5 points", SOURCE, row, "random init", ("knn", "linear"), 5.0),
            Claim(f"{row} fine-tuned beats supervised from scratch", SOURCE, row, "supervised from scratch",
                  ("finetune", "finetune_10pct")),
            Claim(f"{row} beats supervised from scratch by > 5 points with 10% of the labels", SOURCE, row,
                  "supervised from scratch", ("finetune_10pct",), 5.0),
        )),
        LimitClaim("ConMIM pre-trains in at most 30 min", SOURCE, "ConMIM", 30.0),
        LimitClaim("MimCo pre-trains in at most 30 min, its MoCo v3 teacher included", SOURCE, "MimCo", 30.0),
    ],
    texts=Texts(
        title="# Does self-supervised pre-training pay off on a real folder? (Debian's clip-art, 2 CPU cores)",
        quick_note="(the recipes on 600 images for one epoch, 600 / 300 eval images, 5 fine-tune steps of 32 "
                   "images)",
        pretrain_intro="Pre-training (one run per row and seed; `train.seed` = the seed, and the folder split "
                       f"`data.val_fraction={VAL_FRACTION}` `data.split_seed` = the seed; MimCo's teacher is the "
                       "MoCo v3 checkpoint of the same seed):",
        eval_intro=f"Evaluation on the held-out part of the folder (`data.val_fraction={VAL_FRACTION}`, "
                   "`data.split_seed` = the seed; near-duplicate files are kept on one side, `data.split_twins`) "
                   "after training on the rest, all of it unless a label share is given (class-balanced, drawn "
                   "with the seed, the same images for every row):",
        probe_note="Encoders (fine-tuning mean-pools the patch tokens): {probed}. k-NN and the linear probes read "
                   "a global feature, CLS or the mean of the patch tokens, whichever has the better k-NN on a "
                   "validation part of the training part, chosen per row and seed (table below; the held-out "
                   "part plays no part). Baselines: *raw pixels* = the normalized, flattened image as the "
                   "feature (same protocol); *random init* = ConMIM's architecture with fresh weights (seeded), "
                   "its feature chosen the same way; *supervised from scratch* = that architecture fine-tuned "
                   "from fresh weights with the same fine-tune recipe and budget (`finetune.layer_decay=1.0`). "
                   "The 10% fine-tunes all take {ft_low_steps} optimizer steps. `pretrain_minutes` is the "
                   "training time of the row's run (MimCo: plus its MoCo v3 teacher's; `pretrain_minutes_own` "
                   "without it), from each run's summary (or its metrics log when it was resumed); in "
                   "results_folder.json it is given as {{mean, std, values}} like the metrics.",
        root_var="$CLIPART",
        root_note="`$CLIPART` is the study's folder of category links (here `{root}`), one link per kept "
                  "top-level category of the clip-art (Data, above).",
        plot_title="Debian clip-art, mean ± std over seeds; dashed: raw pixels (probes), supervised from scratch "
                   "(fine-tunes)",
    ),
    records=BENCH / "study_records_folder",
    work=BENCH / "study_runs_folder",
    quick_work=Path("/tmp/cmim_study_quick_folder"),
    results_md="RESULTS_folder.md",
    results_json="results_folder.json",
    plot="study_folder.png",
    quick_pretrain=("data.subset=600", "train.epochs=1"),
    quick_eval=("train_subset=600", "test_subset=300", "linear.epochs=20"),
    quick_ft=("finetune.max_steps=5", "finetune.batch_size=32"),  # a 64 px step costs ~4x a Fashion-MNIST one
    ft_common=("finetune.eval_every_epochs=0",),
    scratch=("finetune.layer_decay=1.0",),
    ft_low_steps=CLIPART_FT_LOW_STEPS,
)

DESIGNS: dict[str, Design] = {d.name: d for d in (FMNIST, CLIPART)}
