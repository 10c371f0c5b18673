"""ContinuousNetClassifier: training on tiny data, logged metrics, checkpoints, hyperparameters, optimizers."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet.cli import ContinuousNetCLI
from lightning_cnet.data import DigitsDataModule
from lightning_cnet.module import ContinuousNetClassifier
from lightning_cnet.task import check_checkpoint

#: Parameters of the pre-activation ResNet with one block per stage and widths 8-16-32 on one input channel
#: (the digits baseline, measured independently): the one-step, one-piece ContinuousNet has the same tensors
#: plus one skip-init gate scalar per stage.
RESNET_8_16_32_PARAMETERS = 42_946


class TinyDigits(pl.LightningDataModule):
    """The first 256 digits at 8x8 as one loader per split (fast)."""

    num_classes, in_chans = 10, 1

    def __init__(self) -> None:
        super().__init__()
        digits = DigitsDataModule(image_size=8, batch_size=64)
        digits.setup()
        images, labels = digits.train_dataset.tensors
        self.dataset = TensorDataset(images[:256], labels[:256])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=128)

    test_dataloader = val_dataloader


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=4, logger=pl.loggers.CSVLogger(tmp_path, name="run"), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**options, **kwargs})


def _epoch_metrics(trainer: pl.Trainer) -> list[dict[str, float]]:
    import csv

    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
    by_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        epoch = int(float(row["epoch"]))
        by_epoch.setdefault(epoch, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_training_lowers_the_loss_and_logs_resolution(tmp_path):
    pl.seed_everything(0)
    task = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=2, lr=0.05, lr_schedule="constant")
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=TinyDigits())
    epochs = _epoch_metrics(trainer)
    assert len(epochs) == 4
    assert epochs[-1]["train_loss_epoch"] < 0.6 * epochs[0]["train_loss_epoch"]
    assert epochs[-1]["val_acc"] > 0.5  # 10 balanced classes: chance is 0.1
    last = epochs[-1]
    for stage in range(3):
        assert last[f"resolution/n_steps_stage{stage}"] == 2
        assert last[f"resolution/n_basis_stage{stage}"] == 2
    assert last["nfe"] == 3 * 2 * 4  # 3 stages x 2 steps x 4 RK4 evaluations
    assert last["resolution/scheme_order"] == 4
    assert "train_acc" in last and "val_acc_top5" in last


def test_parameter_count_logged_matches_the_resnet_baseline(tmp_path):
    task = ContinuousNetClassifier("cnet_digits", scheme="euler", n_steps=1)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(task, datamodule=TinyDigits())
    assert _epoch_metrics(trainer)[-1]["resolution/parameters"] == RESNET_8_16_32_PARAMETERS + 3


def test_top5_accuracy_does_not_share_state_with_top1():
    task = ContinuousNetClassifier("cnet_digits")
    metrics = task.metrics["val_metrics"]
    targets = torch.tensor([0, 1])
    right = torch.eye(10)[targets] * 10
    second_best = torch.eye(10)[targets] * 5 + torch.eye(10)[[3, 3]] * 10  # target ranked 2nd
    metrics.update(right, targets)  # identical top-1 and top-5 states after the first batch
    metrics.update(second_best, targets)
    values = metrics.compute()
    assert values["val_acc"].item() == pytest.approx(0.5)
    assert values["val_acc_top5"].item() == pytest.approx(1.0)


def test_load_from_checkpoint_restores_hparams_and_outputs(tmp_path):
    pl.seed_everything(1)
    task = ContinuousNetClassifier("cnet_digits", scheme="midpoint", n_steps=2, n_basis=1, lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=TinyDigits())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    hparams = torch.load(path, weights_only=False)["hyper_parameters"]
    assert {k: hparams[k] for k in ("model", "scheme", "n_steps", "n_basis", "lr")} == {
        "model": "cnet_digits", "scheme": "midpoint", "n_steps": 2, "n_basis": 1, "lr": 0.05}
    loaded = ContinuousNetClassifier.load_from_checkpoint(path)
    images = torch.randn(4, 1, 8, 8)
    task.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), task(images), rtol=0, atol=0)
    assert loaded.model.resolution == task.model.resolution


def test_num_classes_that_does_not_match_the_data_fails_at_setup(tmp_path):
    task = ContinuousNetClassifier("cnet_digits", num_classes=5)
    with pytest.raises(ValueError, match=r"num_classes=5 .* num_classes=10"):
        _trainer(tmp_path, max_epochs=1).fit(task, datamodule=TinyDigits())


def test_checkpoint_of_another_model_is_refused_before_loading():
    digits = ContinuousNetClassifier("cnet_digits")
    cifar = ContinuousNetClassifier("cnet_cifar")
    checkpoint = {"state_dict": cifar.state_dict(), "hyper_parameters": dict(cifar.hparams)}
    with pytest.raises(ValueError, match=r"model\.stem\.weight has shape \[16, 3, 3, 3\] .* \[8, 1, 3, 3\]"):
        check_checkpoint(digits, checkpoint)
    # a finer checkpoint of the same model is accepted: loading refines the stages
    fine = ContinuousNetClassifier("cnet_digits", n_steps=2)
    check_checkpoint(digits, {"state_dict": fine.state_dict(), "hyper_parameters": dict(fine.hparams)})


def test_step_schedule_decays_at_the_milestones():
    task = ContinuousNetClassifier("cnet_digits", lr=0.1, lr_schedule="step", milestones=[2, 3], gamma=0.5)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(task.parameters())
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.025])


def test_cli_optimizer_and_lr_scheduler_override_the_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = ContinuousNetCLI(
        ["--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.003",
         "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "2"],
        run=False,
    )
    optimizers, schedulers = cli.model.configure_optimizers()
    (optimizer,), (scheduler,) = optimizers, schedulers
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.003
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 2
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(cli.model.parameters())

    plain = ContinuousNetCLI(["--model.init_args.optimizer", "adamw", "--model.init_args.lr", "0.002"], run=False)
    plain.model.trainer = plain.trainer
    config = plain.model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW) and config["optimizer"].defaults["lr"] == 0.002
    assert math.isclose(plain.model.hparams.lr, 0.002)


def test_model_kwargs_and_the_flat_form_build_the_same_backbone(tmp_path):
    torch.manual_seed(0)
    nested = ContinuousNetClassifier("cnet_digits", model_kwargs={"scheme": "rk4", "n_steps": 2, "T": 2.0})
    torch.manual_seed(0)
    flat = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=2, T=2.0)
    assert nested.model.resolution == flat.model.resolution
    for ours, theirs in zip(nested.state_dict().values(), flat.state_dict().values()):
        assert torch.equal(ours, theirs)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(nested, datamodule=TinyDigits())
    trainer.save_checkpoint(tmp_path / "nested.ckpt")
    loaded = ContinuousNetClassifier.load_from_checkpoint(tmp_path / "nested.ckpt")
    assert loaded.hparams.model_kwargs == {"scheme": "rk4", "n_steps": 2, "T": 2.0}
    assert loaded.model.resolution == nested.model.resolution
    with pytest.raises(ValueError, match=r"model_kwargs has 'stages', which cnet_digits does not take; .*n_steps"):
        ContinuousNetClassifier("cnet_digits", model_kwargs={"stages": 3})
    with pytest.raises(ValueError, match=r"model_kwargs has num_classes=3 but the task has num_classes=5"):
        ContinuousNetClassifier("cnet_digits", num_classes=5, model_kwargs={"num_classes": 3})


def test_a_batch_without_samples_is_one_clear_error():
    task = ContinuousNetClassifier("cnet_digits")
    empty = (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    for step, split in ((task.training_step, "train"), (task.validation_step, "val"), (task.test_step, "test")):
        with pytest.raises(ValueError, match=rf"^{split} batch 3 has no samples \(images of shape \[0, 1, 8, 8\]\); "):
            step(empty, 3)
