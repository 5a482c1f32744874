"""benchmarks/study.py keeps its results in committed records, so a sitting whose work dir is lost re-runs only
what is missing: a run's record names its checkpoint by sha256, MimCo's names its teacher's, and a result is
reused only while the weights, recipe and overrides that made it are unchanged."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def study_mod(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("cmim_study", REPO / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "fmnist"
    data.mkdir()
    monkeypatch.setattr(mod, "fmnist_root", lambda: str(data))
    return mod


def make_study(mod, tmp_path: Path, work: str = "work"):
    args = argparse.Namespace(quick=False, seeds=[0], work=tmp_path / work, records=tmp_path / "records",
                              ablations=False, rows=None)
    st = mod.Study(args)
    st.work.mkdir(parents=True, exist_ok=True)
    return st


def fake_run(st, row: str, seed: int, payload: bytes) -> None:
    """What a finished `cmim pretrain` leaves in its run dir, as far as the study reads it."""
    from omegaconf import OmegaConf

    from cmim.config import load_config

    out = st.run_dir(row, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.pt").write_bytes(payload)
    cfg = load_config(st.recipe(row), st.pretrain_overrides(row, seed))
    OmegaConf.save(cfg, out / "config.yaml")
    steps = 10
    secs = 60.0
    (out / "summary.json").write_text(json.dumps({"steps": steps, "total_steps": steps, "train_seconds": secs,
                                                  "img_per_s": steps * cfg.train.batch_size / secs}))


def fake_results(st, row: str, seed: int, top1: float) -> None:
    for metric in st.metrics_of(row):
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
    st3.pretrain_rows["ConMIM"] = st3.all_pretrain["ConMIM"] = ("conmim_fmnist_30min.yaml", ["mask.ratio=0.6"], None)
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
