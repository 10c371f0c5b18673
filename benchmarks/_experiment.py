"""One training run on the hard digits, measured the same way by every study script of ``benchmarks/``.

A run trains ``cnet_digits`` with the given scheme, final step count, refinement schedule (empty: full depth from
the start), physical depth ``T`` and learning rate, then reports the wall time of ``trainer.fit`` (no validation
during fit), the validation accuracy (what learning rates are chosen on), the test accuracy, and the test accuracy
with every ODE stage switched off (the stages-off baseline). ``seed`` drives the initialisation, the data order and
the data's distortions (the validation and test images too), so two runs with the same seed see the same data.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.data import HardDigitsDataModule
from lightning_cnet.module import ContinuousNetClassifier


@dataclass(frozen=True)
class RunConfig:
    """What one run trains.

    Args:
        scheme: Runge-Kutta scheme of training.
        final_steps: steps (and pieces) per stage at the end of training.
        refine_at: epochs of the refinements (``()``: ``final_steps`` from the start; else it must double
            ``final_steps / 2**len(refine_at)`` up to ``final_steps``).
        T: physical depth of each stage.
        lr: peak learning rate (SGD, Nesterov momentum 0.9, weight decay 5e-4, cosine schedule).
        epochs: training epochs.
        seed: seed of the initialisation, the data order and the data.
        image_size: side of the digits.
        optimizer_state: ``"interpolate"`` or ``"reset"`` the optimizer state at a refinement.
        noise_std: refinement noise.
        recalibrate_bn: re-estimate BatchNorm statistics right after each refinement.
        limit_train_batches: Lightning's ``limit_train_batches`` (smoke runs).
    """

    scheme: str = "rk4"
    final_steps: int = 8
    refine_at: tuple[int, ...] = (3, 6, 9)
    T: float = 8.0
    lr: float = 0.1
    epochs: int = 12
    seed: int = 0
    image_size: int = 16
    optimizer_state: str = "interpolate"
    noise_std: float = 0.0
    recalibrate_bn: bool = False
    limit_train_batches: float | int = 1.0

    @property
    def start_steps(self) -> int:
        start, remainder = divmod(self.final_steps, 2 ** len(self.refine_at))
        if remainder or start < 1:
            raise ValueError(f"final_steps={self.final_steps} is not a start count doubled {len(self.refine_at)} times")
        return start

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _accuracy(trainer: pl.Trainer, task: ContinuousNetClassifier, dm: pl.LightningDataModule, split: str) -> float:
    run = trainer.validate if split == "val" else trainer.test
    return 100.0 * run(task, datamodule=dm, verbose=False)[0][f"{split}_acc"]


def run(config: RunConfig) -> dict[str, float]:
    """Train and measure one run (see the module docstring); returns accuracies in percent and seconds."""
    pl.seed_everything(config.seed, verbose=False)
    dm = HardDigitsDataModule(image_size=config.image_size, batch_size=64, seed=config.seed)
    task = ContinuousNetClassifier(
        "cnet_digits", scheme=config.scheme, n_steps=config.start_steps, T=config.T, optimizer="sgd", lr=config.lr,
        momentum=0.9, weight_decay=5e-4, lr_schedule="cosine",
    )
    callbacks = []
    if config.refine_at:
        options: dict[str, Any] = dict(optimizer_state=config.optimizer_state, noise_std=config.noise_std,
                                       seed=config.seed, evaluate=False, verbose=False)
        if config.recalibrate_bn:
            options["recalibrate_bn"] = True
        callbacks.append(DepthRefinementCallback(list(config.refine_at), **options))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        limit_val_batches=0, limit_train_batches=config.limit_train_batches,
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    wall = time.perf_counter() - start
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    result = {"wall": wall, "val_acc": _accuracy(evaluator, task, dm, "val"),
              "test_acc": _accuracy(evaluator, task, dm, "test")}
    with task.model.stages_off():
        result["test_acc_stages_off"] = _accuracy(evaluator, task, dm, "test")
    result["refine_seconds"] = sum(entry["seconds"] for entry in callbacks[0].history) if callbacks else 0.0
    if any(r.n_steps != config.final_steps for r in task.model.resolution):
        raise RuntimeError(f"the run ended at {task.model.resolution}, not at {config.final_steps} steps")
    return result


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (1 gives the steadiest timings on a shared machine)."""
    torch.set_num_threads(threads)
