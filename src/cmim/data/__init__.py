"""cmim.data: base datasets, deterministic per-sample views and batched on-device photometric augmentation."""

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
)
from cmim.data.datasets import (
    CIFAR,
    BaseImageDataset,
    FashionMNIST,
    ImageFolderDataset,
    SubsetDataset,
    SyntheticDataset,
    build_base_dataset,
    scan_unreadable,
    skip_report,
)
from cmim.data.splits import held_out_mask, twin_groups
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
    "normalize",
    "sample_photometric_params",
    "scan_unreadable",
    "skip_report",
]
