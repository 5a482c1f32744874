"""SimMIM-style pixel baseline: MIM *without* contrast on the same masked student, data, masking and budget.

A linear head predicts the (per-patch normalized) pixels of each masked patch from the student's token;
L1 loss on masked patches only (Xie et al. 2022, with MAE's per-patch target normalization as an option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cmim.data.augment import ViewSpec
from cmim.losses import masked_pixel_loss, normalize_patch_pixels, patchify
from cmim.methods import MethodSpec
from cmim.methods.base import Method


@dataclass
class SimMIMConfig:
    norm_pix: bool = True


class SimMIM(Method):
    name = "simmim"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        p, c = self.student.patch_size, cfg.data.in_chans
        self.decoder = nn.Linear(self.student.embed_dim, p * p * c)
        self.norm_pix = cfg.simmim.norm_pix

    def view_spec(self) -> ViewSpec:
        return ViewSpec(num_crops=1, profiles=["none"], crop_of_view=[0], mask_generator=self.mask_generator())

    def forward(self, views: list[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        (view,) = views
        assert mask is not None, "SimMIM masks its view"
        pred = self.decoder(self.student(view, mask)[:, 1:])
        target = patchify(view, self.student.patch_size)
        if self.norm_pix:
            target = normalize_patch_pixels(target)
        return {"loss": masked_pixel_loss(pred.float(), target.float(), mask)}


SPEC = MethodSpec(name="simmim", config=SimMIMConfig, build=SimMIM)
