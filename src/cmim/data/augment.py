"""The on-device view stage: what views a method needs (:class:`ViewSpec`), and batched photometric
augmentation applied on the device from per-sample parameters (:class:`ViewMaker`).

The data loader workers only *sample* the photometric parameters of every view (cheap, deterministic,
see :func:`sample_photometric_params`); the pixel work runs batched on whatever device the batch lives
on (:func:`apply_photometric`, :class:`ViewMaker`). Every op matches the corresponding single-image
``torchvision.transforms.v2.functional`` kernel on float images in [0, 1].

Parameter layout (``K = NUM_PARAMS = 13`` float32 values per view):

====  ==================  =================================================================
idx   name                meaning
====  ==================  =================================================================
0     ``jitter``          1.0 if colour jitter is applied to this view, else 0.0
1     ``brightness``      brightness factor (1.0 = identity)
2     ``contrast``        contrast factor (1.0 = identity)
3     ``saturation``      saturation factor (1.0 = identity)
4     ``hue``             hue shift in turns, in [-0.5, 0.5] (0.0 = identity)
5-8   ``order``           op applied at jitter step 0..3 (0 brightness, 1 contrast, 2 saturation, 3 hue)
9     ``gray``            1.0 if converted to grayscale
10    ``blur``            1.0 if Gaussian-blurred
11    ``sigma``           blur sigma (drawn even when ``blur`` is 0)
12    ``solarize``        1.0 if solarized (threshold 0.5)
====  ==================  =================================================================

When ``jitter`` is 0 the four factors are stored as their identity values, so the vector always holds
the *effective* parameters. The row for the ``"none"`` profile is :data:`IDENTITY_PARAMS`.

Channel counts. Saturation, hue and grayscale are colour operations, defined for 3 (RGB) channels only; with
1 or N != 3 channels they are skipped (their parameters are still drawn, so every profile draws the same
numbers whatever the channel count). What the profiles (ConMIM's ``conmim_strong`` teacher view, MoCo v3's
``byol1``/``byol2``) do with N channels, all on [0, 1] data:

- brightness: every channel times the same factor (an exposure change, the same for all bands);
- contrast: each channel blended with *its own* mean (the RGB path blends with the mean luma, which has no
  meaning across bands of different units); for 1 channel both are the same;
- blur: the same Gaussian on every channel; solarize: ``x >= 0.5 -> 1 - x`` on every channel.

SimMIM and MimCo's default views (profile ``"none"``) have no photometric step: crops and flips only.
Views arrive as uint8 crops (divided by 255 here) or, from ``float_pixels`` datasets, float32 crops in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MaskGenerator = Callable[[np.random.Generator], np.ndarray]  # a per-sample RNG -> bool (grid_h, grid_w)

__all__ = [
    "MaskGenerator",
    "ViewSpec",
    "IDENTITY_PARAMS",
    "NUM_PARAMS",
    "PARAM_NAMES",
    "PROFILES",
    "PhotometricProfile",
    "ViewMaker",
    "apply_photometric",
    "batched_adjust_hue",
    "batched_gaussian_blur",
    "batched_solarize",
    "normalize",
    "rgb_to_grayscale",
    "sample_photometric_params",
    "to_unit",
]

PARAM_NAMES: tuple[str, ...] = (
    "jitter",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "order0",
    "order1",
    "order2",
    "order3",
    "gray",
    "blur",
    "sigma",
    "solarize",
)
NUM_PARAMS = len(PARAM_NAMES)
_JIT, _BRI, _CON, _SAT, _HUE, _ORD, _GRAY, _BLUR, _SIGMA, _SOL = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12
_OP_BRIGHTNESS, _OP_CONTRAST, _OP_SATURATION, _OP_HUE = 0, 1, 2, 3

IDENTITY_PARAMS = np.array([0, 1, 1, 1, 0, 0, 1, 2, 3, 0, 0, 1, 0], dtype=np.float32)
IDENTITY_PARAMS.setflags(write=False)


@dataclass(frozen=True)
class PhotometricProfile:
    """Strengths and probabilities of one view's photometric pipeline (jitter → gray → blur → solarize)."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


#: Registered profiles; ``"none"`` is handled specially (no parameters drawn, no pixel work).
PROFILES: dict[str, PhotometricProfile | None] = {
    "none": None,
    "conmim_strong": PhotometricProfile(blur_p=0.1, solarize_p=0.2),
    "byol1": PhotometricProfile(blur_p=1.0, solarize_p=0.0),
    "byol2": PhotometricProfile(blur_p=0.1, solarize_p=0.2),
}


