"""Image classification with a ContinuousNet, written once for both Lightning namespaces.

:class:`ClassificationTask` adds a cross-entropy loss and torchmetrics accuracy to :class:`~lightning_cnet.task.
BackboneTask` and uses only methods every ``LightningModule`` has (``log``, ``trainer``, ``save_hyperparameters``).
The concrete classes mix it with ``pytorch_lightning.LightningModule`` (:mod:`lightning_cnet.module`) or
``lightning.pytorch.LightningModule`` (:mod:`lightning_cnet.lightning`).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import TRAINING_RANGES, check_ranges
from lightning_cnet.batches import model_input
from lightning_cnet.task import BackboneTask

SPLITS = ("train", "val", "test")
#: Backbone options the classifier also takes as its own arguments, the form of configs and checkpoints written before
#: ``model_kwargs`` (they are merged into it; given in both places, these win).
FLAT_MODEL_OPTIONS = ("scheme", "n_steps", "n_basis", "basis", "T", "unit", "unit_kwargs", "skip_init",
                      "recompute_steps")


@lightning_class("ContinuousNetClassifier", base="LightningModule", home="lightning_cnet.module")
class ClassificationTask(BackboneTask):
    """Image classification with a ContinuousNet backbone (mix with a ``LightningModule`` class).

    Batches are ``(images, targets)``; the loss is cross-entropy, and ``{split}_acc`` (top-1; ``{split}_acc_top5``
    too with more than 5 classes) is logged per epoch. The callbacks measure ``val_acc`` (``monitor``).

    Args:
        model: a registered model name (:func:`~lightning_cnet.models.list_models`).
        model_kwargs: keyword arguments of the model's builder (``scheme``, ``n_steps``, ``n_basis``, ``basis``,
            ``T``, ``unit``, ``unit_kwargs``, ``skip_init``, ``recompute_steps``: see
            :class:`~lightning_cnet.models.ContinuousNet`).
        num_classes: classes to predict (default: the model's own, 10 for ``cnet_digits``).
        in_chans: input channels (default: the model's own, 1 for ``cnet_digits``).
        label_smoothing: cross-entropy label smoothing.
        scheme, n_steps, n_basis, basis, T, unit, unit_kwargs, skip_init, recompute_steps: the same backbone options
            given flat, as configs and checkpoints written before ``model_kwargs`` do (``None``: not given).
        **kwargs: the optimizer, LR schedule, ``compile`` and ``backbone`` arguments of
            :class:`~lightning_cnet.task.BackboneTask`.

    Example:
        >>> import torch
        >>> from lightning_cnet.module import ContinuousNetClassifier
        >>> task = ContinuousNetClassifier("cnet_digits", model_kwargs={"scheme": "rk4", "n_steps": 1, "T": 1.0})
        >>> task(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    monitor: ClassVar[str] = "val_acc"
    mode: ClassVar[str] = "max"

    def __init__(
        self,
        model: str = "cnet_digits",
        *,
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        scheme: str | None = None,
        n_steps: int | None = None,
        n_basis: int | None = None,
        basis: str | None = None,
        T: float | None = None,
        unit: str | None = None,
        unit_kwargs: dict[str, Any] | None = None,
        skip_init: bool | None = None,
        recompute_steps: bool | None = None,
        **kwargs: Any,
    ) -> None:
        check_ranges(TRAINING_RANGES, {"label_smoothing": label_smoothing})
        flat = {"scheme": scheme, "n_steps": n_steps, "n_basis": n_basis, "basis": basis, "T": T, "unit": unit,
                "unit_kwargs": unit_kwargs, "skip_init": skip_init, "recompute_steps": recompute_steps}
        merged = {**(model_kwargs or {}), **{name: value for name, value in flat.items() if value is not None}}
        super().__init__(model, model_kwargs=merged, **kwargs)
        self.num_classes = self.model.num_classes
        metrics: dict[str, Metric | MetricCollection] = {
            "acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics, compute_groups=False)  # top-1 and top-5 must not share state
        self.metrics = nn.ModuleDict({f"{split}_metrics": collection.clone(prefix=f"{split}_") for split in SPLITS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.run_backbone(x)
        return logits

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, split: str) -> torch.Tensor:
        images, targets = batch
        if len(images) == 0:
            raise ValueError(f"{split} batch {batch_idx} has no samples (images of shape {list(images.shape)}); check "
                             "the dataset and sampler behind the DataLoader (an empty split or shard)")
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics = cast(MetricCollection, self.metrics[f"{split}_metrics"])
        metrics.update(logits.detach().float(), targets)
        on_step = split == "train"
        self.log(f"{split}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test", sync_dist=True)
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name == f"{split}_acc" and split != "test")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits: torch.Tensor = self(model_input(batch, self))
        return logits.softmax(dim=-1)
