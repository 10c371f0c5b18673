"""The ``pytorch_lightning`` LightningModule for classification with a ContinuousNet.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_cnet.data import DigitsDataModule
    >>> task = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=1)
    >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=DigitsDataModule())  # doctest: +SKIP
"""

import pytorch_lightning as pl

from lightning_cnet._namespace import pytorch_lightning_namespace
from lightning_cnet.classification import ClassificationTask


class ContinuousNetClassifier(ClassificationTask, pl.LightningModule):
    __doc__ = ClassificationTask.__doc__
    lightning = pytorch_lightning_namespace()
