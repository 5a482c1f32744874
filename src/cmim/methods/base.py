"""What every method shares: the contract with the engine, and EMA teachers for momentum methods.

A method is an ``nn.Module`` with
- ``view_spec()``: which crops, photometric profiles and masks its batches need. The data stage makes them:
  the loader workers crop and draw every random parameter, the engine's on-device
  :class:`~cmim.data.augment.ViewMaker` turns those into normalized views;
- ``forward(views, mask) -> dict``: ``views`` the list of normalized (B, C, H, W) views in ``view_spec``
  order, ``mask`` the bool (B, N) patch mask or None; returns a scalar ``"loss"`` (other entries are logged).
  So a method can be called, and tested, with plain tensors;
- ``after_step(step, total_steps, ok) -> dict``: called after every optimizer step (EMA updates live here);
  ``ok`` is a device bool, False when the step was skipped as non-finite: then nothing may change;
- ``encoder(which)``: the :class:`~cmim.models.MaskedEncoder` used downstream ("teacher" or "student").
The engine knows nothing else about it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from cmim.core.distributed import get_rank
from cmim.core.schedules import cosine_schedule
from cmim.data.augment import ViewSpec
from cmim.data.masking import build_mask_generator
from cmim.models import MaskedEncoder, build_encoder
from cmim.models.init_from import init_encoder_from

log = logging.getLogger("cmim")


class Method(nn.Module):
    """Base class: holds the config and the student encoder."""

    name = "method"
    #: parameter-name fragments excluded from weight decay (besides every 1-D parameter)
    no_weight_decay_keys: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_encoder(cfg.model, cfg.data.img_size, cfg.data.in_chans)
        init_from = getattr(cfg.model, "init_from", None)
        if init_from:  # before any subclass copies the student into an EMA teacher: both start from these weights
            report = init_encoder_from(self.student, init_from, keep_pos_embed=cfg.model.pos_embed == "sincos")
            if get_rank() == 0:
                log.info("%s", report.table())
        self.grid_size = self.student.grid_size

    # --- data -------------------------------------------------------------------------------------------
    def view_spec(self) -> ViewSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask_generator(self):
        m = self.cfg.mask
        return build_mask_generator(m.kind, self.grid_size, ratio=m.ratio, cell=m.cell,
                                    min_num_patches=m.min_num_patches, min_aspect=m.min_aspect)

    # --- training hooks ---------------------------------------------------------------------------------
    def forward(self, views: list[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int, ok: Tensor | None = None) -> dict[str, float]:
        return {}

    def encoder(self, which: str = "teacher") -> MaskedEncoder:
        return self.student

    def check_layout(self) -> None:
        """Called by the engine once the method is laid out over processes (sharded, for one): raise
        ValueError when a rule of the method does not hold in that layout. Nothing to check by default."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters in two groups: with and without weight decay.

        No decay on 1-D parameters (norms, biases, layer-scale gammas, BatchNorm) and on position / CLS / mask
        tokens and relative position tables. (BEiT/ConMIM reference: 1-D params, biases, pos_embed and
        cls_token; we also exempt the mask token and relative position tables, as timm and MAE do.)
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or any(k in name for k in self.no_weight_decay_keys):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


class MomentumMethod(Method):
    """A method with EMA teachers: ``self.ema_pairs`` lists (student_module, teacher_module) pairs.

    After each optimizer step every teacher *parameter* (not buffer) becomes m*t + (1-m)*s, with m on a
    per-iteration cosine from ``momentum`` to ``momentum_final``; a single foreach kernel does all of them.
    """

    def __init__(self, cfg: Any, momentum: float, momentum_final: float) -> None:
        super().__init__(cfg)
        self.momentum = momentum
        self.momentum_final = momentum_final
        self.ema_pairs: list[tuple[nn.Module, nn.Module]] = []

    @staticmethod
    def make_teacher(module: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(module)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def check_layout(self) -> None:
        """Each teacher tensor must be laid out exactly like its student's (same shape, and when sharded the same
        placements and local shard): the EMA is then one local lerp per shard, with no communication."""
        for s_mod, t_mod in self.ema_pairs:
            for (name, s), t in zip(s_mod.named_parameters(), t_mod.parameters(), strict=True):
                s_local = s.to_local() if hasattr(s, "to_local") else s
                t_local = t.to_local() if hasattr(t, "to_local") else t
                if s.shape != t.shape or getattr(s, "placements", None) != getattr(t, "placements", None) \
                        or s_local.shape != t_local.shape:
                    raise ValueError(f"{self.name}: the EMA teacher's {name} is laid out unlike the student's "
                                     f"({getattr(t, 'placements', None)} {tuple(t_local.shape)} vs "
                                     f"{getattr(s, 'placements', None)} {tuple(s_local.shape)})")

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_schedule(step, total_steps, self.momentum, self.momentum_final)

    @torch.no_grad()
    def ema_update(self, momentum: float, ok: Tensor | None = None) -> None:
        """t <- lerp(t, s, 1 - m). With ``ok`` (a device bool) the weight is (1 - m) * ok: a skipped step
        (ok False) lerps by 0, which leaves t exactly as it is, and no host sync is needed to know it. Sharded
        parameters (DTensors laid out alike, see :meth:`check_layout`) lerp shard by shard, locally."""
        # Parameter lists are gathered on every call: cheap next to the step, and always current after
        # modules are replaced (global BatchNorm conversion) or moved.
        s_params = [p.detach() for s_mod, _ in self.ema_pairs for p in s_mod.parameters()]
        t_params = [p for _, t_mod in self.ema_pairs for p in t_mod.parameters()]
        if not t_params:
            return
        if ok is not None:
            # a 0-dim weight tensor: the same lerp kernel as the scalar one (bit-identical when ok), per tensor;
            # lerp by exactly 1 equals the copy of the momentum-0 ablation
            w = ok.to(device=t_params[0].device, dtype=t_params[0].dtype) * (1.0 - momentum)
            torch._foreach_lerp_(t_params, s_params, [w] * len(t_params))
        elif momentum == 0.0:
            torch._foreach_copy_(t_params, s_params)
        else:
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    def after_step(self, step: int, total_steps: int, ok: Tensor | None = None) -> dict[str, float]:
        # `step` is the number of optimizer steps done; the update after step s uses m(s-1).
        m = self.momentum_at(step - 1, total_steps)
        self.ema_update(m, ok)
        return {"momentum": m}
