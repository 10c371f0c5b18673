"""Evaluating a model on a fixed set of batches: accuracy, loss, distance of the logits to a reference, latency.

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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def as_batches(
    data: Iterable[Any], *, limit: int | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> list[Batch]:
    """Materialise ``(inputs, targets)`` batches (e.g. of a DataLoader) once, so every evaluation sees the same ones.

    Args:
        data: an iterable of ``(inputs, targets)`` tuples.
        limit: keep at most this many batches.
        device: move the tensors there.
        dtype: cast the inputs to this floating dtype.

    Raises:
        ValueError: no batch, or a batch that is not an ``(inputs, targets)`` pair of tensors.
    """
    batches: list[Batch] = []
    for batch in data:
        if limit is not None and len(batches) >= limit:
            break
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(
                isinstance(t, torch.Tensor) for t in batch[:2])):
            raise ValueError(f"expected (inputs, targets) batches of tensors, got {type(batch).__name__}")
        inputs, targets = batch[0].to(device), batch[1].to(device)
        batches.append((inputs if dtype is None else inputs.to(dtype), targets))
    if not batches:
        raise ValueError("the data yielded no batches to evaluate on")
    return batches


@torch.inference_mode()
def logits_of(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The model's outputs (in eval mode) for every batch."""
    model.eval()
    return [model(inputs) for inputs, _ in batches]


@torch.inference_mode()
def evaluate(
    model: nn.Module, batches: Sequence[Batch], *, reference: Sequence[torch.Tensor] | None = None
) -> dict[str, float]:
    """Accuracy, mean cross-entropy, latency and (with ``reference``) the relative distance of the logits.

    The model runs in eval mode, without autograd (inference mode). The latency is the median over batches; with
    fewer than three batches the first one is run once more beforehand, untimed, so that one-off costs do not count.

    Args:
        model: the model (its current manifestation is evaluated).
        batches: materialised batches (:func:`as_batches`).
        reference: logits of a reference manifestation for the same batches; the distance is
            ``||logits - reference||_F / ||reference||_F`` over all of them.

    Returns:
        ``accuracy`` (in [0, 1]), ``loss``, ``logit_distance`` (``nan`` without a reference), ``ms_per_batch``
        (median), ``function_evaluations`` (residual evaluations per forward, ``nan`` if the model has none).
    """
    if not batches:
        raise ValueError("the data yielded no batches to evaluate on")
    model.eval()
    if len(batches) < 3:
        model(batches[0][0])
    correct, total, loss, milliseconds = 0, 0, 0.0, []
    squared_difference, squared_reference = 0.0, 0.0
    for index, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        logits = model(inputs)
        milliseconds.append(1000.0 * (time.perf_counter() - start))
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        total += targets.numel()
        loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        if reference is not None:
            squared_difference += (logits - reference[index]).double().square().sum().item()
            squared_reference += reference[index].double().square().sum().item()
    distance = math.sqrt(squared_difference / squared_reference) if reference is not None else math.nan
    return {
        "accuracy": correct / total,
        "loss": loss / total,
        "logit_distance": distance,
        "ms_per_batch": statistics.median(milliseconds),
        "function_evaluations": float(getattr(model, "function_evaluations", math.nan)),
    }
