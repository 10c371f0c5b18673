"""Whether a training state is finite: a fused check without host synchronisation for every step, and an exact,
named answer for the failure path.

:func:`all_finite` answers for many tensors at once with one fused reduction per device and dtype;
:func:`nonfinite_names` names the culprits tensor by tensor. :class:`WatchedTensors` keeps the parameters and buffers
of a module between checks (gathering them costs more than checking them), and :func:`checked_tensors` /
:func:`named_checked_tensors` list what a check looks at, by :data:`CATEGORIES`.

Example:
    >>> tensors = [("weight", torch.ones(3)), ("bias", torch.tensor([float("nan")]))]
    >>> bool(all_finite([tensor for _, tensor in tensors], torch.device("cpu"))), nonfinite_names(tensors)
    (False, ['bias'])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_cnet.callbacks.snapshot import optimizer_parameters, same_objects

#: What a check looks at, in the order the messages name them.
CATEGORIES = ("loss", "gradients", "parameters", "buffers", "optimizer state")

#: What a failed check found: category -> (names of the non-finite tensors on this rank, tensors checked).
Findings = Mapping[str, tuple[list[str], int]]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-d bool tensor on ``device`` (no host sync).

    One fused ``torch._foreach_norm`` per device and dtype: a NaN or an infinity in any element makes its
    tensor's 2-norm non-finite. A finite tensor whose 2-norm overflows reads as non-finite too, so a ``False``
    must be confirmed with :func:`nonfinite_names`; a ``True`` is exact.

    Args:
        tensors: floating-point tensors, on any devices.
        device: where the answer lives.

    Example:
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])], torch.device("cpu"))
        tensor(False)
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flags = []
    for (_, dtype), group in groups.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32 if dtype in _HALF_TYPES else None)
        flags.append(torch.stack(norms).isfinite().all().to(device))
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def nonfinite_names(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity, checked element by element (one host sync).

    Example:
        >>> nonfinite_names([("a", torch.ones(2)), ("b", torch.tensor([float("nan")]))])
        ['b']
    """
    if not named_tensors:
        return []
    flags = torch.stack([tensor.isfinite().all().cpu() for _, tensor in named_tensors]).tolist()
    return [name for (name, _), finite in zip(named_tensors, flags) if not finite]


def is_float_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a dense floating-point tensor (what the checks look at)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_sparse


class WatchedTensors:
    """A module's floating-point parameters and buffers, gathered by a walk over its submodules and re-gathered only
    when asked or when the optimizers' parameters change (a depth refinement replaces them): the walk costs more
    than the check itself.

    Example:
        >>> layer = nn.BatchNorm1d(2)
        >>> watched = WatchedTensors()
        >>> watched.update(layer, []), watched.update(layer, []), len(watched.parameters), len(watched.buffers)
        (True, False, 2, 2)
    """

    def __init__(self) -> None:
        self.parameters: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self._held: list[torch.Tensor] = []

    def update(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], force: bool = False) -> bool:
        """Re-gather if ``force``, on the first call or if the optimizers or their parameters changed; return
        whether it did."""
        held = optimizer_parameters(optimizers)
        if (not force and self._optimizers is not None and same_objects(optimizers, self._optimizers)
                and same_objects(held, self._held)):
            return False
        self.parameters = [p for p in module.parameters() if p.is_floating_point()]
        self.buffers = [b for b in module.buffers() if is_float_tensor(b)]
        self._optimizers, self._held = list(optimizers), held
        return True


def checked_tensors(watched: WatchedTensors, optimizers: Sequence[torch.optim.Optimizer],
                    gradients: bool) -> list[torch.Tensor]:
    """The floating-point tensors of every checked category but the loss (the per-step path: no names)."""
    tensors = [p.grad for p in watched.parameters if is_float_tensor(p.grad)] if gradients else []
    tensors.extend(p.detach() for p in watched.parameters)
    tensors.extend(watched.buffers)
    tensors.extend(value for optimizer in optimizers for state in optimizer.state.values()
                   for value in state.values() if is_float_tensor(value))
    return tensors


def named_checked_tensors(module: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                          gradients: bool) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The checked tensors by category (all of :data:`CATEGORIES` but the loss), with names, for the messages (the
    failure path)."""
    params = [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]
    return {
        "gradients": [(f"{name}.grad", p.grad) for name, p in params if is_float_tensor(p.grad)] if gradients else [],
        "parameters": [(name, p.detach()) for name, p in params],
        "buffers": [(name, b) for name, b in module.named_buffers() if is_float_tensor(b)],
        "optimizer state": _named_state(optimizers, {id(p): name for name, p in params}),
    }


def _named_state(optimizers: Sequence[torch.optim.Optimizer],
                 names: Mapping[int, str]) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor of the optimizers' state, named ``<parameter>[<key>]``."""
    named = []
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if is_float_tensor(value):
                    named.append((f"{names.get(id(param), 'unnamed parameter')}[{key}]", value))
    return named


__all__ = ["CATEGORIES", "Findings", "WatchedTensors", "all_finite", "checked_tensors", "is_float_tensor",
           "named_checked_tensors", "nonfinite_names"]
