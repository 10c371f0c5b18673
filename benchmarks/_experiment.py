"""One training run on the hard digits or Fashion-MNIST, measured the same way by every study script of ``benchmarks/``.

A run trains ``cnet_digits`` with the given scheme, final step count, refinement schedule (empty: full depth from
the start; or a plateau schedule that decides for itself), physical depth ``T`` and learning rate, then reports the
wall time and the process CPU time of ``trainer.fit`` (no validation during fit, except where a plateau schedule
needs it), the mean load average while it ran, the validation accuracy (what learning rates are chosen on), the
test accuracy, and the test accuracy with every ODE stage switched off (the stages-off baseline). ``seed`` drives
the initialisation, the data order and the data (the hard digits' distortions, validation and test images too;
Fashion-MNIST's held-out validation split), so two runs with the same seed see the same data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.data import HardDigitsDataModule, IDXDataModule
from lightning_cnet.module import ContinuousNetClassifier

DATASETS = ("hard-digits", "fashion-mnist")


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
        limit_eval_batches: Lightning's ``limit_val_batches`` and ``limit_test_batches`` for the final measurements
            (smoke runs).
        data: ``"hard-digits"`` (``image_size`` applies) or ``"fashion-mnist"`` (28x28).
        data_dir: the folder searched first for Fashion-MNIST's files (then the system's, see ``IDXDataModule``).
        val_size: Fashion-MNIST's training images held out for validation.
        batch_size: samples per batch.
        plateau_patience: if set, refine (``len(refine_at)`` times at most) when validation accuracy, measured after
            every epoch, has not risen by ``plateau_min_delta`` for this many epochs
            (:class:`~lightning_cnet.callbacks.PlateauSchedule`) instead of at ``refine_at``.
        plateau_min_delta: the smallest rise of validation accuracy (a fraction) that counts as an improvement.
        lr_restart: at every refinement the learning rate goes back to ``lr`` and a cosine, set every step, decays
            it to 0 at the end of training (instead of the per-epoch cosine over the whole run).
        checkpoint: save the trained run's Lightning checkpoint there.
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
    limit_eval_batches: float | int = 1.0
    data: str = "hard-digits"
    data_dir: str = "data"
    val_size: int = 5000
    batch_size: int = 64
    plateau_patience: int | None = None
    plateau_min_delta: float = 0.0
    lr_restart: bool = False
    checkpoint: str | None = None

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


class _CosineRestarts(pl.Callback):
    """Set the learning rate every step: ``lr`` at the start and after every refinement, then a cosine to 0 at the
    end of training (the refinements are read from the refinement callback's history)."""

    def __init__(self, lr: float, refinement: DepthRefinementCallback) -> None:
        self.lr = lr
        self.refinement = refinement

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        epoch, total = trainer.current_epoch, trainer.max_epochs
        start = max([0] + [entry["epoch"] for entry in self.refinement.history if entry["epoch"] <= epoch])
        position = (epoch + batch_idx / trainer.num_training_batches - start) / (total - start)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * position))


class _LoadSampler:
    """The 1-minute load average, sampled every ``interval`` seconds in a daemon thread while a ``with`` block runs."""

    def __init__(self, interval: float = 20.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> _LoadSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)


def datamodule(config: RunConfig) -> pl.LightningDataModule:
    """The run's data: the hard digits at ``image_size`` or Fashion-MNIST, seeded with ``seed``."""
    if config.data == "hard-digits":
        return HardDigitsDataModule(image_size=config.image_size, batch_size=config.batch_size, seed=config.seed)
    if config.data == "fashion-mnist":
        return IDXDataModule(dataset="fashion-mnist", data_dir=config.data_dir, val_size=config.val_size,
                             batch_size=config.batch_size, seed=config.seed)
    raise ValueError(f"data={config.data!r} is not known: expected one of {DATASETS}")


def _refinement_callback(config: RunConfig) -> DepthRefinementCallback:
    options: dict[str, Any] = dict(optimizer_state=config.optimizer_state, noise_std=config.noise_std,
                                   seed=config.seed, evaluate=False, verbose=False)
    if config.recalibrate_bn:
        options["recalibrate_bn"] = True
    if config.plateau_patience is None:
        return DepthRefinementCallback(list(config.refine_at), **options)
    from lightning_cnet.callbacks import PlateauSchedule

    schedule = PlateauSchedule("val_acc", patience=config.plateau_patience, min_delta=config.plateau_min_delta,
                               max_refinements=len(config.refine_at))
    return DepthRefinementCallback(schedule, **options)


def run(config: RunConfig) -> dict[str, Any]:
    """Train and measure one run (see the module docstring); returns accuracies in percent and seconds, the mean
    load average during ``fit`` (``load``), the final step count and the refinement epochs (``refine_epochs``)."""
    pl.seed_everything(config.seed, verbose=False)
    dm = datamodule(config)
    task = ContinuousNetClassifier(
        "cnet_digits", scheme=config.scheme, n_steps=config.start_steps, T=config.T, optimizer="sgd", lr=config.lr,
        momentum=0.9, weight_decay=5e-4, lr_schedule="constant" if config.lr_restart else "cosine",
    )
    callbacks: list[pl.Callback] = []
    if config.refine_at:
        callbacks.append(_refinement_callback(config))
        if config.lr_restart:
            callbacks.append(_CosineRestarts(config.lr, callbacks[0]))
    elif config.lr_restart:
        raise ValueError("lr_restart restarts the learning rate at refinements: it needs refine_at")
    validate = config.plateau_patience is not None
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        limit_val_batches=config.limit_eval_batches if validate else 0, limit_train_batches=config.limit_train_batches,
    )
    with _LoadSampler() as load:
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit(task, datamodule=dm)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if config.checkpoint:
        trainer.save_checkpoint(config.checkpoint)
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, limit_val_batches=config.limit_eval_batches,
                           limit_test_batches=config.limit_eval_batches)
    result: dict[str, Any] = {"wall": wall, "cpu": cpu, "load": load.mean,
                              "val_acc": _accuracy(evaluator, task, dm, "val"),
                              "test_acc": _accuracy(evaluator, task, dm, "test")}
    with task.model.stages_off():
        result["test_acc_stages_off"] = _accuracy(evaluator, task, dm, "test")
    history = callbacks[0].history if callbacks else []
    result["refine_seconds"] = sum(entry["seconds"] for entry in history)
    result["refine_epochs"] = " ".join(str(entry["epoch"]) for entry in history)
    result["final_steps"] = max(r.n_steps for r in task.model.resolution)
    if config.plateau_patience is None and any(r.n_steps != config.final_steps for r in task.model.resolution):
        raise RuntimeError(f"the run ended at {task.model.resolution}, not at {config.final_steps} steps")
    return result


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (1 gives the steadiest timings on a shared machine)."""
    torch.set_num_threads(threads)
