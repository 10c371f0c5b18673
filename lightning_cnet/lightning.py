"""Every Lightning-facing class of the package for ``lightning.pytorch`` (needs the ``lightning`` package).

``lightning.pytorch`` and ``pytorch_lightning`` do not share classes: a Trainer of one namespace rejects a
LightningModule of the other, and LightningCLI rejects foreign callbacks. The logic is written once in
namespace-free mixins, each registered with :func:`~lightning_cnet._namespace.lightning_class`; this module makes
every registered class concrete with the ``lightning.pytorch`` base classes on first access (the tasks, the
callbacks, the DataModules and ``AtomicCheckpointIO``) and imports nothing of ``pytorch_lightning``. The
``pytorch_lightning`` classes are ``lightning_cnet.module``, ``lightning_cnet.callbacks``, ``lightning_cnet.data`` and
``lightning_cnet.checkpoint_io``.

Example:
    >>> import lightning.pytorch as L  # doctest: +SKIP
    >>> from lightning_cnet.lightning import ContinuousNetClassifier, DepthRefinementCallback  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=6, callbacks=[DepthRefinementCallback([2, 4])])  # doctest: +SKIP
    >>> trainer.fit(ContinuousNetClassifier(scheme="rk4"), datamodule=...)  # doctest: +SKIP
"""

from lightning_cnet import _atomic, callbacks, classification, data, segmentation  # noqa: F401 - they register
from lightning_cnet._namespace import lightning_namespace, module_getattr, registered_names
from lightning_cnet.callbacks.nonfinite_guard import NonFiniteError

lightning_namespace()  # fails at import, in one line, without the `lightning` package
__getattr__ = module_getattr(__name__, lightning_namespace, everything=True)

__all__ = [*registered_names(), "NonFiniteError"]
