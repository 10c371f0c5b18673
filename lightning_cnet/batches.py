"""What a batch holds: the model input of a batch of any structure, its size, and moving it to a device.

A batch is whatever a DataLoader yields: a tensor, ``(images, targets)``, ``{"image": ..., "mask": ...}``, a dataclass,
``(list of images, list of box dicts)`` for a detector. Everything in the package that needs "the model input of this
batch" (BatchNorm recalibration, the callbacks, the studies) asks :func:`model_input`, and a LightningModule decides
for its own batches by defining ``model_input(self, batch)``.

Example:
    >>> import torch
    >>> batch = {"image": torch.zeros(4, 1, 8, 8), "mask": torch.zeros(4, 8, 8, dtype=torch.long)}
    >>> model_input(batch).shape, batch_size(batch)
    (torch.Size([4, 1, 8, 8]), 4)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import torch

#: Keys (of a mapping) or attributes (of a dataclass) read as the model input of a batch, in this order.
INPUT_KEYS = ("image", "images", "input", "inputs", "x")


def model_input(batch: Any, module: Any = None) -> Any:
    """The model input of ``batch``: what ``module(...)`` (or its backbone) takes.

    A module decides by defining ``model_input(self, batch)``; otherwise the input is the batch itself if it is a
    tensor, the first item of a tuple or list (``(images, targets)``, ``(images, boxes)``), or the entry ``"image"``
    (then ``"images"``, ``"input"``, ``"inputs"``, ``"x"``) of a mapping or a dataclass.

    Args:
        batch: a batch as the DataLoader yields it.
        module: the module the batch is for; its ``model_input`` method, if any, decides.

    Raises:
        ValueError: the default rules find no input in ``batch`` (the message says what to define).

    Example:
        >>> model_input((torch.zeros(2, 3), torch.tensor([0, 1]))).shape, model_input({"image": torch.ones(1)})
        (torch.Size([2, 3]), tensor([1.]))
    """
    hook = getattr(module, "model_input", None)
    if callable(hook):
        return hook(batch)
    return default_model_input(batch)


def default_model_input(batch: Any) -> Any:
    """The model input of ``batch`` by the default rules of :func:`model_input` (no module hook)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        key = next((key for key in INPUT_KEYS if key in batch), None)
        if key is not None:
            return batch[key]
    elif is_dataclass(batch) and not isinstance(batch, type):
        name = next((name for name in INPUT_KEYS if hasattr(batch, name)), None)
        if name is not None:
            return getattr(batch, name)
    elif isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    described = type(batch).__name__
    if isinstance(batch, Mapping):
        described += f" with keys {sorted(map(str, batch))}"
    raise ValueError(
        f"cannot tell the model input of a batch of type {described}: expected a tensor, a tuple or list whose first "
        f"item is the input, or a mapping or dataclass with one of {', '.join(map(repr, INPUT_KEYS))}; define "
        "model_input(self, batch) on the LightningModule to say which part of a batch the model takes"
    )


def batch_size(batch: Any) -> int:
    """Samples in ``batch``, counted as Lightning does: the length of the first tensor found in it (1 if none)."""
    found = _first_tensor(batch)
    return 1 if found is None or found.dim() == 0 else len(found)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, field.name) for field in fields(value))
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return None
    return next((found for found in map(_first_tensor, items) if found is not None), None)


def to_device(value: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``value`` with every tensor in it (tensors, tuples, lists, mappings, dataclasses) moved to ``device``; with
    ``dtype``, floating tensors are cast to it."""
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
        return moved.to(dtype) if dtype is not None and moved.is_floating_point() else moved
    if isinstance(value, Mapping):
        mapping: Callable[..., Any] = type(value)
        return mapping({key: to_device(item, device, dtype) for key, item in value.items()})
    if is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{field.name: to_device(getattr(value, field.name), device, dtype)
                              for field in fields(value) if field.init})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_device(item, device, dtype) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device, dtype) for item in value)
    return value


__all__ = ["INPUT_KEYS", "batch_size", "default_model_input", "model_input", "to_device"]
