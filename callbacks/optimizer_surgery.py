"""Point an existing optimizer at the parameters that replaced the ones it was built with.

After a change of resolution every time-dependent layer holds new ``nn.Parameter`` objects (``K_new`` pieces
instead of ``K_old``), each a linear combination of old pieces (:class:`~lightning_cnet.layers.ParameterChange`).
:func:`replace_parameters` puts a layer's new parameters where its old ones stood in each param group, in module
order (so a group built from ``model.parameters()`` gets exactly the order a fresh ``configure_optimizers`` would
build, and saved optimizer states reload), and carries the per-parameter state over:

* ``"interpolate"``: every state tensor shaped like its parameter (momentum, Adam moments) is combined with the
  parameter's own coefficients (a source piece without state, never stepped, counts as zero); second-moment
  entries are clamped at 0; Adam's ``step`` is copied from the first source with state.
* ``"reset"``: the new parameters start with no state, as in a freshly built optimizer.

Example:
    >>> import torch
    >>> from lightning_cnet.layers import TimeLinear
    >>> layer = TimeLinear(3, 3, n_basis=1, bias=False)
    >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    >>> layer(torch.ones(1, 3), ((0, 1.0),)).sum().backward(); sgd.step()
    >>> change = layer.resample(torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    >>> replace_parameters(sgd, [change], optimizer_state="interpolate")
    2
    >>> [p is q for p, q in zip(sgd.param_groups[0]["params"], layer.parameters())]
    [True, True]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from lightning_cnet.layers import ParameterChange

OptimizerState = Literal["interpolate", "reset"]


def _combined_state(
    sources: Sequence[tuple[dict[str, object], float]], param: nn.Parameter
) -> dict[str, object] | None:
    """``sum_j c_j state_j`` entry by entry, or ``None`` if some entry cannot be combined (not shaped like the
    parameter)."""
    (first, _), *_ = sources
    combined: dict[str, object] = {}
    for key, value in first.items():
        if not isinstance(value, torch.Tensor):
            combined[key] = value
        elif key == "step" and value.numel() == 1:
            combined[key] = value.clone()
        elif value.shape == param.shape:
            zero = torch.zeros((), dtype=torch.float64, device=value.device)
            total = sum((entry.to(torch.float64) * c for state, c in sources
                         if isinstance(entry := state.get(key), torch.Tensor)), zero)
            tensor = total.to(value.dtype)
            combined[key] = tensor.clamp_(min=0) if "sq" in key else tensor
        else:
            return None
    return combined


def replace_parameters(
    optimizer: torch.optim.Optimizer,
    changes: Iterable[ParameterChange],
    *,
    optimizer_state: OptimizerState = "interpolate",
) -> int:
    """Replace the old parameters of each change by its new ones in ``optimizer``, in place.

    A param group that held some of a layer's old parameters gets, at the place of the first of them, the layer's
    new parameters made from the old ones it held.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its param groups and state are edited).
        changes: what the change of resolution did, per layer.
        optimizer_state: ``"interpolate"`` or ``"reset"`` the state of the new parameters. State that is not shaped
            like its parameter (e.g. factored second moments) is always reset.

    Returns:
        The number of new parameters put into the optimizer.
    """
    if optimizer_state not in ("interpolate", "reset"):
        raise ValueError(f"optimizer_state={optimizer_state!r} is not known: expected 'interpolate' or 'reset'")
    changes = list(changes)
    owner = {id(param): change for change in changes for param in change.old}
    inserted = 0
    for group in optimizer.param_groups:
        held = {id(param) for param in group["params"]}
        done: set[int] = set()
        params: list[nn.Parameter] = []
        for param in group["params"]:
            change = owner.get(id(param))
            if change is None:
                params.append(param)
            elif id(change) not in done:
                done.add(id(change))
                new = [q for q in change.new if any(id(old) in held for old, _ in change.sources.get(q, ()))]
                params.extend(new)
                inserted += len(new)
        group["params"] = params
    for change in changes:
        if optimizer_state == "interpolate":
            for param in change.new:
                sources = [(optimizer.state[old], c) for old, c in change.sources.get(param, ())
                           if optimizer.state.get(old)]
                state = _combined_state(sources, param) if sources else None
                if state is not None:
                    optimizer.state[param] = state
        for old in change.old:
            optimizer.state.pop(old, None)
    return inserted


def stale_parameters(optimizers: Iterable[torch.optim.Optimizer], module: nn.Module) -> list[torch.Tensor]:
    """Tensors an optimizer updates that are no longer parameters of ``module``."""
    current = {id(p) for p in module.parameters()}
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"] if id(p) not in current]


def optimized_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """Ids of all tensors held by the optimizers' param groups."""
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
