"""LightningDataModules: offline digits (plain and distorted), CIFAR-10/100 and any image folder.

Every DataModule exposes ``num_classes``, ``in_chans`` and ``image_size`` right after it is
built, so that a model can be sized from it before ``setup``.
"""

from lightning_cnet.data._common import DatasetNotFoundError
from lightning_cnet.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_cnet.data.digits import AffineNoise, DigitsDataModule, HardDigitsDataModule
from lightning_cnet.data.folder import ImageFolderDataModule

__all__ = [
    "AffineNoise",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "HardDigitsDataModule",
    "ImageFolderDataModule",
]
