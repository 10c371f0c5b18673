"""The ``lightning.pytorch`` variants of the LightningModule and the callbacks.

``lightning.pytorch`` and ``pytorch_lightning`` do not share classes: a Trainer of one namespace rejects a
LightningModule of the other, and LightningCLI rejects foreign callbacks. The logic is written once
(:class:`~lightning_cnet.task.ClassificationTask`, :class:`~lightning_cnet.callbacks.DepthRefinementMixin`);
this module mixes it with the ``lightning.pytorch`` base classes. It needs the ``lightning`` package.

Example:
    >>> import lightning.pytorch as L  # doctest: +SKIP
    >>> from lightning_cnet.lightning import ContinuousNetClassifier, DepthRefinementCallback  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=6, callbacks=[DepthRefinementCallback([2, 4])])  # doctest: +SKIP
    >>> trainer.fit(ContinuousNetClassifier(scheme="rk4"), datamodule=...)  # doctest: +SKIP
"""

try:
    import lightning.pytorch as L
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightning_cnet.lightning needs the `lightning` package (pip install lightning); "
        "with pytorch_lightning use lightning_cnet.module and lightning_cnet.callbacks"
    ) from error

from lightning_cnet.callbacks.depth_refinement import DepthRefinementCallback as _PLDepthRefinementCallback
from lightning_cnet.callbacks.depth_refinement import DepthRefinementMixin
from lightning_cnet.task import ClassificationTask


class ContinuousNetClassifier(ClassificationTask, L.LightningModule):
    __doc__ = ClassificationTask.__doc__


class DepthRefinementCallback(DepthRefinementMixin, L.Callback):
    __doc__ = _PLDepthRefinementCallback.__doc__


__all__ = ["ContinuousNetClassifier", "DepthRefinementCallback"]
