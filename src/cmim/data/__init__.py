"""cmim.data: base datasets, deterministic per-sample views and batched on-device photometric augmentation."""

from cmim.data.arrays import CIFAR, FashionMNIST
from cmim.data.augment import (
    IDENTITY_PARAMS,
    NUM_PARAMS,
    PARAM_NAMES,
    PROFILES,
    PhotometricProfile,
    ViewMaker,
    ViewSpec,
    apply_photometric,
    normalize,
    sample_photometric_params,
    to_unit,
)
from cmim.data.base import BaseImageDataset
from cmim.data.factory import build_base_dataset
from cmim.data.folder import ImageFolderDataset
from cmim.data.pixels import ChannelMismatch, load_pixels
from cmim.data.skips import scan_unreadable, skip_report
from cmim.data.splits import held_out_mask, twin_groups
from cmim.data.subset import SubsetDataset
from cmim.data.synthetic import SyntheticDataset
from cmim.data.views import (
    EvalDataset,
    PretrainDataset,
    build_eval_dataset,
    build_pretrain_dataset,
)

__all__ = [
    "CIFAR",
    "IDENTITY_PARAMS",
    "NUM_PARAMS",
    "PARAM_NAMES",
    "PROFILES",
    "BaseImageDataset",
    "ChannelMismatch",
    "EvalDataset",
    "FashionMNIST",
    "ImageFolderDataset",
    "PhotometricProfile",
    "PretrainDataset",
    "SubsetDataset",
    "SyntheticDataset",
    "ViewMaker",
    "ViewSpec",
    "apply_photometric",
    "build_base_dataset",
    "build_eval_dataset",
    "build_pretrain_dataset",
    "held_out_mask",
    "twin_groups",
    "load_pixels",
    "normalize",
    "sample_photometric_params",
    "scan_unreadable",
    "skip_report",
    "to_unit",
]
