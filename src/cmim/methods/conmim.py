"""ConMIM: masked image modeling with denoising contrast (Yi et al., ICLR 2023).

An EMA teacher (encoder + projector, left in train mode so its BatchNorm uses batch statistics, as the
reference does) encodes the full, strongly perturbed view into a per-image dictionary of patch features;
the student sees the weakly perturbed, masked view of the same crop and must pick, for each masked patch,
the teacher patch at the same position among all patches of that image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cmim.core.errors import require
from cmim.data.augment import PROFILES, ViewSpec
from cmim.losses import patch_contrastive_loss
from cmim.methods import MethodSpec
from cmim.methods.base import MomentumMethod
from cmim.models import MaskedEncoder, MLPHead


@dataclass
class ConMIMConfig:
    temperature: float = 0.1
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    momentum: float = 0.996  # EMA momentum, cosine to momentum_final per iteration; 0 = no EMA (ablation)
    momentum_final: float = 1.0
    teacher_view: str = "conmim_strong"  # photometric profile of the teacher view; "none" = both weak
    student_view: str = "none"


class ConMIM(MomentumMethod):
    name = "conmim"

    def __init__(self, cfg: Any) -> None:
        c = cfg.conmim
        super().__init__(cfg, c.momentum, c.momentum_final)
        dim = self.student.embed_dim
        self.student_projector = MLPHead(dim, c.proj_hidden_dim, c.proj_out_dim, num_layers=3)
        self.teacher = self.make_teacher(self.student)
        self.teacher_projector = self.make_teacher(self.student_projector)
        self.ema_pairs = [(self.student, self.teacher), (self.student_projector, self.teacher_projector)]
        self.temperature = c.temperature

    def view_spec(self) -> ViewSpec:
        c = self.cfg.conmim
        # one crop + flip shared by both views, so patch j covers the same region in both
        return ViewSpec(num_crops=1, profiles=[c.student_view, c.teacher_view], crop_of_view=[0, 0],
                        mask_generator=self.mask_generator())

    def patch_features(self, encoder: MaskedEncoder, projector: MLPHead, images: Tensor,
                       mask: Tensor | None = None) -> Tensor:
        """Projected patch features (B, N, D'): projector over all tokens (BatchNorm sees CLS too), CLS dropped."""
        return projector(encoder(images, mask))[:, 1:]

    def forward(self, views: list[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        student_view, teacher_view = views
        assert mask is not None, "ConMIM masks the student view"
        with torch.no_grad():
            target = self.patch_features(self.teacher, self.teacher_projector, teacher_view)
        pred = self.patch_features(self.student, self.student_projector, student_view, mask)
        loss = patch_contrastive_loss(pred, target.detach(), mask, self.temperature)
        return {"loss": loss}

    def encoder(self, which: str = "teacher") -> MaskedEncoder:
        return self.teacher if which == "teacher" else self.student


def validate(cfg: Any) -> None:
    c = cfg.conmim
    require(c.temperature > 0, "conmim.temperature: must be positive")
    require(0.0 <= c.momentum <= 1.0 and 0.0 <= c.momentum_final <= 1.0, "conmim.momentum: must be in [0, 1]")
    for key in ("teacher_view", "student_view"):
        require(c[key] in PROFILES, f"conmim.{key}: must be one of {tuple(PROFILES)}")


SPEC = MethodSpec(name="conmim", config=ConMIMConfig, build=ConMIM, validate=validate,
                  encoder_prefixes={"teacher": "teacher.", "student": "student."}, has_projector=True,
                  sync_bn=False)  # the reference's ConMIM projectors use per-GPU BatchNorm
