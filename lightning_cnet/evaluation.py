"""What the callbacks and the studies measure: the quantities a module's own ``validation_step`` logs.

A LightningModule already says what it measures: whatever its ``validation_step`` passes to ``self.log``
(``val_loss`` for most modules, ``val_acc`` for a classifier, a mean IoU for a segmenter). :func:`measure_validation`
runs that ``validation_step`` on a few batches and returns what it logged, reduced over the batches the way Lightning
reduces an epoch (a mean weighted by the batch size, or the ``reduce_fx`` it was logged with; a torchmetrics
``Metric`` is computed over the batches), without side effects: the module runs in eval mode under ``no_grad``, the
random number generators are restored, every torchmetrics ``Metric`` inside the module gets its state back, lists the
module keeps (``self.validation_step_outputs``) are cut back to their length, and nothing reaches Lightning's logger
or loops. :func:`model_input` is the one hook for "the model input of this
batch", whatever the batch's structure (tensor, tuple, dict, dataclass).

Nothing here imports Lightning: the callbacks (:mod:`lightning_cnet.callbacks.quick_eval`) add what a running
Trainer provides (device transfer, the precision plugin, the reduction across processes), and the studies call it
on materialised batches.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Regressor(nn.Module):  # any module with a validation_step that logs, e.g. a LightningModule
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(2, 1)
    ...     def validation_step(self, batch, batch_idx):
    ...         self.log("val_mse", torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"]))
    >>> module = Regressor()
    >>> batches = [{"x": torch.randn(4, 2), "y": torch.randn(4, 1)} for _ in range(3)]
    >>> sorted(measure_validation(module, batches))
    ['val_mse']
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import torch
from torch import nn
from torchmetrics import Metric

from lightning_cnet.batches import batch_size

#: Reductions of logged values that :func:`measure_validation` applies (Lightning's ``reduce_fx``).
REDUCTIONS = ("mean", "sum", "max", "min")
#: Modules whose LightningModule hooks are placeholders (a hook defined there is not the user's).
_LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.")


# ---------------------------------------------------------------------- what a module defines
def defines(module: Any, hook: str) -> bool:
    """Whether the class of ``module`` defines ``hook``, not only the placeholder of ``nn.Module`` or Lightning.

    Example:
        >>> defines(nn.Linear(1, 1), "forward"), defines(nn.Module(), "forward")
        (True, False)
    """
    for cls in type(module).__mro__:
        if hook in vars(cls):
            return cls is not nn.Module and not cls.__module__.startswith(_LIGHTNING_MODULES)
    return False


# ---------------------------------------------------------------------- capturing what validation_step logs
class LoggedValues:
    """Receives the ``self.log(...)`` calls of a module and reduces them over batches like Lightning's epoch end.

    A tensor or number logged with ``reduce_fx="mean"`` (the default) is averaged with the batch size as weight
    (``batch_size=`` if given, else :attr:`batch_size`); ``"sum"``, ``"max"`` and ``"min"`` reduce as named; a
    torchmetrics ``Metric`` is kept and computed at the end. Non-scalar values are ignored.

    Args:
        log: the module's own ``log`` method, whose signature is used to read positional arguments (``None``: a module
            without one; ``name``, ``value`` and keywords are read).
    """

    def __init__(self, log: Callable[..., Any] | None = None) -> None:
        self._signature = inspect.signature(log if log is not None else _plain_log)
        self.batch_size = 1
        self._totals: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._reductions: dict[str, str] = {}
        self._metrics: dict[str, Metric] = {}

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Record one logged value (the signature of ``LightningModule.log``)."""
        arguments = self._signature.bind(*args, **kwargs).arguments
        name, value = str(arguments["name"]), arguments["value"]
        if isinstance(value, Metric):
            self._metrics[name] = value
            return
        if isinstance(value, Mapping) or (isinstance(value, torch.Tensor) and value.numel() != 1):
            return
        reduction = _reduction_name(arguments.get("reduce_fx", "mean"))
        value = torch.as_tensor(value).detach().to(dtype=torch.float64).reshape(())
        weight = float(arguments.get("batch_size") or self.batch_size) if reduction == "mean" else 1.0
        if name not in self._totals:
            self._totals[name] = value * weight
            self._weights[name] = weight
            self._reductions[name] = reduction
            return
        total = self._totals[name]
        if reduction in ("mean", "sum"):
            self._totals[name] = total + value.to(total.device) * weight
        else:
            self._totals[name] = (torch.maximum if reduction == "max" else torch.minimum)(total, value.to(total.device))
        self._weights[name] += weight

    def values(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> dict[str, float]:
        """The reduced value of every logged name, in the order first logged.

        Args:
            all_reduce: ``(tensor, op) -> tensor`` combining a value across processes (``op`` is ``"sum"``,
                ``"max"`` or ``"min"``); ``None`` on one process. Every process must log the same names.
        """
        reduce = all_reduce or (lambda tensor, op: tensor)
        values: dict[str, float] = {}
        for name, total in self._totals.items():
            reduction = self._reductions[name]
            if reduction == "mean":
                pair = reduce(torch.stack([total, total.new_tensor(self._weights[name])]), "sum")
                values[name] = (pair[0] / pair[1]).item() if pair[1].item() > 0 else math.nan
            else:
                values[name] = reduce(total, reduction).item()
        for name, metric in self._metrics.items():  # compute() synchronises across processes itself
            values[name] = float(metric.compute())
        return values


def _plain_log(name: str, value: Any, *args: Any, reduce_fx: Any = "mean", batch_size: int | None = None,
               **kwargs: Any) -> None:
    """The signature read from a module that has no ``log`` method of its own."""


def _reduction_name(reduce_fx: Any) -> str:
    name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "")
    name = {"avg": "mean", "amax": "max", "amin": "min"}.get(name, name)
    if name not in REDUCTIONS:
        raise ValueError(f"reduce_fx={reduce_fx!r} cannot be measured: expected one of {', '.join(REDUCTIONS)}")
    return name


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and ``no_grad`` for the block; the random number generators and every submodule's train/eval mode
    are restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


