"""MoCo v3 for ViT (Chen, Xie, He, ICCV 2021): the contrastive teacher of MimCo's stage 1.

Base encoder = ViT (CLS token after the final norm) + projector (D -> 4096 -> 4096 -> 256) + predictor
(256 -> 4096 -> 256); momentum encoder = ViT + projector, an EMA of the base (parameters only) with m on a
per-iteration cosine 0.99 -> 1. Two independently cropped views (BYOL augmentations: view 1 always blurred,
view 2 sometimes blurred and solarized). Loss = 2T * (ctr(q1, k2) + ctr(q2, k1)), where ctr is InfoNCE of
the predictor output of one view against the momentum keys of the other view gathered from all processes
(negatives = the global batch). Both the base and the momentum encoder run in train mode, so every
BatchNorm normalizes with batch statistics (synchronized across processes by the engine's
``train.sync_bn``), as in the reference.

Naming follows the other methods: ``student`` / ``student_projector`` are the base encoder and its
projector, ``teacher`` / ``teacher_projector`` the momentum encoder and its projector. ``encoder("teacher")``
is the momentum encoder; ``encoder("student")`` the base encoder (the one the reference fine-tunes; the
two converge as m -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cmim.core.distributed import concat_all_gather, get_rank
from cmim.core.errors import require
from cmim.data.augment import PROFILES, ViewSpec
from cmim.losses import info_nce
from cmim.methods import MethodSpec
from cmim.methods.base import MomentumMethod
from cmim.models import MaskedEncoder, MLPHead


@dataclass
class MoCoV3Config:
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum: float = 0.99
    momentum_final: float = 1.0
    # photometric profiles of the two crops (reference: BYOL's asymmetric pair); other pairs for tiny images
    views: list[str] = field(default_factory=lambda: ["byol1", "byol2"])


class MoCoV3(MomentumMethod):
    name = "mocov3"

    def __init__(self, cfg: Any) -> None:
        c = cfg.mocov3
        super().__init__(cfg, c.momentum, c.momentum_final)
        # MoCo v3 never masks: a trainable but unused mask token would break DDP (unused parameter).
        self.student.mask_token.requires_grad_(False)
        dim = self.student.embed_dim
        self.student_projector = MLPHead(dim, c.proj_hidden_dim, c.proj_out_dim, num_layers=3)
        self.predictor = MLPHead(c.proj_out_dim, c.pred_hidden_dim, c.proj_out_dim, num_layers=2)
        self.teacher = self.make_teacher(self.student)
        self.teacher_projector = self.make_teacher(self.student_projector)
        self.ema_pairs = [(self.student, self.teacher), (self.student_projector, self.teacher_projector)]
        self.temperature = float(c.temperature)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(num_crops=2, profiles=list(self.cfg.mocov3.views), crop_of_view=[0, 1],
                        mask_generator=None)

    def contrastive_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """ctr(q, k) * 2T with the keys of all processes; this process's positives sit at rank * B."""
        keys = concat_all_gather(k.detach())
        offset = get_rank() * q.shape[0]
        return info_nce(q, keys, self.temperature, label_offset=offset) * (2 * self.temperature)

    def forward(self, views: list[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        x1, x2 = views  # MoCo v3 never masks
        b = x1.shape[0]
        both = torch.cat([x1, x2])
        # The ViT has no batch-coupled layer, so one pass serves both views; the heads (BatchNorm) run per
        # view, as the reference's separate calls do.
        cls = self.student(both)[:, 0]
        q1 = self.predictor(self.student_projector(cls[:b]))
        q2 = self.predictor(self.student_projector(cls[b:]))
        with torch.no_grad():
            k_cls = self.teacher(both)[:, 0]
            k1 = self.teacher_projector(k_cls[:b])
            k2 = self.teacher_projector(k_cls[b:])
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return {"loss": loss}

    def encoder(self, which: str = "teacher") -> MaskedEncoder:
        return self.teacher if which == "teacher" else self.student


def validate(cfg: Any) -> None:
    c = cfg.mocov3
    require(c.temperature > 0, "mocov3.temperature: must be positive")
    require(0.0 <= c.momentum <= 1.0 and 0.0 <= c.momentum_final <= 1.0, "mocov3.momentum: must be in [0, 1]")
    require(len(c.views) == 2 and all(v in PROFILES for v in c.views),
            f"mocov3.views: need two profiles from {tuple(PROFILES)}")
    require(c.proj_hidden_dim > 0 and c.proj_out_dim > 0 and c.pred_hidden_dim > 0,
            "mocov3 head sizes must be positive")
    if cfg.method == "mocov3":
        require(cfg.train.accum_steps == 1,
                "train.accum_steps: MoCo v3 contrasts each micro-batch against its own keys, so accumulation "
                "would shrink its negatives and BatchNorm batches to the micro-batch; use more processes or a "
                "smaller train.batch_size")


SPEC = MethodSpec(name="mocov3", config=MoCoV3Config, build=MoCoV3, validate=validate,
                  encoder_prefixes={"teacher": "teacher.", "student": "student."}, has_projector=True)
