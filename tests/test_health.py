"""The label-free health check: hand-computed effective rank / feature std / mean cosine, the collapse rule, and the
monitor on a deliberately collapsed encoder (the warning fires; metrics.jsonl and summary.json hold the fields)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_overrides

from cmim.config import load_config
from cmim.core.health import embedding_health
from cmim.engine.callbacks import Callback
from cmim.engine.trainer import pretrain
from cmim.eval.health import HealthMonitor, collapse_reason

pytestmark = pytest.mark.usefixtures("one_thread")


def test_identical_embeddings_are_rank_one() -> None:
    v = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    h = embedding_health(v.repeat(5, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]]))  # scale is ignored
    assert h["eff_rank"] == pytest.approx(1.0, abs=1e-6)
    assert h["mean_cos"] == pytest.approx(1.0, abs=1e-12) and h["feat_std"] == pytest.approx(0.0, abs=1e-7)
    assert (h["images"], h["dim"]) == (5, 8)


def test_orthonormal_embeddings_have_full_rank() -> None:
    z = torch.zeros(4, 6)
    z[torch.arange(4), torch.arange(4)] = torch.tensor([1.0, 3.0, 0.2, 7.0])  # 4 orthogonal rows, any lengths
    h = embedding_health(z)
    assert h["eff_rank"] == pytest.approx(4.0) and h["mean_cos"] == pytest.approx(0.0, abs=1e-12)
    # each of the first 4 dims holds one 1 and three 0s (std sqrt(1/4 - 1/16)); the last 2 are 0
    assert h["feat_std"] == pytest.approx(4 * math.sqrt(3 / 16) / 6)


def test_two_vectors_at_sixty_degrees() -> None:
    h = embedding_health(torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]]))
    assert h["mean_cos"] == pytest.approx(0.5)
    s = [math.sqrt(1.5), math.sqrt(0.5)]  # singular values: sqrt of the eigenvalues 1 +- cos of z z^T
    p = [v / sum(s) for v in s]
    assert h["eff_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert h["feat_std"] == pytest.approx((0.25 + math.sqrt(3) / 4) / 2)  # per dim: |a - b| / 2


def test_degenerate_input() -> None:
    assert embedding_health(torch.zeros(3, 4)) == {"eff_rank": 0.0, "feat_std": 0.0, "mean_cos": 1.0, "images": 3,
                                                    "dim": 4}
    with pytest.raises(ValueError, match="N >= 2"):
        embedding_health(torch.ones(1, 4))


def test_collapse_rule() -> None:
    start = {"eff_rank": 10.0, "feat_std": 0.1, "mean_cos": 0.5}

    def rec(rank: float, std: float, cos: float) -> dict[str, float]:
        return {"eff_rank": rank, "feat_std": std, "mean_cos": cos}

    assert collapse_reason(start, start, 0.25, 0.9) is None  # the reference never warns
    assert collapse_reason(rec(3.0, 0.03, 0.6), start, 0.25, 0.9) is None
    assert "effective rank 2.00 < 0.25 x its start 10.00" in collapse_reason(rec(2.0, 0.1, 0.6), start, 0.25, 0.9)
    assert "feature std 0.0200 < 0.25 x its start 0.1000" in collapse_reason(rec(9.0, 0.02, 0.6), start, 0.25, 0.9)
    assert "mean cosine 0.950 > 0.9" in collapse_reason(rec(9.0, 0.1, 0.95), start, 0.25, 0.9)
    # a random-init ViT often starts above 0.9 already: the cosine rule waits for the std / rank rules then
    high = rec(10.0, 0.02, 0.98)
    assert collapse_reason(rec(9.0, 0.015, 0.99), high, 0.25, 0.9) is None


class Collapse(Callback):
    """At the end of the epoch, before the health check: every teacher weight zero, the final norm's bias a fixed
    vector, so every token of every image is that vector."""

    def on_epoch_end(self, trainer) -> bool:
        with torch.no_grad():
            for p in trainer.method.teacher.parameters():
                p.zero_()
            trainer.method.teacher.backbone.norm.bias.copy_(torch.linspace(-1, 1, 32))
        return False


def test_monitor_warns_on_a_collapsed_encoder(tmp_path, capsys) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, "train.epochs=1", "monitor.health_images=24",
                                           "train.tensorboard=true"))
    summary = pretrain(cfg, callbacks=[Collapse(), HealthMonitor(cfg)])
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1
    assert warnings[0].startswith("[health] WARNING: the embeddings may be collapsing at epoch 1")
    assert "feature std 0.0000 < 0.25 x its start" in warnings[0]
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "health"]
    assert [r["step"] for r in records] == [0, summary["steps"]]
    for r in records:
        assert {"eff_rank", "feat_std", "mean_cos", "collapsed", "images", "dim", "held_out"} <= set(r)
        assert r["images"] == 24 and r["dim"] == 32 and r["held_out"]
    assert not records[0]["collapsed"] and records[1]["collapsed"]
    assert records[1]["eff_rank"] == pytest.approx(1.0, abs=1e-6) and records[1]["mean_cos"] == pytest.approx(1.0)
    assert records[0]["eff_rank"] > 2.0
    assert [r["collapsed"] for r in summary["health"]] == [False, True]
    assert any((tmp_path / "run" / "tb").iterdir())  # the TensorBoard scalars (health/eff_rank, ...)