#: Attributes of a torchmetrics ``Metric`` besides its states that say what it accumulated.
_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache")


@contextmanager
def metric_states_kept(module: nn.Module) -> Iterator[None]:
    """Reset every torchmetrics ``Metric`` inside ``module`` for the block and give each its state back afterwards,
    so that what the block accumulates (and computes) never reaches the epoch's own metrics."""
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    names = [[*m.metric_state, *(a for a in _METRIC_BOOKKEEPING if hasattr(m, a))] for m in metrics]
    saved = copy.deepcopy([{name: getattr(m, name) for name in keys} for m, keys in zip(metrics, names)])
    for metric in metrics:
        metric.reset()
    try:
        yield
    finally:
        for metric, state in zip(metrics, saved):
            for name, value in state.items():
                setattr(metric, name, value)


@contextmanager
def lists_kept(module: nn.Module) -> Iterator[None]:
    """Cut every list attribute of ``module`` back to its length after the block: what a ``validation_step`` appends
    for its epoch's end (Lightning's ``self.validation_step_outputs.append(...)`` pattern) does not stay."""
    lengths = {name: len(value) for name, value in vars(module).items() if type(value) is list}
    try:
        yield
    finally:
        for name, length in lengths.items():
            value = vars(module).get(name)
            if type(value) is list:
                del value[length:]


@contextmanager
def logs_captured(module: nn.Module) -> Iterator[LoggedValues]:
    """Route ``module.log`` (and so ``log_dict``) to a :class:`LoggedValues` for the block."""
    recorder = LoggedValues(getattr(module, "log", None))
    own = module.__dict__.get("log")
    module.__dict__["log"] = recorder.log
    try:
        yield recorder
    finally:
        if own is None:
            del module.__dict__["log"]
        else:
            module.__dict__["log"] = own


def measure_validation(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    prepare: Callable[[Any], Any] | None = None,
    step_context: Callable[[], Any] | None = None,
    all_reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run ``module.validation_step`` on ``batches`` and return every scalar it logs, reduced over the batches.

    Side-effect free (see the module docstring). A module that defines no ``validation_step`` of its own gives ``{}``.

    Args:
        module: a LightningModule (or any module with ``validation_step`` and ``log``).
        batches: batches as the DataLoader yields them.
        max_batches: use at most this many batches.
        prepare: applied to each batch first (a Trainer's device transfer and precision conversion).
        step_context: a context manager factory entered around each step (a precision plugin's ``val_step_context``).
        all_reduce: ``(tensor, op) -> tensor`` across processes (see :meth:`LoggedValues.values`).

    Returns:
        ``{name: value}`` in the order first logged.
    """
    if not defines(module, "validation_step"):
        return {}
    with evaluation_mode(module), metric_states_kept(module), lists_kept(module), logs_captured(module) as recorder:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if prepare is not None:
                batch = prepare(batch)
            recorder.batch_size = batch_size(batch)
            with step_context() if step_context is not None else nullcontext():
                cast(Callable[..., Any], module.validation_step)(batch, index)
        return recorder.values(all_reduce)


def chosen_metric(values: Mapping[str, float], *, monitor: str | None = None,
                  preferred: Sequence[str | None] = ()) -> str | None:
    """The name to report among measured ``values``: ``monitor`` if given (``None`` if it was not measured), else the
    first of ``preferred`` that was measured, else the first value measured.

    Example:
        >>> chosen_metric({"val_loss": 0.3, "val_acc": 0.9}, preferred=[None, "val_acc"])
        'val_acc'
        >>> chosen_metric({"val_loss": 0.3}, preferred=["val_acc"])
        'val_loss'
    """
    if monitor is not None:
        return monitor if monitor in values else None
    return next((name for name in preferred if name is not None and name in values), next(iter(values), None))


__all__ = [
    "LoggedValues",
    "chosen_metric",
    "defines",
    "evaluation_mode",
    "lists_kept",
    "logs_captured",
    "measure_validation",
    "metric_states_kept",
]
