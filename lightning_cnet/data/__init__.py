"""LightningDataModules: offline digits (plain, distorted, and on a canvas with masks), the MNIST family,
CIFAR-10/100 and any image folder.

Every DataModule exposes ``num_classes``, ``in_chans`` and ``image_size`` right after it is
built, so that a model can be sized from it before ``setup``. The training order of epoch ``e``
depends only on the DataModule's ``seed`` and ``e``, random augmentation is seeded per sample and
epoch, and the training loader's position is saved in checkpoints, so a resumed run (from an
end-of-epoch or a mid-epoch checkpoint) sees the batches of an uninterrupted one.

The DataModules here are the ``pytorch_lightning`` ones; ``lightning_cnet.lightning`` has the same
DataModules for ``lightning.pytorch``. Each is written once as a namespace-free mixin in its own module and
registered with :func:`~lightning_cnet._namespace.lightning_class`; this package imports its modules and makes a
DataModule concrete on first access, so that importing this package (or the ``lightning.pytorch`` twins) does not
import ``pytorch_lightning``.

Example:
    >>> from lightning_cnet.data import DigitsDataModule
    >>> DigitsDataModule(image_size=8).num_classes
    10
"""

from __future__ import annotations

from lightning_cnet._namespace import import_submodules, module_getattr, registered_names
from lightning_cnet.data._common import DatasetNotFoundError, SplitDataMixin
from lightning_cnet.data.canvas import DigitCanvasDataMixin
from lightning_cnet.data.cifar import CIFAR10DataMixin, CIFAR100DataMixin
from lightning_cnet.data.digits import AffineNoise, DigitsDataMixin, HardDigitsDataMixin
from lightning_cnet.data.folder import ImageFolderDataMixin
from lightning_cnet.data.idx import IDXDataMixin
from lightning_cnet.data.sampling import EpochKeySampler, EpochSampler, ResumableDataLoader

import_submodules(__name__, __path__)  # every DataModule module registers its DataModule
__getattr__ = module_getattr(__name__)

__all__ = [
    *registered_names(__name__),
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