@dataclass
class ViewSpec:
    """Which crops a method needs and how each view is made from them.

    ``num_crops=1`` makes all views share one crop and flip (ConMIM / MimCo); ``num_crops=2`` gives MoCo v3
    its two independent crops. ``profiles[v]`` names the photometric profile of view ``v`` (see
    :data:`cmim.data.augment.PROFILES`) and ``crop_of_view[v]`` the crop it starts from.
    """

    num_crops: int
    profiles: list[str]
    crop_of_view: list[int]
    mask_generator: MaskGenerator | None = None

    def __post_init__(self) -> None:
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {self.num_crops}")
        if len(self.profiles) != len(self.crop_of_view):
            raise ValueError("profiles and crop_of_view must have one entry per view")
        for c in self.crop_of_view:
            if not 0 <= c < self.num_crops:
                raise ValueError(f"crop index {c} out of range for num_crops={self.num_crops}")
        for p in self.profiles:
            if p not in PROFILES:
                raise ValueError(f"unknown photometric profile {p!r}; expected one of {sorted(PROFILES)}")

    @property
    def num_views(self) -> int:
        return len(self.profiles)


def _blur_radius() -> int:
    """Static blur kernel radius, ``ceil(3 * max sigma)`` over all profiles (no host sync needed)."""
    sigmas = [p.blur_sigma[1] for p in PROFILES.values() if p is not None and p.blur_p > 0]
    return int(math.ceil(3.0 * max(sigmas, default=2.0)))


def sample_photometric_params(profile: str, rng: np.random.Generator) -> np.ndarray:
    """Draw the photometric parameters of one view (layout in the module docstring).

    All uniforms come from a single ``rng.random`` call so the cost is ~1 µs and the number of draws
    is fixed per profile, which keeps later draws from the same item rng (e.g. the mask) stable.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown photometric profile {profile!r}; expected one of {sorted(PROFILES)}")
    prof = PROFILES[profile]
    if prof is None:
        return IDENTITY_PARAMS.copy()
    u = rng.random(13).tolist()  # python floats: scalar numpy indexing would dominate the cost
    if u[0] < prof.jitter_p:
        jitter = [
            1.0,
            1.0 + prof.brightness * (2.0 * u[1] - 1.0),
            1.0 + prof.contrast * (2.0 * u[2] - 1.0),
            1.0 + prof.saturation * (2.0 * u[3] - 1.0),
            prof.hue * (2.0 * u[4] - 1.0),
        ]
    else:
        jitter = [0.0, 1.0, 1.0, 1.0, 0.0]
    # Argsort of 4 uniforms: a uniform random op order, like ColorJitter's randperm(4).
    order = sorted(range(4), key=u[5:9].__getitem__)
    lo, hi = prof.blur_sigma
    tail = [
        float(u[9] < prof.gray_p),
        float(u[10] < prof.blur_p),
        lo + (hi - lo) * u[11],
        float(u[12] < prof.solarize_p),
    ]
    return np.array(jitter + order + tail, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Batched single ops. ``x`` is float (B, C, H, W) in [0, 1]; factors are (B,) tensors on x's device.
# ----------------------------------------------------------------------------------------------------


def _bcast(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (B, 1, H, W), the weights torchvision uses; 1-channel input is returned as is."""
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(dim=-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3)


def _blend(x: Tensor, ref: Tensor, factor: Tensor) -> Tensor:
    f = _bcast(factor)
    return (x * f + ref * (1.0 - f)).clamp_(0.0, 1.0)


