"""The study (benchmarks/study/) keeps its results in committed records, so a sitting whose work dir is lost
re-runs only what is missing: a run's record names its checkpoint by sha256, MimCo's names its teacher's, and a
result is reused only while the weights, recipe and overrides that made it are unchanged. The fingerprints of the
committed Fashion-MNIST records must survive any change to the study's code."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the study package

from study import runner  # noqa: E402
from study.design import PretrainRow, slug  # noqa: E402

from cmim.core.checkpoint_paths import CHECKPOINT_FILE  # noqa: E402

# the Fashion-MNIST directory the committed records were made with (their commands name it): eval overrides carry
# it, so their fingerprints do; nothing is read from it
RECORDED_FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def study_mod(monkeypatch, tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    monkeypatch.setattr(runner, "fmnist_root", lambda: str(data))
    return runner


def make_study(mod, tmp_path: Path, work: str = "work", **kw):
    args = argparse.Namespace(**{"quick": False, "seeds": [0], "work": tmp_path / work,
                                 "records": tmp_path / "records", "ablations": False, "rows": None, **kw})
    st = mod.Study(args)
    st.work.mkdir(parents=True, exist_ok=True)
    return st


def fake_run(st, row: str, seed: int, payload: bytes) -> None:
    """What a finished `cmim pretrain` leaves in its run dir, as far as the study reads it."""
    from omegaconf import OmegaConf

    from cmim.config import load_config

    out = st.run_dir(row, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT_FILE).write_bytes(payload)
    cfg = load_config(st.recipe(row), st.pretrain_overrides(row, seed))
    OmegaConf.save(cfg, out / "config.yaml")
    steps = 10
    secs = 60.0
    (out / "summary.json").write_text(json.dumps({"steps": steps, "total_steps": steps, "train_seconds": secs,
                                                  "img_per_s": steps * cfg.train.batch_size / secs}))


def fake_results(st, row: str, seed: int, top1: float) -> None:
    for metric in st.metrics_of(row):
        if st.design.metrics[metric].backfill:
            continue
        spec = st.eval_spec(row, metric, seed)
        fp = st.fingerprint(row, spec, seed)
        assert fp is not None
        path = st.result_path(row, metric, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"row": row, "metric": metric, "seed": seed, "top1": top1, "fingerprint": fp,
                                    "seconds": 1.0, "machine": "test"}))


def test_record_outlives_the_work_dir(study_mod, tmp_path):
    st = make_study(study_mod, tmp_path)
    fake_run(st, "ConMIM", 0, b"weights-a")
    sha = st.weights("ConMIM", 0)
    rec = json.loads(st.record_path("ConMIM", 0).read_text())
    assert rec["checkpoint_sha256"] == sha and rec["seconds"] == 60.0 and rec["steps"] == 10
    fake_results(st, "ConMIM", 0, 80.0)
    assert st.complete("ConMIM", 0)

    shutil.rmtree(st.work)  # the sitting ends; only the records are committed
    st2 = make_study(study_mod, tmp_path)
    assert st2.weights("ConMIM", 0) == sha
    assert st2.complete("ConMIM", 0)
    assert not st2.needs_run("ConMIM", 0, ["ConMIM"])
    g = st2.gather()
    assert g["rows"]["ConMIM"]["knn"] == [(0, 80.0)]
    assert g["minutes"]["ConMIM"]["total"] == [(0, 1.0)]
    # the header names where the encoders were pre-trained when that is not where they were evaluated
    from study import report

    assert g["machines"] == {"test": {0}} and list(g["pretrain_machines"].values()) == [{0}]
    pretrained_on = next(iter(g["pretrain_machines"]))
    assert pretrained_on != "test" and f"pre-trained on {pretrained_on} (seed 0)" in report.markdown(st2, g)


def test_missing_result_or_changed_recipe_needs_the_checkpoint(study_mod, tmp_path):
    st = make_study(study_mod, tmp_path)
    fake_run(st, "ConMIM", 0, b"weights-a")
    st.weights("ConMIM", 0)
    fake_results(st, "ConMIM", 0, 80.0)
    st.result_path("ConMIM", "finetune", 0).unlink()
    shutil.rmtree(st.work)
    st2 = make_study(study_mod, tmp_path)
    assert st2.needs_run("ConMIM", 0, ["ConMIM"])

    fake_results(st2, "ConMIM", 0, 80.0)
    assert not st2.needs_run("ConMIM", 0, ["ConMIM"])
    st3 = make_study(study_mod, tmp_path)
    st3.pretrain_rows["ConMIM"] = st3.all_pretrain["ConMIM"] = PretrainRow("conmim_fmnist_30min.yaml",
                                                                          ("mask.ratio=0.6",))
    assert st3.weights("ConMIM", 0) is None  # another config: the record does not stand for it
    assert st3.cached("ConMIM", "knn", 0) is None
    assert st3.needs_run("ConMIM", 0, ["ConMIM"])


def test_teacher_is_rerun_when_its_student_must_be(study_mod, tmp_path):
    st = make_study(study_mod, tmp_path)
    fake_run(st, "MoCo v3", 0, b"teacher-1")
    fake_results(st, "MoCo v3", 0, 70.0)
    shutil.rmtree(st.work)
    st2 = make_study(study_mod, tmp_path)
    # MoCo v3's results are all recorded, but MimCo has no run: its teacher's checkpoint must be made again
    assert st2.complete("MoCo v3", 0)
    assert st2.needs_run("MoCo v3", 0, ["MoCo v3", "MimCo"])
    assert not st2.needs_run("MoCo v3", 0, ["MoCo v3"])

    # the re-run teacher has other bytes: MoCo v3's old results go stale, and MimCo records the new teacher
    fake_run(st2, "MoCo v3", 0, b"teacher-2")
    assert not st2.complete("MoCo v3", 0)
    fake_run(st2, "MimCo", 0, b"student")
    sha_t = st2.weights("MoCo v3", 0)
    st2.weights("MimCo", 0)
    assert json.loads(st2.record_path("MimCo", 0).read_text())["teacher_sha256"] == sha_t
    fake_results(st2, "MoCo v3", 0, 71.0)
    fake_results(st2, "MimCo", 0, 75.0)
    shutil.rmtree(st2.work)
    st3 = make_study(study_mod, tmp_path)
    assert not st3.needs_run("MoCo v3", 0, ["MoCo v3", "MimCo"])
    assert not st3.needs_run("MimCo", 0, ["MoCo v3", "MimCo"])
    g = st3.gather()
    assert g["minutes"]["MimCo"]["total"] == [(0, 2.0)] and g["minutes"]["MimCo"]["own"] == [(0, 1.0)]

    # a record of MimCo made from another teacher is not valid for the current one
    rec = json.loads(st3.record_path("MimCo", 0).read_text())
    rec["teacher_sha256"] = "0" * 64
    st3.record_path("MimCo", 0).write_text(json.dumps(rec))
    st4 = make_study(study_mod, tmp_path)
    assert st4.weights("MimCo", 0) is None and st4.needs_run("MimCo", 0, ["MoCo v3", "MimCo"])


def test_results_in_the_old_place_move_into_the_records(study_mod, tmp_path):
    st = make_study(study_mod, tmp_path)
    fake_run(st, "ConMIM", 0, b"weights-a")
    fake_results(st, "ConMIM", 0, 80.0)
    old = st.work / "seed0" / "eval" / "conmim" / "knn.json"
    old.parent.mkdir(parents=True)
    shutil.move(st.result_path("ConMIM", "knn", 0), old)
    assert st.cached("ConMIM", "knn", 0)["top1"] == 80.0
    assert st.result_path("ConMIM", "knn", 0).is_file()


def test_rerun_of_a_lost_checkpoint_fills_in_backfill_metrics_only(study_mod, tmp_path, monkeypatch):
    """Results imported without their checkpoint stand; --rerun-lost re-makes the run in <work>/rerun, computes
    only the metrics added since (with the re-run's own k-NN beside the recorded one) and renews no record."""
    from study import report

    import cmim.eval.run as eval_run

    st = make_study(study_mod, tmp_path)
    lost = "lost:conmim:seed0"
    rec = {"row": "ConMIM", "seed": 0, "checkpoint_sha256": lost, "teacher_sha256": None,
           "config_fingerprint": st.config_fingerprint("ConMIM", 0), "seconds": 60.0, "img_per_s": None}
    st.record_path("ConMIM", 0).parent.mkdir(parents=True)
    st.record_path("ConMIM", 0).write_text(json.dumps(rec))
    fake_results(st, "ConMIM", 0, 80.0)
    assert st.weights("ConMIM", 0) == lost and not st.needs_run("ConMIM", 0, ["ConMIM"])
    assert not st.available("ConMIM", 0) and not st.lost("MoCo v3", 0)

    calls = []

    def fake_eval(protocol, src, cfg, write=False):
        calls.append((protocol, list(cfg)))
        return {"top1": 84.0 if "feature=cls" in cfg else 80.5, "top5": 99.0, "features": {"feature": "cls"}}

    monkeypatch.setattr(eval_run, "open_source", lambda path, recipe, ov, **kw: (path, ov))
    monkeypatch.setattr(eval_run, "run_eval", fake_eval)
    monkeypatch.setattr(study_mod.choice, "choose_global_feature",
                        lambda src, cfg, seed: {"choice": "cls", "val_top1": {"cls": 2.0, "mean": 1.0},
                                                "fit_samples": 8, "val_samples": 2})
    re = make_study(study_mod, tmp_path, rerun_lost=True)
    assert re.run_dir("ConMIM", 0) == re.work / "rerun" / "seed0" / "conmim"
    assert re.needs_run("ConMIM", 0, ["ConMIM"]) and not re.needs_run("MoCo v3", 0, ["ConMIM", "MoCo v3"])
    fake_run(re, "ConMIM", 0, b"re-made weights")
    assert re.available("ConMIM", 0) and re.weights("ConMIM", 0) == lost
    re.evaluate("ConMIM", 0)
    assert [p for p, _ in calls] == ["knn", "knn"]  # the re-run's check, then knn_global; nothing else re-run
    got = json.loads(st.result_path("ConMIM", "knn_global", 0).read_text())
    assert got["top1"] == 84.0 and got["rerun"]["rerun_of"] == lost
    assert got["rerun"]["check"] == {"metric": "knn", "rerun_top1": 80.5, "recorded_top1": 80.0}
    assert json.loads(st.record_path("ConMIM", 0).read_text()) == rec  # the record stands for the lost weights
    rr = json.loads(re.rerun_record_path("ConMIM", 0).read_text())
    assert rr["rerun_of"] == lost and rr["checkpoint_sha256"] == got["rerun"]["checkpoint_sha256"]
    assert not re.needs_run("ConMIM", 0, ["ConMIM"])

    shutil.rmtree(re.work)  # a later sitting without the re-run: the filled-in metric stands, labelled
    st2 = make_study(study_mod, tmp_path)
    assert st2.cached("ConMIM", "knn_global", 0)["top1"] == 84.0
    g = st2.gather()
    assert g["rows"]["ConMIM"]["knn_global"] == [(0, 84.0)] and g["rows"]["ConMIM"]["knn"] == [(0, 80.0)]
    assert 0 in g["reruns"]["ConMIM"] and "## Re-runs" in report.markdown(st2, g)
    rerun_row = next(line for line in report.markdown(st2, g).splitlines() if line.startswith("| ConMIM | 0 | k-NN"))
    cpu = report.machine().split(",")[0]
    assert f"| not recorded / {cpu} |" in rerun_row  # the imported record names no machine; the re-run does
    spec = st2.eval_spec("raw pixels", "knn_global", 0)  # the pixels are their own global feature
    assert spec.ready and not any(o.startswith("feature=") for o in spec.overrides)


def test_a_recorded_run_whose_work_dir_is_gone_counts_as_lost(study_mod, tmp_path):
    """A record with its real sha256 stands for weights too; once they are gone from --work, --rerun-lost re-makes
    them."""
    st = make_study(study_mod, tmp_path)
    fake_run(st, "ConMIM", 0, b"weights-a")
    sha = st.weights("ConMIM", 0)  # writes the record
    fake_results(st, "ConMIM", 0, 80.0)
    re = make_study(study_mod, tmp_path, rerun_lost=True)
    assert not re.lost("ConMIM", 0) and not re.needs_run("ConMIM", 0, ["ConMIM"])  # the weights are still there
    (st.run_dir("ConMIM", 0) / CHECKPOINT_FILE).write_bytes(b"other weights")
    assert re.lost("ConMIM", 0)  # a checkpoint, but not the recorded one
    shutil.rmtree(st.work / "seed0")
    assert re.lost("ConMIM", 0) and re.needs_run("ConMIM", 0, ["ConMIM"]) and re.weights("ConMIM", 0) == sha
    assert not re.lost("MoCo v3", 0)  # no record: nothing stands for it
    fake_run(re, "ConMIM", 0, b"re-made weights")
    rr = re.rerun_record("ConMIM", 0)
    assert rr["rerun_of"] == sha != rr["checkpoint_sha256"]


def test_committed_records_keep_their_fingerprints(monkeypatch, tmp_path):
    """Every record in benchmarks/study_records/, recomputed by today's code from the design: same fingerprint."""
    monkeypatch.setattr(runner, "fmnist_root", lambda: RECORDED_FMNIST)
    records = REPO / "benchmarks" / "study_records"
    st = make_study(runner, tmp_path, seeds=[0, 1, 2], records=records, ablations=True)
    names = {slug(n): n for n in st.all_evals}
    checked = 0
    for path in sorted(records.glob("seed*/**/*.json")):
        rec = json.loads(path.read_text())
        seed = int(path.relative_to(records).parts[0][4:])
        if path.parent.name == "rerun":  # a re-run standing in for a lost checkpoint: same config as its record
            row = rec["row"]
            orig = st.record(row, seed)
            assert orig is not None and rec["rerun_of"] == orig["checkpoint_sha256"], path
            assert rec["config_fingerprint"] == st.config_fingerprint(row, seed), path
        elif path.parent.name == "pretrain":
            row = rec["row"]
            assert slug(row) == path.stem
            assert st.config_fingerprint(row, seed) == rec["config_fingerprint"], path
            assert st.record(row, seed) is not None, path  # MimCo's teacher sha256 included
        else:
            name, metric = names[path.parent.name], path.stem
            spec = st.choice_spec(name, seed) if metric == "feature_choice" else st.eval_spec(name, metric, seed)
            assert st.fingerprint(name, spec, seed) == rec["fingerprint"], path
        checked += 1
    assert checked == len(list(records.glob("seed*/**/*.json"))) > 0


def write_clipart(root: Path, counts: dict[str, int]) -> None:
    """A clip-art-like tree: a category's images sit in nested sub-folders; every image differs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in counts.items():
        for i in range(n):
            p = root / c / f"sub{i % 2}" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)


def test_clipart_folder_keeps_categories_of_20_images(tmp_path):
    from study.data import clipart_folder

    src = tmp_path / "png"
    write_clipart(src, {"animals": 21, "buttons": 3, "shapes": 20, "tools": 22})
    art = clipart_folder(src, tmp_path / "work")
    assert art.kept == {"animals": 21, "shapes": 20, "tools": 22} and art.dropped == {"buttons": 3}
    links = sorted(p.name for p in (tmp_path / "work" / "clipart").iterdir())
    assert links == ["animals", "shapes", "tools"]
    assert (tmp_path / "work" / "clipart" / "shapes").resolve() == src / "shapes"
    assert json.loads((tmp_path / "work" / "clipart.json").read_text())["dropped"] == {"buttons": 3}
    assert clipart_folder(src, tmp_path / "work2").files_sha256 == art.files_sha256  # where it lives is no part
    shutil.rmtree(src / "shapes" / "sub0")  # shapes falls under 20: its link goes
    again = clipart_folder(src, tmp_path / "work")
    assert again.kept == {"animals": 21, "tools": 22} and again.dropped == {"buttons": 3, "shapes": 10}
    assert sorted(p.name for p in (tmp_path / "work" / "clipart").iterdir()) == ["animals", "tools"]
    assert again.files_sha256 != art.files_sha256


def test_folder_fingerprints_do_not_depend_on_the_work_dir(tmp_path):
    src = tmp_path / "png"
    write_clipart(src, {"a": 20, "b": 20})
    sts = [make_study(runner, tmp_path, work=w, dataset="openclipart", clipart_root=src) for w in ("w1", "w2")]
    for st in sts:
        st.store.root = st.records = tmp_path / "records"
    fps = [(st.config_fingerprint("ConMIM", 0),
            st.fingerprint("raw pixels", st.eval_spec("raw pixels", "knn", 0), 0),
            st.fingerprint("supervised from scratch", st.eval_spec("supervised from scratch", "finetune", 0), 0))
           for st in sts]
    assert fps[0] == fps[1]
    assert "data.split_seed=0" in sts[0].pretrain_overrides("ConMIM", 0)
    assert sts[0].config_fingerprint("ConMIM", 1) != fps[0][0]  # the seed draws another split
    # a chosen feature is not known before its choice: no result can be matched yet
    assert not sts[0].eval_spec("ConMIM", "knn", 0).ready


def test_feature_choice_on_a_validation_part_of_the_training_part(tmp_path, monkeypatch):
    import numpy as np
    from study import choice

    from cmim.data.folder import folder_parts
    from cmim.eval.datasets import eval_dataset
    from cmim.eval.run import open_source

    monkeypatch.setenv("CMIM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "png"
    write_clipart(src, {"a": 24, "b": 24})
    for i in range(4):  # twins: a copy of a file under another name
        shutil.copy(src / "a" / "sub0" / f"{2 * i}.png", src / "a" / f"copy{i}.png")
    st = make_study(runner, tmp_path, dataset="openclipart", clipart_root=src)
    assert st.choose("random init", 0)
    rec = json.loads(st.store.choice_path("random init", 0).read_text())
    assert rec["choice"] in ("cls", "mean") and set(rec["val_top1"]) == {"cls", "mean"}
    assert rec["choice"] == max(rec["val_top1"], key=lambda f: (rec["val_top1"][f], f == "cls"))
    spec = st.eval_spec("random init", "knn", 0)
    assert spec.ready and f"feature={rec['choice']}" in spec.overrides
    assert st.chosen_feature("random init", 0) == rec["choice"]

    s = st.choice_spec("random init", 0)
    _, cfg = open_source(None, s.recipe, s.overrides, arch=s.arch)
    train = eval_dataset(cfg, "train")
    labels = np.array([train[i]["label"] for i in range(len(train))])
    assert rec["fit_samples"] + rec["val_samples"] == len(train)
    val = choice.validation_mask(cfg, labels, 0)
    base, sel = folder_parts(train)
    side = {os.path.relpath(base.paths[i], base.root): v for i, v in zip(sel, val.tolist())}
    pairs = [(f"a/copy{i}.png", f"a/sub0/{2 * i}.png") for i in range(4)]
    pairs = [(c, o) for c, o in pairs if c in side and o in side]
    assert pairs and all(side[c] == side[o] for c, o in pairs)  # every copy on the side of its original


def test_folder_results_name_each_rows_global_feature(tmp_path):
    """results_folder.json names the feature that k-NN and the linear probes read, per row (the issue's schema): the
    pixels are their own; an encoder's is the choice of each seed; a row without probes has none."""
    from study import report

    src = tmp_path / "png"
    write_clipart(src, {"a": 20, "b": 20})
    st = make_study(runner, tmp_path, dataset="openclipart", clipart_root=src, seeds=[0, 1])
    g = {"rows": {"raw pixels": {"knn": [(0, 50.0), (1, 52.0)], "linear": [(0, 40.0), (1, 42.0)]},
                  "ConMIM": {"knn": [(0, 51.0), (1, 53.0)], "linear": [(0, 47.0), (1, 45.0)],
                             "finetune": [(0, 46.0), (1, 48.0)]},
                  "supervised from scratch": {"finetune": [(0, 45.0), (1, 47.0)]}},
         "features": {"ConMIM": {"knn": [(1, "mean"), (0, "cls")], "linear": [(0, "cls"), (1, "mean")]}},
         "minutes": {}}
    rows = {r["name"]: r for r in report.results_json(st, g)["rows"]}
    assert rows["raw pixels"]["feature"] == "pixels"
    assert rows["ConMIM"]["feature"] == ["cls", "mean"] == rows["ConMIM"]["knn"]["feature"]  # in seed order
    assert "feature" not in rows["supervised from scratch"] and "feature" not in rows["ConMIM"]["finetune"]
