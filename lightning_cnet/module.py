"""The ``pytorch_lightning`` LightningModules of the package's tasks: ``ContinuousNetClassifier`` (classification,
:mod:`lightning_cnet.classification`) and ``ContinuousNetSegmenter`` (semantic segmentation,
:mod:`lightning_cnet.segmentation`), made concrete on first access (:mod:`lightning_cnet._namespace`).

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_cnet.data import DigitsDataModule
    >>> task = ContinuousNetClassifier("cnet_digits", model_kwargs={"scheme": "rk4", "n_steps": 1, "T": 1.0})
    >>> isinstance(task, pl.LightningModule)
    True
    >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=DigitsDataModule())  # doctest: +SKIP
"""

from lightning_cnet import classification, segmentation  # noqa: F401 - each registers its task
from lightning_cnet._namespace import module_getattr, registered_names

__getattr__ = module_getattr(__name__)

__all__ = registered_names(__name__)
