"""Classification with a ContinuousNet, written once for both Lightning namespaces.

:class:`ClassificationTask` holds the logic of the LightningModule and uses only methods every
``LightningModule`` has (``log``, ``trainer``, ``save_hyperparameters``). The concrete classes mix it with
``pytorch_lightning.LightningModule`` (:mod:`lightning_cnet.module`) or ``lightning.pytorch.LightningModule``
(:mod:`lightning_cnet.lightning`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_cnet.models import ContinuousNet, get_model

SPLITS = ("train", "val", "test")


class ClassificationTask:
    """Image classification with a ContinuousNet backbone (mix with a ``LightningModule`` class).

    Args:
        model: a registered model name (:func:`~lightning_cnet.models.list_models`).
        num_classes: classes to predict.
        in_chans: input channels.
        scheme: Runge-Kutta scheme of the ODE stages.
        n_steps: integration steps per stage.
        n_basis: basis coefficients per stage (default: ``n_steps``).
        basis: ``"piecewise_constant"`` or ``"piecewise_linear"``.
        T: physical depth of each stage (default: ``n_steps``).
        skip_init: gate the residual units by ``s(t)`` initialised to zero.
        checkpoint_steps: recompute activations per step in backward to save memory.
        label_smoothing: cross-entropy label smoothing.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``; LightningCLI's ``--optimizer`` overrides it.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: ``"cosine"`` (over ``max_epochs``), ``"step"`` (``milestones``/``gamma``) or
            ``"constant"``; LightningCLI's ``--lr_scheduler`` overrides it.
        milestones: epochs at which the ``"step"`` schedule multiplies the LR by ``gamma``.
        gamma: decay factor of the ``"step"`` schedule.
        backbone: use this ContinuousNet instead of building ``model`` (not saved in hyperparameters).
    """

    def __init__(
        self,
        model: str = "cnet_digits",
        *,
        num_classes: int = 10,
        in_chans: int = 1,
        scheme: str = "euler",
        n_steps: int = 1,
        n_basis: int | None = None,
        basis: str = "piecewise_constant",
        T: float | None = None,
        skip_init: bool = True,
        checkpoint_steps: bool = False,
        label_smoothing: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        backbone: ContinuousNet | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} is not known: expected 'sgd' or 'adamw'")
        if lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"lr_schedule={lr_schedule!r} is not known: expected 'cosine', 'step' or 'constant'")
        self.model: ContinuousNet = backbone if backbone is not None else get_model(
            model, num_classes=num_classes, in_chans=in_chans, scheme=scheme, n_steps=n_steps,
            n_basis=n_basis, basis=basis, T=T, skip_init=skip_init, checkpoint_steps=checkpoint_steps,
        )
        self.num_classes = self.model.num_classes
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1)}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5)
        collection = MetricCollection(metrics)
        self.metrics = nn.ModuleDict({f"{split}_metrics": collection.clone(prefix=f"{split}_") for split in SPLITS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model predicts num_classes={self.num_classes} but {type(datamodule).__name__} has "
                f"{data_classes} classes; set model num_classes={data_classes}"
            )

    def on_train_epoch_start(self) -> None:
        self.log_resolution()

    def log_resolution(self) -> None:
        """Log the resolution per stage, parameter count and residual evaluations per forward."""
        for index, resolution in enumerate(self.model.resolution):
            self.log(f"resolution/n_steps_stage{index}", float(resolution.n_steps), on_epoch=True, on_step=False)
            self.log(f"resolution/n_basis_stage{index}", float(resolution.n_basis), on_epoch=True, on_step=False)
        self.log("resolution/parameters", float(sum(p.numel() for p in self.model.parameters())),
                 on_epoch=True, on_step=False)
        self.log("nfe", float(self.model.function_evaluations), on_epoch=True, on_step=False, prog_bar=True)

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics = self.metrics[f"{split}_metrics"]
        metrics.update(logits.detach().float(), targets)
        on_step = split == "train"
        self.log(f"{split}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test")
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                nesterov=hp.momentum > 0,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        if hp.lr_schedule == "cosine":
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones or []),
                                                             gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
