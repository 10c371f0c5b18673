"""The refinement callback and the monitor with LightningModules that are not the package's classifier.

A user's dense-regression module (dict batches, two AdamW parameter groups, OneCycleLR stepped per batch, gradient
accumulation) and torchvision's FasterRCNN with a ContinuousNet body (a module with no ``forward``, whose validation
logs nothing), each trained with ``DepthRefinementCallback`` at its default arguments.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_cnet import ContinuousNet
from lightning_cnet.callbacks import DepthRefinementCallback, ManifestationMonitor

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)


def steps_per_stage(net: ContinuousNet) -> list[int]:
    return [r.n_steps for r in net.stage_resolutions]


def held_parameters(trainer: pl.Trainer) -> list[list[torch.Tensor]]:
    return [list(group["params"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]


def same_tensors(a, b) -> bool:
    return sorted(map(id, a)) == sorted(map(id, b))


# ---------------------------------------------------------------------- a user's dense regression module
class SquaresDataset(Dataset):
    """Dict samples: an 8x8 noise image and, as the per-pixel target, a blurred copy of its square."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 8, 8, generator=generator)
        self.masks = F.avg_pool2d(self.images.square(), 3, stride=1, padding=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "mask": self.masks[index]}


class DenseRegression(pl.LightningModule):
    """Written as a user would: ContinuousNet features, a 1x1 decoder, MSE, AdamW with a group per part, OneCycleLR."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ContinuousNet((4, 8), in_chans=1, num_classes=0, scheme="midpoint", n_steps=1, T=1.0)
        self.decoder = nn.Conv2d(8, 1, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(image)
        return F.interpolate(self.decoder(features), size=image.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["image"]), batch["mask"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch["image"]), batch["mask"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([{"params": self.backbone.parameters(), "lr": 3e-3},
                                       {"params": self.decoder.parameters(), "lr": 1e-2}])
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[3e-3, 1e-2],
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SquaresData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_set, self.val_set = SquaresDataset(16, seed=0), SquaresDataset(12, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=4)


class ValLossProbe(pl.Callback):
    """Placed before the refinement callback: the validation MSE over all 12 images, by hand, at each epoch start."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        data = trainer.datamodule.val_set
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.loss[trainer.current_epoch] = F.mse_loss(pl_module(data.images), data.masks).item()
        pl_module.train(was_training)


class EpochEndRecorder(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.groups: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.metrics.append({k: v.item() for k, v in trainer.callback_metrics.items()})
        backbone, decoder = held_parameters(trainer)
        self.groups.append(same_tensors(backbone, pl_module.backbone.parameters())
                           and same_tensors(decoder, pl_module.decoder.parameters()))


def fit_dense(callbacks: list[pl.Callback]) -> tuple[DenseRegression, pl.Trainer]:
    pl.seed_everything(0)
    module = DenseRegression()
    trainer = pl.Trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=callbacks, **TRAINER)
    trainer.fit(module, datamodule=SquaresData())
    return module, trainer


