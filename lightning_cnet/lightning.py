"""Every Lightning-facing class of the package for ``lightning.pytorch`` (needs the ``lightning`` package).

``lightning.pytorch`` and ``pytorch_lightning`` do not share classes: a Trainer of one namespace rejects a
LightningModule of the other, and LightningCLI rejects foreign callbacks. The logic is written once in
namespace-free mixins; this module mixes it with the ``lightning.pytorch`` base classes and imports nothing of
``pytorch_lightning``. The ``pytorch_lightning`` classes are ``lightning_cnet.module``, ``lightning_cnet.callbacks``
and ``lightning_cnet.data``.

Example:
    >>> import lightning.pytorch as L  # doctest: +SKIP
    >>> from lightning_cnet.lightning import ContinuousNetClassifier, DepthRefinementCallback  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=6, callbacks=[DepthRefinementCallback([2, 4])])  # doctest: +SKIP
    >>> trainer.fit(ContinuousNetClassifier(scheme="rk4"), datamodule=...)  # doctest: +SKIP
"""

from lightning_cnet._namespace import lightning_namespace

_LIGHTNING = lightning_namespace()
L = _LIGHTNING.module

from lightning_cnet.callbacks.depth_refinement import DepthRefinementMixin  # noqa: E402
from lightning_cnet.callbacks.manifestation_monitor import ManifestationMonitorMixin  # noqa: E402
from lightning_cnet.callbacks.nonfinite_guard import NonFiniteError, NonFiniteGuardMixin  # noqa: E402
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402

from lightning_cnet._atomic import AtomicCheckpointIOMixin  # noqa: E402
from lightning_cnet.classification import ClassificationTask  # noqa: E402
from lightning_cnet.segmentation import SegmentationTask  # noqa: E402
from lightning_cnet.data._lightning import (  # noqa: E402
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitCanvasDataModule,
    DigitsDataModule,
    HardDigitsDataModule,
    IDXDataModule,
    ImageFolderDataModule,
)


class ContinuousNetClassifier(ClassificationTask, L.LightningModule):
    __doc__ = ClassificationTask.__doc__
    lightning = _LIGHTNING


class ContinuousNetSegmenter(SegmentationTask, L.LightningModule):
    __doc__ = SegmentationTask.__doc__
    lightning = _LIGHTNING


class DepthRefinementCallback(DepthRefinementMixin, L.Callback):
    __doc__ = DepthRefinementMixin.__doc__
    lightning = _LIGHTNING


class ManifestationMonitor(ManifestationMonitorMixin, L.Callback):
    __doc__ = ManifestationMonitorMixin.__doc__
    lightning = _LIGHTNING


class NonFiniteGuard(NonFiniteGuardMixin, L.Callback):
    __doc__ = NonFiniteGuardMixin.__doc__
    lightning = _LIGHTNING


class AtomicCheckpointIO(AtomicCheckpointIOMixin, TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic (see :mod:`lightning_cnet.checkpoint_io`)."""


__all__ = [
    "AtomicCheckpointIO",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ContinuousNetClassifier",
    "ContinuousNetSegmenter",
    "DepthRefinementCallback",
    "DigitCanvasDataModule",
    "DigitsDataModule",
    "HardDigitsDataModule",
    "IDXDataModule",
    "ImageFolderDataModule",
    "ManifestationMonitor",
    "NonFiniteError",
    "NonFiniteGuard",
]
