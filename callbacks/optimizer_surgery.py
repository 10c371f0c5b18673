"""Point an existing optimizer at parameters that replaced the ones it was built with.

After a change of resolution every time-dependent ``nn.Parameter`` is a new object with ``K_new``
coefficients on dim 0. :func:`replace_parameters` swaps each old tensor for its successor *at the same
position* of its param group (so the order matches what a fresh ``configure_optimizers`` would build and
saved optimizer states reload), and carries the per-parameter state over:

* ``"interpolate"``: every state tensor shaped like the parameter (momentum, Adam moments) is mapped with
  the parameter's own coefficient matrix; second-moment entries are clamped at 0; scalar entries (Adam's
  ``step``) are copied.
* ``"reset"``: the new parameters start with no state, as in a freshly built optimizer.

Example:
    >>> import torch
    >>> old = torch.nn.Parameter(torch.ones(2, 3))
    >>> sgd = torch.optim.SGD([old], lr=0.1, momentum=0.9)
    >>> old.grad = torch.ones(2, 3); sgd.step()
    >>> new = torch.nn.Parameter(torch.ones(4, 3))
    >>> duplicate = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> replace_parameters(sgd, {old: (new, duplicate)}, optimizer_state="interpolate")
    1
    >>> sgd.param_groups[0]["params"][0] is new, tuple(sgd.state[new]["momentum_buffer"].shape)
    (True, (4, 3))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from lightning_cnet.bases import Basis

OptimizerState = Literal["interpolate", "reset"]
ParameterMap = Mapping[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]


def _interpolated_state(state: dict[str, object], old: torch.Tensor, matrix: torch.Tensor) -> dict[str, object] | None:
    """The state mapped through ``matrix``, or ``None`` if some entry cannot be mapped."""
    mapped: dict[str, object] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            mapped[key] = value
        elif value.dim() == 0 or (key == "step" and value.numel() == 1):
            mapped[key] = value.clone()
        elif value.shape == old.shape:
            tensor = Basis.apply(matrix, value)
            mapped[key] = tensor.clamp_(min=0) if "sq" in key else tensor
        else:
            return None
    return mapped


def replace_parameters(
    optimizer: torch.optim.Optimizer, parameter_map: ParameterMap, *, optimizer_state: OptimizerState = "interpolate"
) -> int:
    """Replace old parameters by their successors in ``optimizer``, in place.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its param groups and state are edited).
        parameter_map: old parameter -> (new parameter, coefficient matrix ``[K_new, K_old]``).
        optimizer_state: ``"interpolate"`` or ``"reset"`` the state of replaced parameters. State that is
            not shaped like its parameter (e.g. factored second moments) is always reset.

    Returns:
        The number of parameters replaced.
    """
    if optimizer_state not in ("interpolate", "reset"):
        raise ValueError(f"optimizer_state={optimizer_state!r} is not known: expected 'interpolate' or 'reset'")
    replaced = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for index, param in enumerate(params):
            successor = parameter_map.get(param)
            if successor is None:
                continue
            new, matrix = successor
            params[index] = new
            replaced += 1
            old_state = optimizer.state.pop(param, None)
            if old_state and optimizer_state == "interpolate":
                new_state = _interpolated_state(old_state, param, matrix)
                if new_state is not None:
                    optimizer.state[new] = new_state
    return replaced


def stale_parameters(optimizers: Iterable[torch.optim.Optimizer], module: nn.Module) -> list[torch.Tensor]:
    """Tensors an optimizer updates that are no longer parameters of ``module``."""
    current = {id(p) for p in module.parameters()}
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"] if id(p) not in current]


def optimized_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """Ids of all tensors held by the optimizers' param groups."""
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