def test_a_user_module_refines_on_schedule_and_reports_its_own_validation_loss(caplog):
    probe, recorder = ValLossProbe(), EpochEndRecorder()
    callback = DepthRefinementCallback(refine_at=[1, 2])
    with caplog.at_level("INFO"):
        module, trainer = fit_dense([probe, callback, recorder])
    assert [entry["epoch"] for entry in callback.history] == [1, 2]
    assert steps_per_stage(module.backbone) == [4, 4]
    assert all(recorder.groups)  # each group kept its part of the model through both refinements
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == trainer.global_step == 6  # 3 epochs x 4 batches / 2 accumulated, never reset
    for epoch, metrics in zip((1, 2), recorder.metrics[1:]):
        assert metrics["refinement/val_loss_before"] == pytest.approx(probe.loss[epoch], rel=1e-5)
        assert math.isfinite(metrics["refinement/val_loss_after"])
    assert not any("acc" in name for metrics in recorder.metrics for name in metrics)
    lines = [r.getMessage() for r in caplog.records if "Depth refinement at epoch" in r.getMessage()]
    assert len(lines) == 2 and f"val_loss {probe.loss[1]:.4f} -> " in lines[0]

    unmeasured, unmeasured_trainer = fit_dense([DepthRefinementCallback([1, 2], evaluate=False), EpochEndRecorder()])
    for ours, theirs in zip(module.state_dict().values(), unmeasured.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # measuring changed nothing in training
    assert trainer.callback_metrics["val_loss"].item() == unmeasured_trainer.callback_metrics["val_loss"].item()


def test_a_logged_monitor_or_a_callable_chooses_what_is_measured(caplog):
    def mean_output(trainer, pl_module):
        return pl_module(trainer.datamodule.val_set.images).mean()

    recorder = EpochEndRecorder()
    measured = DepthRefinementCallback([1], metric=mean_output)
    fit_dense([measured, recorder])
    assert measured.history[0]["metric"] == "mean_output"
    assert "refinement/mean_output_before" in recorder.metrics[1]

    missing = DepthRefinementCallback([1, 2], monitor="val_iou")
    with caplog.at_level("INFO"):
        module, _ = fit_dense([missing])
    said = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    assert said == ["DepthRefinementCallback: refinements are not measured (DenseRegression.validation_step gives no "
                    "'val_iou' (it gives 'val_loss')); refining anyway (choose what to measure with monitor= or "
                    "metric=, or pass evaluate=False)"]
    assert steps_per_stage(module.backbone) == [4, 4] and missing.history[0]["metric"] is None


def test_the_monitor_measures_a_user_module_without_touching_the_epoch_metrics():
    class Recorder(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.logged = {k: v.item() for k, v in trainer.callback_metrics.items()}

    recorder = Recorder()
    module, trainer = fit_dense([ManifestationMonitor(schemes=["euler", "rk4"], n_steps=[1, 2], num_batches=3),
                                 recorder])
    data = trainer.datamodule.val_set
    module.eval()
    for scheme in ("euler", "rk4"):
        for steps in (1, 2):
            with torch.no_grad(), module.backbone.manifestation(scheme=scheme, n_steps=steps):
                expected = F.mse_loss(module(data.images), data.masks).item()
            assert recorder.logged[f"manifestation/val_loss_{scheme}_{steps}"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        own = F.mse_loss(module(data.images), data.masks).item()
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(own, rel=1e-6)


class EpochMetricRegression(DenseRegression):
    """Accumulates a torchmetrics metric in ``validation_step`` and logs it when the epoch ends (after callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MeanSquaredError

        self.val_mse = MeanSquaredError()

    def validation_step(self, batch, batch_idx):
        prediction = self(batch["image"])
        self.val_mse.update(prediction, batch["mask"])
        self.log("val_loss", F.mse_loss(prediction, batch["mask"]))

    def on_validation_epoch_end(self):
        self.log("val_mse", self.val_mse.compute())
        self.val_mse.reset()


def test_measuring_leaves_the_modules_own_metric_states_alone():
    pl.seed_everything(0)
    module = EpochMetricRegression()
    monitor = ManifestationMonitor(schemes=["euler", "rk4"], n_steps=[1, 2], num_batches=1)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], **TRAINER)
    trainer.fit(module, datamodule=SquaresData())
    data = trainer.datamodule.val_set
    module.eval()
    with torch.no_grad():
        expected = F.mse_loss(module(data.images), data.masks).item()
    assert trainer.callback_metrics["val_mse"].item() == pytest.approx(expected, rel=1e-5)
    assert "manifestation/val_loss_rk4_2" in trainer.callback_metrics


# ---------------------------------------------------------------------- FasterRCNN with a ContinuousNet body
class ContinuousNetFPN(nn.Module):
    """A detection backbone: the ODE stages' feature maps (``forward_intermediates``) into a feature pyramid."""

    def __init__(self, net: ContinuousNet, out_channels: int = 16) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = net
        self.fpn = FeaturePyramidNetwork([info["num_chs"] for info in net.feature_info], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(index), m) for index, m in enumerate(maps)))


class Detector(pl.LightningModule):
    """A user's detection module: no ``forward``; training calls ``self.model(images, targets)``; validation runs the
    detector and logs nothing (a mean average precision would need pycocotools)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.ops import MultiScaleRoIAlign

        net = ContinuousNet((8, 16, 32), in_chans=3, num_classes=0, scheme="euler", n_steps=1, T=1.0)
        anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
        self.model = FasterRCNN(
            ContinuousNetFPN(net), num_classes=None, min_size=32, max_size=32, rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=4, sampling_ratio=1),
            box_head=TwoMLPHead(16 * 4 * 4, 32), box_predictor=FastRCNNPredictor(32, 2),
            rpn_batch_size_per_image=32, box_batch_size_per_image=32,
        )

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = sum(self.model(list(images), list(targets)).values())
        self.log("train_loss", loss, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        self.model(list(images))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class BoxesDataset(Dataset):
    """32x32 noise images, each with one bright rectangle and its box."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.samples = []
        for _ in range(n):
            x0, y0 = (int(v) for v in torch.randint(0, 16, (2,), generator=generator))
            w, h = (int(v) for v in torch.randint(8, 16, (2,), generator=generator))
            image = 0.1 * torch.rand(3, 32, 32, generator=generator)
            image[:, y0:y0 + h, x0:x0 + w] += 0.8
            target = {"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                      "labels": torch.tensor([1])}
            self.samples.append((image, target))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def _detection_batches(samples):
    return tuple(zip(*samples))


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.held_new_parameters: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_train_epoch_start(self, trainer, pl_module):  # after the refinement callback
        (held,) = held_parameters(trainer)
        self.held_new_parameters.append(same_tensors(held, pl_module.parameters()))


def test_fasterrcnn_with_a_continuousnet_body_refines_with_the_default_callback(caplog):
    pytest.importorskip("torchvision")
    pl.seed_everything(0)
    module, recorder = Detector(), LossRecorder()
    callback = DepthRefinementCallback(refine_at=[1, 2])
    train = DataLoader(BoxesDataset(8), batch_size=4, collate_fn=_detection_batches)
    val = DataLoader(BoxesDataset(4), batch_size=4, collate_fn=_detection_batches)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback, recorder], **TRAINER)
    with caplog.at_level("INFO"):
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    net = module.model.backbone.body
    assert steps_per_stage(net) == [4, 4, 4] and [r.n_basis for r in net.stage_resolutions] == [4, 4, 4]
    assert recorder.held_new_parameters == [True, True, True]
    assert len(recorder.losses) == 6 and all(math.isfinite(loss) for loss in recorder.losses)
    said = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    assert said == ["DepthRefinementCallback: refinements are not measured (Detector.validation_step logs nothing); "
                    "refining anyway (choose what to measure with monitor= or metric=, or pass evaluate=False)"]
    assert [entry["metric"] for entry in callback.history] == [None, None]