def batched_adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Per-sample ``adjust_hue`` (shift in turns) through a vectorized RGB → HSV → RGB round trip.

    Hue is computed in sextants (units of 60°); the inverse uses the closed form
    ``c_n = V - (V - min) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + H) mod 6``, n = 5, 3, 1 for R, G, B,
    which avoids gathers and keeps S·V = max - min exact.
    """
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    delta = maxc - minc
    is_r, is_g = maxc == r, maxc == g
    # Sextant-relative numerator and offset of the max channel (R has priority over G, as in torchvision).
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    off = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    # Gray pixels (delta == 0) have num == 0; any hue then maps back to (v, v, v), so no special case.
    h = num / torch.where(delta > 0, delta, 1.0) + off + 6.0 * shift.to(x.dtype).reshape(-1, 1, 1)
    n = (5.0 - 2.0 * torch.arange(3, dtype=x.dtype, device=x.device)).reshape(1, 3, 1, 1)  # no H2D copy
    k = torch.remainder(h.unsqueeze(-3) + n, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - delta.unsqueeze(-3) * w


def batched_gaussian_blur(x: Tensor, sigma: Tensor, radius: int | None = None) -> Tensor:
    """Per-sample Gaussian blur: separable, one grouped conv per axis, reflect padding.

    The kernel size ``2 * radius + 1`` is static (default from the largest profile sigma: 13 taps) and
    is capped so reflect padding stays valid on tiny images.
    """
    bsz, c, h, w = x.shape
    if radius is None:
        radius = _blur_radius()
    radius = max(0, min(radius, h - 1, w - 1))
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kern = torch.exp(-(t * t) / (2.0 * sigma.to(x.dtype).reshape(-1, 1) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # (B, k)
    kern = kern.repeat_interleave(c, dim=0)  # (B*C, k)
    k = 2 * radius + 1
    y = F.pad(x.reshape(1, bsz * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kern.reshape(bsz * c, 1, 1, k), groups=bsz * c)
    y = F.conv2d(y, kern.reshape(bsz * c, 1, k, 1), groups=bsz * c)
    return y.reshape(bsz, c, h, w)


#: device types on which per-sample ops are computed on the selected samples only (host syncs are free)
_SUBSET_DEVICES: tuple[str, ...] = ("cpu",)


def _apply_selected(x: Tensor, sel: Tensor, fn: Callable[[Tensor, Tensor | slice], Tensor]) -> Tensor:
    """``x`` with ``fn(x[i], i)`` in place of the samples ``i`` where ``sel`` (B,) is true.

    On CPU, where reading ``sel`` costs nothing, only the selected samples are computed (hue runs at one of
    the four jitter steps of a sample, blur on 10% of ConMIM's teacher views: 4-10x less work). On
    accelerators every sample is computed and selected with ``torch.where``: no host synchronisation.
    """
    if x.device.type not in _SUBSET_DEVICES:
        return torch.where(_bcast(sel), fn(x, slice(None)), x)
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, slice(None))
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx))


def batched_solarize(x: Tensor, apply: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-sample ``solarize``: invert pixels >= threshold where ``apply`` is true."""
    return torch.where(_bcast(apply) & (x >= threshold), 1.0 - x, x)


# ----------------------------------------------------------------------------------------------------
# Full pipeline
# ----------------------------------------------------------------------------------------------------


def apply_photometric(x: Tensor, params: Tensor, in_chans: int, blur_radius: int | None = None) -> Tensor:
    """Apply jitter (random op order) → grayscale → blur → solarize, each per sample, batched.

    Args:
        x: float (B, C, H, W) in [0, 1].
        params: (B, K) as produced by :func:`sample_photometric_params`.
        in_chans: channel count; on any count but 3 the colour-only ops (saturation, hue, grayscale) are skipped,
            and with N != 1, 3 contrast blends each channel with its own mean (module docstring).
        blur_radius: static blur kernel radius (default from the registered profiles).

    Every op is computed for the whole batch and selected per sample with ``torch.where``, so there is no
    data-dependent control flow and no host synchronisation (move ``params`` to x's device beforehand,
    e.g. with ``non_blocking=True``, or the ``.to`` below is a blocking copy).
    """
    if x.ndim != 4 or params.shape != (x.shape[0], NUM_PARAMS):
        raise ValueError(
            f"expected x (B, C, H, W) and params (B, {NUM_PARAMS}); got {x.shape}, {params.shape}"
        )
    color = in_chans == 3
    bands = in_chans not in (1, 3)  # N channels: contrast about each channel's own mean
    p = params.to(device=x.device, dtype=x.dtype)
    jitter = p[:, _JIT] > 0.5
    one = torch.ones_like(p[:, 0])
    factors = [torch.where(jitter, p[:, i], one) for i in (_BRI, _CON, _SAT)]
    hue = torch.where(jitter, p[:, _HUE], torch.zeros_like(one))
    order = p[:, _ORD : _ORD + 4].round().long()

    for step in range(4):
        op = order[:, step]
        is_b, is_c, is_s = op == _OP_BRIGHTNESS, op == _OP_CONTRAST, op == _OP_SATURATION
        if not color:
            is_s = torch.zeros_like(is_s)
        # Brightness, contrast and saturation are all blends x*f + ref*(1-f) with ref = 0, mean(gray), gray.
        factor = torch.where(
            is_b, factors[0], torch.where(is_c, factors[1], torch.where(is_s, factors[2], one))
        )
        if bands:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            ref = torch.where(_bcast(is_c), mean, torch.zeros_like(mean))
        else:
            gray = rgb_to_grayscale(x)
            mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
            ref = torch.where(_bcast(is_s), gray, torch.where(_bcast(is_c), mean, torch.zeros_like(mean)))
        x = _blend(x, ref, factor)
        if color:
            x = _apply_selected(x, (op == _OP_HUE) & jitter, lambda v, i: batched_adjust_hue(v, hue[i]))

    if color:
        x = torch.where(_bcast(p[:, _GRAY] > 0.5), rgb_to_grayscale(x).expand_as(x), x)
    sigma = p[:, _SIGMA]
    x = _apply_selected(x, p[:, _BLUR] > 0.5, lambda v, i: batched_gaussian_blur(v, sigma[i], blur_radius))
    return batched_solarize(x, p[:, _SOL] > 0.5)


def _as_stat(v: Sequence[float] | Tensor, in_chans: int, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(in_chans)
    if t.numel() != in_chans:
        raise ValueError(f"{name} has {t.numel()} values but in_chans={in_chans}")
    return t.reshape(1, in_chans, 1, 1).clone()


def to_unit(x: Tensor) -> Tensor:
    """Pixels as float32 in [0, 1]: uint8 divided by 255 (a new tensor), float pixels (already in [0, 1]) as they
    are. The dtype is known on the host, so no sync."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalize(x_uint8: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 (..., C, H, W) → float32 ``(x / 255 - mean) / std`` on x's device (float pixels in [0, 1]: not divided).

    Sequences are applied as Python scalars per channel, so no host → device copy (and no sync) happens.
    """
    c = x_uint8.shape[-3]
    x = to_unit(x_uint8)
    if isinstance(mean, Tensor) or isinstance(std, Tensor):
        shape = (c, 1, 1)
        m = _as_stat(mean, c, "mean").reshape(shape).to(x.device)
        s = _as_stat(std, c, "std").reshape(shape).to(x.device)
        return (x - m) / s
    m_list, s_list = _as_stat(mean, c, "mean").flatten().tolist(), _as_stat(std, c, "std").flatten().tolist()
    return torch.stack([(x[..., k, :, :] - m_list[k]) / s_list[k] for k in range(c)], dim=-3)


class ViewMaker(torch.nn.Module):
    """Turns collated crops + sampled parameters into normalized views, on the batch's device.

    All views with a photometric profile are processed in one batched :func:`apply_photometric` call
    (concatenated along the batch) to keep the number of kernel launches small.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        spec: ViewSpec,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int,
    ) -> None:
        super().__init__()  # spec was validated by ViewSpec.__post_init__
        self.profiles = list(spec.profiles)
        self.crop_of_view = [int(c) for c in spec.crop_of_view]
        self.in_chans = in_chans
        self.register_buffer("mean", _as_stat(mean, in_chans, "mean"), persistent=False)
        self.register_buffer("std", _as_stat(std, in_chans, "std"), persistent=False)

    @torch.no_grad()
    def forward(self, crops: Tensor, aug: Tensor) -> list[Tensor]:
        """crops uint8 or float32 (B, num_crops, C, H, W), aug (B, V, K) → V float32 tensors (B, C, H, W).

        Pixel work stays in float32 even inside the training step's bf16 autocast (which would otherwise run
        the blur convolution in bf16): the views are the same as the torchvision reference pipeline's.
        """
        with torch.autocast(crops.device.type, enabled=False):
            return self._views(crops, aug)

    def _views(self, crops: Tensor, aug: Tensor) -> list[Tensor]:
        bsz = crops.shape[0]
        used = sorted(set(self.crop_of_view))
        unit = {c: to_unit(crops[:, c]) for c in used}
        views: list[Tensor | None] = [None] * len(self.profiles)
        aug_views = [v for v, p in enumerate(self.profiles) if p != "none"]
        if aug_views:
            x = torch.cat([unit[self.crop_of_view[v]] for v in aug_views], dim=0)
            prm = torch.cat([aug[:, v] for v in aug_views], dim=0)
            y = apply_photometric(x, prm, self.in_chans)
            for k, v in enumerate(aug_views):
                views[v] = y[k * bsz : (k + 1) * bsz]
        for v, p in enumerate(self.profiles):
            if p == "none":
                views[v] = unit[self.crop_of_view[v]]
        return [(v - self.mean) / self.std for v in views if v is not None]
