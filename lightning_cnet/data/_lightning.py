"""The ``lightning.pytorch`` DataModules: the namespace-free mixins made concrete with ``lightning.pytorch``.

Imports nothing of ``pytorch_lightning``; the classes are public as ``lightning_cnet.lightning.*DataModule``.
"""

from __future__ import annotations

from lightning_cnet._namespace import lightning_namespace
from lightning_cnet.data.canvas import DigitCanvasDataMixin
from lightning_cnet.data.cifar import CIFAR10DataMixin, CIFAR100DataMixin
from lightning_cnet.data.digits import DigitsDataMixin, HardDigitsDataMixin
from lightning_cnet.data.folder import ImageFolderDataMixin
from lightning_cnet.data.idx import IDXDataMixin

L = lightning_namespace().module


class DigitsDataModule(DigitsDataMixin, L.LightningDataModule):
    __doc__ = DigitsDataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class HardDigitsDataModule(HardDigitsDataMixin, DigitsDataModule):
    __doc__ = HardDigitsDataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class DigitCanvasDataModule(DigitCanvasDataMixin, L.LightningDataModule):
    __doc__ = DigitCanvasDataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class CIFAR10DataModule(CIFAR10DataMixin, L.LightningDataModule):
    __doc__ = CIFAR10DataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class CIFAR100DataModule(CIFAR100DataMixin, L.LightningDataModule):
    __doc__ = CIFAR100DataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class ImageFolderDataModule(ImageFolderDataMixin, L.LightningDataModule):
    __doc__ = ImageFolderDataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


class IDXDataModule(IDXDataMixin, L.LightningDataModule):
    __doc__ = IDXDataMixin.__doc__
    __module__ = "lightning_cnet.lightning"


__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitCanvasDataModule",
    "DigitsDataModule",
    "HardDigitsDataModule",
    "IDXDataModule",
    "ImageFolderDataModule",
]
