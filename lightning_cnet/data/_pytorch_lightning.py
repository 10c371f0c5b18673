"""The ``pytorch_lightning`` DataModules: the namespace-free mixins made concrete with ``pytorch_lightning``."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_cnet.data.canvas import DigitCanvasDataMixin
from lightning_cnet.data.cifar import CIFAR10DataMixin, CIFAR100DataMixin
from lightning_cnet.data.digits import DigitsDataMixin, HardDigitsDataMixin
from lightning_cnet.data.folder import ImageFolderDataMixin
from lightning_cnet.data.idx import IDXDataMixin


class DigitsDataModule(DigitsDataMixin, pl.LightningDataModule):
    __doc__ = DigitsDataMixin.__doc__
    __module__ = "lightning_cnet.data"


class HardDigitsDataModule(HardDigitsDataMixin, DigitsDataModule):
    __doc__ = HardDigitsDataMixin.__doc__
    __module__ = "lightning_cnet.data"


class DigitCanvasDataModule(DigitCanvasDataMixin, pl.LightningDataModule):
    __doc__ = DigitCanvasDataMixin.__doc__
    __module__ = "lightning_cnet.data"


class CIFAR10DataModule(CIFAR10DataMixin, pl.LightningDataModule):
    __doc__ = CIFAR10DataMixin.__doc__
    __module__ = "lightning_cnet.data"


class CIFAR100DataModule(CIFAR100DataMixin, pl.LightningDataModule):
    __doc__ = CIFAR100DataMixin.__doc__
    __module__ = "lightning_cnet.data"


class ImageFolderDataModule(ImageFolderDataMixin, pl.LightningDataModule):
    __doc__ = ImageFolderDataMixin.__doc__
    __module__ = "lightning_cnet.data"


class IDXDataModule(IDXDataMixin, pl.LightningDataModule):
    __doc__ = IDXDataMixin.__doc__
    __module__ = "lightning_cnet.data"


__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitCanvasDataModule",
    "DigitsDataModule",
    "HardDigitsDataModule",
    "IDXDataModule",
    "ImageFolderDataModule",
]
