"""The module's own validation metric, measured from inside a training hook without side effects.

:class:`ValidationMetric` is what :class:`~lightning_cnet.callbacks.DepthRefinementCallback` and
:class:`~lightning_cnet.callbacks.ManifestationMonitor` measure: by default the quantities the LightningModule's own
``validation_step`` logs (:func:`~lightning_cnet.evaluation.measure_validation`), on the first few batches of the
first validation dataloader, or a user-given callable. The batches are moved and converted as in Lightning's own
validation loop (the strategy's ``batch_to_device``, the precision plugin's ``convert_input`` and
``val_step_context``, so ``64-true`` and ``bf16-true`` get batches of their dtype); the module runs in eval mode
(BatchNorm uses, and does not update, its running statistics) under ``no_grad``; the random number generators, the
train/eval mode of every submodule and the state of every torchmetrics ``Metric`` are restored afterwards; nothing
reaches Lightning's logged metrics or loops. Under DDP every rank measures its shard of the validation set and the
values are reduced across ranks, so all ranks get the same number.

Example:
    >>> measure = ValidationMetric(max_batches=10)  # doctest: +SKIP
    >>> measure(trainer, pl_module)  # doctest: +SKIP
    Measurement(name='val_acc', value=0.91, reason=None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from lightning_cnet._validation import check_integer
from lightning_cnet.batches import model_input
from lightning_cnet.evaluation import chosen_metric, defines, evaluation_mode, measure_validation, metric_states_kept

#: A user-given measurement: ``(trainer, pl_module) -> value or {name: value}``.
MetricFunction = Callable[[Any, Any], Any]


def _first(loaders: Any) -> Any | None:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _val_loader(trainer: Any) -> Any | None:
    loaders = trainer.val_dataloaders
    if loaders is None:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    return _first(loaders)


def training_inputs(trainer: Any, pl_module: Any, count: int) -> list[Any]:
    """The model inputs (:func:`~lightning_cnet.batches.model_input`) of the first ``count`` training batches, in
    dataset order, ready for the module.

    They are read from the training dataloader's dataset through a loader of their own (same batch size, no
    shuffling), so the training loader's sampler and iterator are not touched and every DDP rank gets the same
    inputs; they are moved to the device and converted by the precision plugin as training batches are.
    """
    loader = _first(trainer.train_dataloader)
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = _first(trainer.train_dataloader)
    if loader is None:
        raise RuntimeError("there is no training dataloader to take batches from")
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        source: Any = loader
    else:
        source = torch.utils.data.DataLoader(dataset, batch_size=loader.batch_size or 1, shuffle=False,
                                             collate_fn=loader.collate_fn)
    inputs: list[Any] = []
    with torch.random.fork_rng(devices=[]):
        for batch in source:
            if len(inputs) >= count:
                break
            batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
            inputs.append(model_input(batch, pl_module))
    return inputs


def validation_metrics(trainer: Any, pl_module: Any, max_batches: int | None = None) -> dict[str, float]:
    """Every scalar ``pl_module.validation_step`` logs, measured on the first validation dataloader (all ranks).

    Args:
        trainer: the running Trainer (either Lightning namespace).
        pl_module: the LightningModule.
        max_batches: measure at most this many batches per rank (``None``: all).

    Returns:
        ``{name: value}`` (empty if there is no validation data or the module logs nothing).
    """
    loader = _val_loader(trainer)
    if loader is None:
        return {}
    strategy, precision = trainer.strategy, trainer.precision_plugin
    return measure_validation(
        pl_module, loader, max_batches=max_batches,
        prepare=lambda batch: precision.convert_input(strategy.batch_to_device(batch)),
        step_context=precision.val_step_context,
        all_reduce=lambda tensor, op: strategy.reduce(tensor, reduce_op=op),
    )


@dataclass(frozen=True)
class Measurement:
    """One measured quantity.

    Attributes:
        name: what was measured (e.g. ``"val_loss"``); ``None`` if nothing could be.
        value: its value (``nan`` if nothing was measured).
        reason: why nothing was measured, in a few words (``None`` when something was).
    """

    name: str | None
    value: float
    reason: str | None = None


class ValidationMetric:
    """What the callbacks measure: one quantity the LightningModule's ``validation_step`` logs, or a user-given one.

    Which quantity: ``monitor`` if given; else the module's own ``monitor`` attribute (the classifier's is
    ``"val_acc"``), or the ``monitor`` of the Trainer's ``ModelCheckpoint``, whichever is logged first in that
    order; else the first quantity ``validation_step`` logs (often ``val_loss``).

    Args:
        monitor: the logged name to measure.
        metric: instead of ``validation_step``, call ``metric(trainer, pl_module)``, which returns a number (named
            ``monitor``, else after the function) or ``{name: value}``; it runs in eval mode under ``no_grad``, and
            the random generators and the module's modes and metric states are restored afterwards.
        max_batches: validation batches per rank (``None``: all).
    """

    def __init__(self, monitor: str | None = None, metric: MetricFunction | None = None,
                 max_batches: int | None = 10) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor={monitor!r} must be None or the name of a logged quantity")
        if metric is not None and not callable(metric):
            raise ValueError(f"metric={metric!r} must be None or a callable (trainer, pl_module) -> value")
        check_integer("max_batches", max_batches, optional=True)
        self.monitor = monitor
        self.metric = metric
        self.max_batches = max_batches

    def __call__(self, trainer: Any, pl_module: Any, name: str | None = None) -> Measurement:
        """Measure now; with ``name``, measure that quantity (the one an earlier measurement chose)."""
        values, reason = self._values(trainer, pl_module)
        if reason is not None:
            return Measurement(None, math.nan, reason)
        preferred = [getattr(pl_module, "monitor", None), getattr(trainer.checkpoint_callback, "monitor", None)]
        chosen = chosen_metric(values, monitor=name or self.monitor, preferred=[
            candidate for candidate in preferred if isinstance(candidate, str)])
        if chosen is None:
            wanted = name or self.monitor
            return Measurement(None, math.nan, f"{self._source(pl_module)} gives no {wanted!r} (it gives "
                                               f"{', '.join(map(repr, values))})")
        return Measurement(chosen, float(values[chosen]))

    def _values(self, trainer: Any, pl_module: Any) -> tuple[dict[str, float], str | None]:
        module_name = type(pl_module).__name__
        if self.metric is not None:
            with evaluation_mode(pl_module), metric_states_kept(pl_module):
                result = self.metric(trainer, pl_module)
            if isinstance(result, Real) or (isinstance(result, torch.Tensor) and result.numel() == 1):
                values = {str(self.monitor or getattr(self.metric, "__name__", "metric")): float(result)}
            elif isinstance(result, Mapping):
                values = {str(key): float(value) for key, value in result.items()}
            else:
                raise ValueError(f"metric returned {type(result).__name__}: expected a number or {{name: number}}")
            return values, None if values else f"{self._source(pl_module)} returned nothing"
        if _val_loader(trainer) is None:
            return {}, "there is no validation data"
        if not defines(pl_module, "validation_step"):
            return {}, f"{module_name} defines no validation_step"
        values = validation_metrics(trainer, pl_module, self.max_batches)
        return values, None if values else f"{module_name}.validation_step logs nothing"

    def _source(self, pl_module: Any) -> str:
        if self.metric is not None:
            return f"metric {getattr(self.metric, '__name__', repr(self.metric))}"
        return f"{type(pl_module).__name__}.validation_step"


__all__ = ["Measurement", "ValidationMetric", "training_inputs", "validation_metrics"]
