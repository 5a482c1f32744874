"""MimCo: masked image modeling pre-training with a contrastive teacher (Zhou et al., ACM MM 2022), stage 2.

A frozen, contrastively pre-trained teacher (e.g. MoCo v3, see :mod:`cmim.models.teachers`) encodes the full
view; the student (a masked ViT) sees the masked view of the same crop and is trained with two contrastive
reconstruction losses:

- patch level: each masked student token, through the student's patch head, must pick out the teacher's
  patch feature at the same position; negatives are the other patches of the same image
  (``mimco.patch_negatives=image``) or of the whole local batch (``batch``);
- image level: the student's CLS token, through the student's image head, must pick out the teacher's image
  feature of the same image among those of the global batch (gathered from all processes).

``L = L_patch + mimco.image_weight * L_image``. The paper's full text was not available to us: temperatures,
the loss weight, the head sizes and the teacher features used as targets (``mimco.target``: ``projector``
outputs or ``backbone`` tokens; ``mimco.patch_target`` can override it for the patch loss) are config values.
With ``target=projector`` the teacher's projector, trained on CLS tokens, is applied in eval mode to every
token. The heads end in a width equal to the chosen teacher target, so any teacher width fits the student.

"Teacher" means three different things around MimCo; the code gives each its own name:

- the *contrastive teacher*: the frozen model MimCo learns from (config ``mimco.teacher``, a file). It is
  always in eval mode and kept in the state dict (under ``contrastive_teacher.``) so that a checkpoint is
  self-contained, but it is never trained or EMA-updated; ``encoder("contrastive_teacher")`` returns it.
- the *source encoder*: which encoder of the contrastive teacher's own cmim checkpoint is loaded (config
  ``mimco.teacher_encoder``: that run's ``teacher`` or ``student``).
- the *downstream role* ``"teacher"`` of every method (:data:`cmim.models.stored_encoder.ENCODER_ROLES`): the
  encoder a run hands to evaluation and export. MimCo has no EMA, so the trained model, the student, fills
  both roles: ``encoder("teacher")`` and ``encoder("student")`` return it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmim.core.distributed import concat_all_gather, get_rank
from cmim.core.errors import require
from cmim.data.augment import PROFILES, ViewSpec
from cmim.losses import info_nce, patch_contrastive_loss
from cmim.methods import MethodSpec, declared_encoder_prefixes
from cmim.methods.base import Method
from cmim.models import MaskedEncoder, MLPHead
from cmim.models.stored_encoder import ENCODER_ROLES
from cmim.models.teachers import FORMATS, FrozenTeacher, TeacherError, check_fits, load_teacher


@dataclass
class MimCoConfig:
    teacher: str | None = None  # path: cmim checkpoint, MoCo v3 release .pth.tar, or timm weights
    teacher_format: str = "auto"  # auto | cmim | mocov3 | timm
    teacher_timm_name: str | None = None  # for teacher_format=timm
    teacher_timm_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_encoder: str = "teacher"  # for cmim checkpoints: teacher (EMA) | student
    target: str = "projector"  # teacher features used as targets: "projector" outputs | "backbone" tokens
    patch_target: str | None = None  # override of `target` for the patch loss only; None = same as target
    patch_temperature: float = 0.1
    image_temperature: float = 0.2
    image_weight: float = 1.0  # lambda in L = L_patch + lambda * L_image
    patch_negatives: str = "image"  # "image": other patches of the same image | "batch": all patches
    proj_hidden_dim: int = 4096
    head_layers: int = 3  # student patch / image heads: MLPHead(D, proj_hidden_dim, teacher width, head_layers)
    teacher_view: str = "none"


class MimCo(Method):
    name = "mimco"

    def __init__(self, cfg: Any, teacher: FrozenTeacher | None = None) -> None:
        """``teacher``: the contrastive teacher itself (tests); None loads it from ``mimco.teacher``."""
        super().__init__(cfg)
        c = cfg.mimco
        if teacher is None:
            if c.teacher is None:
                raise TeacherError("mimco.teacher: a teacher checkpoint is required for method=mimco")
            source_encoder = c.teacher_encoder  # which encoder of the teacher's own checkpoint
            teacher = load_teacher(c.teacher, c.teacher_format, source_encoder, c.teacher_timm_name,
                                   dict(c.teacher_timm_kwargs or {}), declared_prefixes=declared_encoder_prefixes)
        check_fits(teacher, self.student, cfg.data.in_chans)
        self.patch_target = c.patch_target or c.target
        self.image_target = c.target
        if "projector" in (self.patch_target, self.image_target) and teacher.projector is None:
            raise TeacherError(f"mimco.target=projector needs a teacher with a projector, and "
                               f"{teacher.source} has none: use a MoCo v3/ConMIM checkpoint or set "
                               "mimco.target=backbone")
        self.contrastive_teacher = teacher
        dim = self.student.embed_dim
        self.patch_head = MLPHead(dim, c.proj_hidden_dim, self._target_dim(self.patch_target), c.head_layers)
        self.image_head = MLPHead(dim, c.proj_hidden_dim, self._target_dim(self.image_target), c.head_layers)
        self.patch_temperature = float(c.patch_temperature)
        self.image_temperature = float(c.image_temperature)
        self.image_weight = float(c.image_weight)
        self.patch_negatives = str(c.patch_negatives)

    def _target_dim(self, target: str) -> int:
        t = self.contrastive_teacher
        return t.projector_dim if target == "projector" else t.embed_dim  # type: ignore[return-value]

    def view_spec(self) -> ViewSpec:
        # one crop (and flip) for both views, so the contrastive teacher's patch j and the student's patch j cover
        # the same pixels; the second view (the full one) goes to the contrastive teacher
        return ViewSpec(num_crops=1, profiles=["none", self.cfg.mimco.teacher_view], crop_of_view=[0, 0],
                        mask_generator=self.mask_generator())

    @torch.no_grad()
    def contrastive_targets(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The contrastive teacher's patch targets (B, N, D_p) and image targets (B, D_i) of the full view."""
        tokens = self.contrastive_teacher(images)
        projected = self.contrastive_teacher.project(tokens) if "projector" in (
            self.patch_target, self.image_target) else None
        patch = projected if self.patch_target == "projector" else tokens
        image = projected if self.image_target == "projector" else tokens
        return patch[:, 1:], image[:, 0]  # type: ignore[index]

    def student_predictions(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Student patch predictions (B, N, D_p) and image prediction (B, D_i) of the masked view."""
        tokens = self.student(images, mask)
        return self.patch_head(tokens[:, 1:]), self.image_head(tokens[:, 0])

    def forward(self, views: list[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        student_view, full_view = views
        assert mask is not None, "MimCo masks the student view"
        patch_target, image_target = self.contrastive_targets(full_view)
        patch_pred, image_pred = self.student_predictions(student_view, mask)
        loss_patch = patch_contrastive_loss(patch_pred, patch_target, mask, self.patch_temperature,
                                            self.patch_negatives)
        keys = concat_all_gather(image_target)
        offset = get_rank() * image_pred.shape[0]  # this process's positives among the gathered keys
        loss_image = info_nce(image_pred, keys, self.image_temperature, label_offset=offset)
        loss = loss_patch + self.image_weight * loss_image
        return {"loss": loss, "loss_patch": loss_patch.detach(), "loss_image": loss_image.detach()}

    def encoder(self, which: str = "teacher") -> MaskedEncoder:
        """The student for both downstream roles, "teacher" and "student" (it is the trained model);
        "contrastive_teacher": the frozen model MimCo learns from."""
        if which == "contrastive_teacher":
            return self.contrastive_teacher.encoder
        return self.student


def validate(cfg: Any) -> None:
    c = cfg.mimco
    require(c.teacher_view in PROFILES, f"mimco.teacher_view: must be one of {tuple(PROFILES)}")
    require(c.target in ("projector", "backbone"), "mimco.target: must be projector or backbone")
    require(c.patch_target in (None, "projector", "backbone"),
            "mimco.patch_target: must be projector, backbone or null")
    require(c.head_layers >= 1, "mimco.head_layers: must be >= 1")
    require(c.teacher_encoder in ENCODER_ROLES,
            f"mimco.teacher_encoder: must be {' or '.join(ENCODER_ROLES)}, got {c.teacher_encoder!r}")
    require(c.patch_negatives in ("image", "batch"), "mimco.patch_negatives: must be image or batch")
    require(c.teacher_format in FORMATS,
            f"mimco.teacher_format: must be one of {', '.join(FORMATS)}, got {c.teacher_format!r}")
    require(c.patch_temperature > 0 and c.image_temperature > 0, "mimco temperatures must be positive")
    require(c.image_weight >= 0, "mimco.image_weight: must be >= 0")
    if cfg.method == "mimco":
        require(cfg.train.accum_steps == 1,
                "train.accum_steps: MimCo's image loss contrasts each micro-batch against its own teacher "
                "features, so accumulation would shrink its negatives to the micro-batch; use more processes or "
                "a smaller train.batch_size")
        require(c.teacher is not None, "mimco.teacher: a teacher checkpoint is required for method=mimco")
        require(Path(c.teacher).is_file(), f"mimco.teacher: file not found: {c.teacher}")


# The contrastive teacher is an input of the run, not a product of it: both downstream roles are the student
# (as MimCo.encoder says).
SPEC = MethodSpec(name="mimco", config=MimCoConfig, build=MimCo, validate=validate,
                  encoder_prefixes={"teacher": "student.", "student": "student."})
