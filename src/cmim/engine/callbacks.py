"""Hooks into the training loop for work that is not training: the online k-NN monitor is one
(:class:`cmim.eval.monitor.KnnMonitor`). Keeping them out of the engine lets it know nothing of evaluation.

A callback's state rides along in the checkpoint (its :meth:`Callback.state_dict` entries sit at the top
level of the checkpoint, beside the model), so a resumed run carries on with it; its :meth:`Callback.summary`
entries go into ``summary.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from cmim.engine.trainer import Trainer

__all__ = ["Callback"]


class Callback:
    """No-op base: override what you need. Hooks run on every process; guard host-only work with
    ``trainer.dist.is_main`` and keep the processes in step (``cmim.core.distributed.barrier``)."""

    def on_train_start(self, trainer: Trainer, resumed: bool) -> None:
        """Before the first step of this invocation (``resumed``: it continues a checkpoint)."""

    def on_epoch_end(self, trainer: Trainer) -> bool:
        """After an epoch's last step and its checkpoint; return True to have the checkpoint written again
        (the callback's state changed, e.g. a new k-NN result)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain values or tensors (checkpoints are read weights-only) to store in the checkpoint."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore from a checkpoint (the whole dict: take the keys :meth:`state_dict` wrote)."""

    def summary(self) -> dict[str, Any]:
        """Entries for ``summary.json``."""
        return {}

    def datasets(self) -> list[Dataset]:
        """Datasets the callback read, so that their unreadable images are counted with the run's."""
        return []
