"""The ``pytorch_lightning`` LightningModules of the package's tasks: classification and semantic segmentation.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_cnet.data import DigitsDataModule
    >>> task = ContinuousNetClassifier("cnet_digits", model_kwargs={"scheme": "rk4", "n_steps": 1, "T": 1.0})
    >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=DigitsDataModule())  # doctest: +SKIP
"""

import pytorch_lightning as pl

from lightning_cnet._namespace import pytorch_lightning_namespace
from lightning_cnet.classification import ClassificationTask
from lightning_cnet.segmentation import SegmentationTask


class ContinuousNetClassifier(ClassificationTask, pl.LightningModule):
    __doc__ = ClassificationTask.__doc__
    lightning = pytorch_lightning_namespace()


class ContinuousNetSegmenter(SegmentationTask, pl.LightningModule):
    __doc__ = SegmentationTask.__doc__
    lightning = pytorch_lightning_namespace()
