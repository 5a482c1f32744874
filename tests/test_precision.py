"""bf16 autocast only where the device computes bf16 natively; fp32 elsewhere (cmim.core.precision)."""

import pytest
import torch

from cmim.core import precision as prec


@pytest.mark.parametrize("native", [True, False])
def test_bf16_resolves_by_hardware(monkeypatch, native):
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: native)
    assert prec.resolve_precision("bf16", "cpu") == ("bf16" if native else "fp32")
    assert prec.resolve_precision("fp32", "cpu") == "fp32"  # fp32 is never changed
    layer = torch.nn.Linear(8, 4)
    with prec.autocast(torch.device("cpu"), "bf16"):
        out = layer(torch.randn(2, 8))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    with prec.autocast("cpu", "fp32"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        prec.resolve_precision("fp16", "cpu")


def test_train_step_falls_back_without_native_bf16(monkeypatch):
    """The training step's autocast follows the same rule (it is what the trainer and the bench time)."""
    from cmim.engine.step import TrainStep

    monkeypatch.setattr(prec, "native_bf16", lambda device_type: False)
    layer = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(layer.parameters())
    step = TrainStep(layer, opt, view_maker=None, device=torch.device("cpu"), precision="bf16")
    with step.autocast:
        assert layer(torch.randn(2, 8)).dtype == torch.float32
