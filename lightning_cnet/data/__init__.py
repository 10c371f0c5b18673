"""LightningDataModules: offline digits (plain, distorted, and on a canvas with masks), the MNIST family,
CIFAR-10/100 and any image folder.

Every DataModule exposes ``num_classes``, ``in_chans`` and ``image_size`` right after it is
built, so that a model can be sized from it before ``setup``. The training order of epoch ``e``
depends only on the DataModule's ``seed`` and ``e``, random augmentation is seeded per sample and
epoch, and the training loader's position is saved in checkpoints, so a resumed run (from an
end-of-epoch or a mid-epoch checkpoint) sees the batches of an uninterrupted one.

The DataModules here are the ``pytorch_lightning`` ones; ``lightning_cnet.lightning`` has the same
DataModules for ``lightning.pytorch``. They are imported on first access, so that importing this
package (or the ``lightning.pytorch`` twins) does not import ``pytorch_lightning``.

Example:
    >>> from lightning_cnet.data import DigitsDataModule
    >>> DigitsDataModule(image_size=8).num_classes
    10
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_cnet.data._common import DatasetNotFoundError, SplitDataMixin
from lightning_cnet.data.canvas import DigitCanvasDataMixin
from lightning_cnet.data.cifar import CIFAR10DataMixin, CIFAR100DataMixin
from lightning_cnet.data.digits import AffineNoise, DigitsDataMixin, HardDigitsDataMixin
from lightning_cnet.data.folder import ImageFolderDataMixin
from lightning_cnet.data.idx import IDXDataMixin
from lightning_cnet.data.sampling import EpochKeySampler, EpochSampler, ResumableDataLoader

#: DataModules made concrete for ``pytorch_lightning``, imported on first access.
_PYTORCH_LIGHTNING_DATAMODULES = (
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitCanvasDataModule",
    "DigitsDataModule",
    "HardDigitsDataModule",
    "IDXDataModule",
    "ImageFolderDataModule",
)


def __getattr__(name: str) -> Any:
    if name in _PYTORCH_LIGHTNING_DATAMODULES:
        return getattr(import_module("lightning_cnet.data._pytorch_lightning"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_PYTORCH_LIGHTNING_DATAMODULES,
    "AffineNoise",
    "CIFAR100DataMixin",
    "CIFAR10DataMixin",
    "DatasetNotFoundError",
    "DigitCanvasDataMixin",
    "DigitsDataMixin",
    "EpochKeySampler",
    "EpochSampler",
    "HardDigitsDataMixin",
    "IDXDataMixin",
    "ImageFolderDataMixin",
    "ResumableDataLoader",
    "SplitDataMixin",
]
