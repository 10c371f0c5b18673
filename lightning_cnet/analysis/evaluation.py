"""Evaluating a model on a fixed set of batches: its metrics, the distance of its outputs to a reference, latency.

What is measured depends on what the batches were made for (:func:`as_batches`):

* for a classifier's ContinuousNet (``(images, labels)`` batches and class logits): accuracy and cross-entropy;
* with ``task=`` a LightningModule holding the ContinuousNet (any task, any batch structure): the quantities the
  task's own ``validation_step`` logs (:func:`~lightning_cnet.evaluation.measure_validation`), with the evaluated
  model put in the place of the task's ContinuousNet, and the distance of the task's outputs.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", n_steps=2).eval()
    >>> batches = as_batches([(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))])
    >>> sorted(evaluate(model, batches))
    ['accuracy', 'function_evaluations', 'logit_distance', 'loss', 'ms_per_batch']
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet.batches import model_input, to_device
from lightning_cnet.evaluation import defines, measure_validation

#: A materialised batch: ``(inputs, targets)`` for a classifier, any structure for a task.
Batch = Any


class Batches(list[Any]):
    """Materialised batches, and the task (if any) whose ``validation_step`` measures them (:func:`evaluate`)."""

    task: nn.Module | None = None


def as_batches(
    data: Iterable[Any], *, limit: int | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None, task: nn.Module | None = None,
) -> Batches:
    """Materialise batches (e.g. of a DataLoader) once, so every evaluation sees the same ones.

    Args:
        data: an iterable of batches: ``(inputs, targets)`` tuples, or with ``task`` any structure the task's
            ``validation_step`` takes (dicts, dataclasses, ...).
        limit: keep at most this many batches.
        device: move the tensors there.
        dtype: cast the floating tensors (inputs) to this dtype.
        task: measure with this LightningModule's ``validation_step`` (see the module docstring).

    Raises:
        ValueError: no batch; without ``task``, a batch that is not an ``(inputs, targets)`` pair of tensors.
    """
    batches = Batches()
    batches.task = task
    for batch in data:
        if limit is not None and len(batches) >= limit:
            break
        if task is None:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(
                    isinstance(t, torch.Tensor) for t in batch[:2])):
                raise ValueError(f"expected (inputs, targets) batches of tensors, got {type(batch).__name__}")
            inputs, targets = batch[0].to(device), batch[1].to(device)
            batches.append((inputs if dtype is None else inputs.to(dtype), targets))
        else:
            batches.append(to_device(batch, device, dtype))
    if not batches:
        raise ValueError("the data yielded no batches to evaluate on")
    return batches


def _task(batches: Sequence[Batch]) -> nn.Module | None:
    return getattr(batches, "task", None)


@contextmanager
def _in_place_of_backbone(task: nn.Module, model: nn.Module) -> Iterator[None]:
    """``model`` in the place of the task's (first) ContinuousNet for the block."""
    from lightning_cnet.callbacks.depth_refinement import refinable_modules

    nets = refinable_modules(task)
    if not nets or nets[0] is model:
        yield
        return
    path = next(name for name, module in task.named_modules() if module is nets[0])
    task.set_submodule(path, model)
    try:
        yield
    finally:
        task.set_submodule(path, nets[0])


@torch.no_grad()
def logits_of(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The outputs (in eval mode) for every batch: the model's, or the task's with ``model`` as its ContinuousNet
    (none if the task has no ``forward``)."""
    task = _task(batches)
    model.eval()
    if task is None:
        return [model(inputs) for inputs, _ in batches]
    if not defines(task, "forward"):
        return []
    task.eval()
    with _in_place_of_backbone(task, model):
        return [task(model_input(batch, task)) for batch in batches]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[Batch], *, reference: Sequence[torch.Tensor] | None = None
) -> dict[str, float]:
    """Metrics, latency and (with ``reference``) the relative distance of the outputs.

    The model runs in eval mode, without autograd (inference mode). The latency is the median over batches; with
    fewer than three batches the first one is run once more beforehand, untimed, so that one-off costs do not count.

    Args:
        model: the model (its current manifestation is evaluated).
        batches: materialised batches (:func:`as_batches`); made with a ``task``, the task measures.
        reference: outputs of a reference manifestation for the same batches (:func:`logits_of`); the distance is
            ``||outputs - reference||_F / ||reference||_F`` over all of them.

    Returns:
        Without a task: ``accuracy`` (in [0, 1]) and ``loss`` (cross-entropy) when the outputs are class logits for
        the targets. With a task: every quantity its ``validation_step`` logs. Always ``logit_distance`` (``nan``
        without a reference or outputs), ``ms_per_batch`` (median) and ``function_evaluations`` (residual
        evaluations per forward, ``nan`` if the model has none).
    """
    return evaluate_with_outputs(model, batches, reference=reference)[0]


@torch.no_grad()
def evaluate_with_outputs(
    model: nn.Module, batches: Sequence[Batch], *, reference: Sequence[torch.Tensor] | None = None
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """:func:`evaluate`, and the outputs it measured (those of :func:`logits_of`; none for a task without
    ``forward``), to be used as another evaluation's ``reference``."""
    if not batches:
        raise ValueError("the data yielded no batches to evaluate on")
    task = _task(batches)
    if task is None:
        metrics, outputs, milliseconds = _classification(model, batches)
    else:
        metrics, outputs, milliseconds = _measured_by_task(task, model, batches)
    distance = math.nan
    if reference is not None and outputs:
        difference = sum((out - ref).double().square().sum().item() for out, ref in zip(outputs, reference))
        distance = math.sqrt(difference / sum(ref.double().square().sum().item() for ref in reference))
    return {
        **metrics,
        "logit_distance": distance,
        "ms_per_batch": statistics.median(milliseconds),
        "function_evaluations": float(getattr(model, "function_evaluations", math.nan)),
    }, outputs


def _classification(model: nn.Module, batches: Sequence[Batch]) -> tuple[dict[str, float], list[torch.Tensor],
                                                                         list[float]]:
    model.eval()
    if len(batches) < 3:
        model(batches[0][0])
    outputs, milliseconds = [], []
    for inputs, _ in batches:
        start = time.perf_counter()
        outputs.append(model(inputs))
        milliseconds.append(1000.0 * (time.perf_counter() - start))
    targets = [targets for _, targets in batches]
    if not all(out.dim() == 2 and t.dim() == 1 and not t.is_floating_point() for out, t in zip(outputs, targets)):
        return {}, outputs, milliseconds  # no classes: no accuracy
    total = sum(t.numel() for t in targets)
    correct = sum((out.argmax(dim=-1) == t).sum().item() for out, t in zip(outputs, targets))
    loss = sum(F.cross_entropy(out.float(), t, reduction="sum").item() for out, t in zip(outputs, targets))
    return {"accuracy": correct / total, "loss": loss / total}, outputs, milliseconds


def _measured_by_task(task: nn.Module, model: nn.Module, batches: Sequence[Batch]) -> tuple[
        dict[str, float], list[torch.Tensor], list[float]]:
    with _in_place_of_backbone(task, model):
        metrics = measure_validation(task, batches)
    outputs = logits_of(model, batches)  # the first batch runs untimed here
    milliseconds = []
    with _in_place_of_backbone(task, model):
        for batch in batches:
            start = time.perf_counter()
            if outputs:
                task(model_input(batch, task))
            else:
                measure_validation(task, [batch])
            milliseconds.append(1000.0 * (time.perf_counter() - start))
    return metrics, outputs, milliseconds
