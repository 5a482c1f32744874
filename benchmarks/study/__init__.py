"""Study: does self-supervised pre-training pay off at CPU scale, and do the papers' claims hold?

Two designs (design.py), one machinery. Fashion-MNIST (the default): pre-training rows ConMIM, MoCo v3, MimCo
(student of that seed's MoCo v3 teacher) and SimMIM, each with its own <= 30-minute CPU recipe; with --ablations
also ConMIM with both views weak and ConMIM without EMA. Evaluation rows: those encoders, plus three baselines
that need no pre-training: raw pixels, random init and supervised from scratch. Metrics, all on the full
60k / 10k split: k-NN (k=20), linear probe, linear probe on 1% of the labels, fine-tune on all labels
(3 epochs), and fine-tunes on 1% and 10% of the labels at an equal optimizer-step budget for the pre-trained
rows and from scratch; knn_global (k-NN on a global feature chosen on a validation part of the training split)
is filled in by a sitting that has the checkpoints in --work. Claims are judged per metric with a
two-standard-error rule over seeds. --dataset openclipart: the same rows on a real folder (below).

    python benchmarks/study.py                      # full study, seeds 0 1 2 -> benchmarks/RESULTS.md,
                                                    #   benchmarks/results.json, benchmarks/study.png
    python benchmarks/study.py --ablations          # also the two ConMIM ablation rows (and their claims)
    python benchmarks/study.py --rows ConMIM "raw pixels"   # only these rows this sitting (MimCo brings its
                                                    #   MoCo v3 teacher's pre-training); the rest stays in --work
    python benchmarks/study.py --rows               # run nothing: rewrite the outputs from what --records holds
    python benchmarks/study.py --quick              # smoke run: the *_fmnist_cpu recipes on 2000 images, small
                                                    #   eval subsets, one seed; outputs in /tmp/cmim_study_quick
    nohup python benchmarks/study.py > /tmp/study.out 2>&1 &      # the way to run the full study (hours)
    python benchmarks/study.py --dataset openclipart              # the folder study (below)
    python -m benchmarks.study ...                  # the same, from the repository root

Budget: every pre-training row costs up to 30 min per seed (MimCo: its own run plus its MoCo v3 teacher's), so the
four main rows over 3 seeds are up to about 6 h of pre-training on 2 cores, plus the evaluations (each encoder: one
feature extraction of 70k images, the probes, three fine-tunes).

Resuming: runs land in --work (default benchmarks/study_runs, ignored by git: checkpoints, logs, cached features).
A pre-training run that finished is reused; one that was interrupted is continued exactly (`cmim pretrain`
resumes from its last checkpoint, train.resume=auto). What the tables are made of lands in --records (default
benchmarks/study_records, committed, a few KB): each (seed, eval row, metric) result is its own JSON file, reused
while the weights, the recipe and the overrides that made it are unchanged; each finished pre-training run leaves
a record of its checkpoint's sha256, a fingerprint of its config and its training time. So a sitting whose --work
was lost loses no result: a row whose results are all recorded is not pre-trained again, unless a row that
depends on it (MimCo on its MoCo v3 teacher) has to be, in which case both are re-run and re-evaluated (the new
checkpoint has another sha256). A missing backfill metric (knn_global) never re-runs a row: it is computed only
where the row's checkpoint is in --work. Re-invoke the same command after an interruption. A run directory made
with a different pre-training config stops the study with one line rather than being mixed in or overwritten.
Every step is logged with a timestamp to <work>/study.log and stdout.

How to run the folder study. `python benchmarks/study.py --dataset openclipart` (with `nohup ... &`, as above)
pre-trains ConMIM, MoCo v3 then MimCo, and SimMIM on Debian's clip-art (`--clipart-root`, default
/usr/share/openclipart/png; `apt install openclipart-png`) with configs/{conmim,mocov3,mimco}_folder_cpu.yaml
(SimMIM: the ConMIM recipe with method=simmim) for seeds 0 1 2, and scores them against raw pixels, random init
and supervised from scratch: k-NN and linear probe on a global feature (CLS or mean, chosen per row and seed by
k-NN on a validation part of the training part), the linear probe with 10% of the labels, and fine-tuning with
all and 10% of the labels (configs/eval_folder_cpu.yaml, configs/finetune_folder_cpu.yaml). The folder: each
top-level category with at least 20 images becomes a class (a link in <work>/clipart; the dropped ones are
listed in the records' data.json and the RESULTS page), split by cmim itself with data.val_fraction=0.2
data.split_seed=<seed> (near-duplicates on one side). Work in benchmarks/study_runs_folder, records in
benchmarks/study_records_folder (commit them), outputs benchmarks/RESULTS_folder.md, results_folder.json and
study_folder.png. Expected cost on 2 idle cores, an estimate until the first run's RESULTS_folder.md measures
it: 5-8 h. Pre-training stays within the recipes' budgets (ConMIM: 20 epochs of the ~7.2k training images, about
12 min on an idle Zen 5 (benchmarks/study_notes.md, "Real folders"); SimMIM took 3/4 of ConMIM's time on Fashion-MNIST;
MoCo v3 and MimCo together at most 30 min), at most 1 h per seed; the five rows that fine-tune (four encoders and
from scratch) two fine-tunes each, of 224 and 200 steps, about 4-9 min each (scaled from the Fashion-MNIST
fine-tunes' times), and the probed rows the features of ~8k images (a minute each) and the probes (seconds):
1-1.5 h of evaluation per seed. `--quick` runs the same commands on
600 images for one epoch, 5 fine-tune steps (outputs in /tmp/cmim_study_quick_folder): its runs summed to 21 min
on 2 cores shared with two other jobs (2026-12-05). On such a busy machine run it with OMP_NUM_THREADS=1: there a
5-step fine-tune took 284 s with two threads and 24-75 s with one.
"""
