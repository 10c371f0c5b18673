"""The training state held in memory: a copy of a module's parameters and buffers and of its optimizers' state,
restored in place (:class:`TrainingStateSnapshot`), and a learning-rate change that sticks with the LR schedulers
(:func:`scale_learning_rates`). Together they roll training back to a good state at a lower rate.

Example:
    >>> layer = nn.Linear(2, 2)
    >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.4)
    >>> snapshot = TrainingStateSnapshot(layer, [sgd])
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(float("nan"))
    >>> snapshot.restore()
    >>> scale_learning_rates([sgd], [], 0.5)
    >>> bool(layer.weight.isfinite().all()), sgd.param_groups[0]["lr"]
    (True, 0.2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def optimizer_parameters(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every parameter the param groups of ``optimizers`` hold, in order."""
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


def same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects in the same order (identity, not equality)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class TrainingStateSnapshot:
    """A copy of a module's parameters and buffers and of its optimizers' per-parameter state.

    :meth:`restore` writes the copies back *in place*: the parameter, buffer and state tensors keep their
    identity, so optimizers, LR schedulers, gradient scalers and ``DistributedDataParallel`` keep working on the
    same objects. :meth:`refresh` copies the current values into the existing copies without allocating. The
    snapshot holds one copy of every parameter, buffer and optimizer state tensor.

    A snapshot belongs to the tensors it was taken from: when a refinement replaces the parameters by new
    (larger) ones, :meth:`matches` turns ``False`` and a new snapshot must be taken.

    Args:
        module: the module whose parameters and buffers are copied.
        optimizers: optimizers whose state is copied (their param groups must hold the module's parameters).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> snapshot = TrainingStateSnapshot(layer, [sgd])
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(float("nan"))
        >>> snapshot.restore()
        >>> bool(layer.weight.isfinite().all())
        True
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self._tensors = [*module.parameters(), *module.buffers()]
        self._held = optimizer_parameters(self.optimizers)
        with torch.no_grad():
            self._copies = [tensor.detach().clone() for tensor in self._tensors]
        self._states: list[dict[torch.Tensor, dict[str, Any]]] = [
            {param: _cloned(optimizer.state[param]) for param in optimizer_parameters([optimizer])
             if optimizer.state.get(param)}
            for optimizer in self.optimizers
        ]

    def matches(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether ``module`` and ``optimizers`` still hold exactly the tensors and objects of this snapshot."""
        return (same_objects([*module.parameters(), *module.buffers()], self._tensors)
                and same_objects(optimizers, self.optimizers)
                and same_objects(optimizer_parameters(optimizers), self._held))

    def refresh(self) -> None:
        """Copy the current values into this snapshot (the objects must still :meth:`match`)."""
        with torch.no_grad():
            torch._foreach_copy_(self._copies, [tensor.detach() for tensor in self._tensors])
            for optimizer, saved in zip(self.optimizers, self._states):
                targets, sources = [], []
                for param in optimizer_parameters([optimizer]):
                    live = optimizer.state.get(param)
                    if not live:
                        saved.pop(param, None)
                    elif _same_layout(saved.get(param), live):
                        for key, value in live.items():
                            if isinstance(value, torch.Tensor):
                                targets.append(saved[param][key])
                                sources.append(value)
                            else:
                                saved[param][key] = value
                    else:
                        saved[param] = _cloned(live)
                if targets:
                    torch._foreach_copy_(targets, sources)

    def restore(self) -> None:
        """Write the copies back in place: parameters, buffers and optimizer state as they were at the last
        :meth:`refresh` (or construction); optimizer state created since is dropped."""
        with torch.no_grad():
            torch._foreach_copy_([tensor.detach() for tensor in self._tensors], self._copies)
            for optimizer, saved in zip(self.optimizers, self._states):
                targets, sources = [], []
                for param in optimizer_parameters([optimizer]):
                    kept = saved.get(param)
                    live = optimizer.state.get(param)
                    if not kept:
                        optimizer.state.pop(param, None)
                    elif live is not None and _same_layout(kept, live):
                        for key, value in kept.items():
                            if isinstance(value, torch.Tensor):
                                targets.append(live[key])
                                sources.append(value)
                            else:
                                live[key] = value
                    else:
                        optimizer.state[param] = _cloned(kept)
                if targets:
                    torch._foreach_copy_(targets, sources)


def _cloned(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.detach().clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def _same_layout(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two per-parameter states have the same keys, with tensors of the same shape, dtype and device."""
    if a is None or b is None or a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) != isinstance(other, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (
            value.shape != other.shape or value.dtype != other.dtype or value.device != other.device
        ):
            return False
    return True


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(factor)
    return value * factor


def scale_learning_rates(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply the learning rate by ``factor`` so that it sticks with the LR schedulers.

    Every param group's ``lr`` and ``initial_lr`` is scaled, and every scheduler's ``base_lrs`` and ``_last_lr``
    (the values ``LRScheduler`` subclasses recompute the rate from, and report), in place. Chainable schedules
    (``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``CosineAnnealingLR`` with ``eta_min=0``) and closed-form
    ones (``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingLR``) then continue from the scaled rate;
    ``ReduceLROnPlateau``'s ``min_lrs`` floor is left as it is.

    Args:
        optimizers: the optimizers whose param groups are scaled.
        schedulers: their LR schedulers (any object; those without ``base_lrs``/``_last_lr`` lists are left alone).
        factor: the multiplier (0.5 halves the rate).

    Example:
        >>> sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.4)
        >>> cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=4)
        >>> scale_learning_rates([sgd], [cosine], 0.5)
        >>> sgd.param_groups[0]["lr"], cosine.base_lrs
        (0.2, [0.2])
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = _scaled(group[key], factor)
    for scheduler in schedulers:
        for name in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list):
                values[:] = [_scaled(value, factor) for value in values]


__all__ = ["TrainingStateSnapshot", "optimizer_parameters", "same_objects", "scale_learning_rates"]
