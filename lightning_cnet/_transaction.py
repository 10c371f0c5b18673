"""All-or-nothing changes of a module: restore every tensor, submodule and stage resolution if a change fails.

Loading a state dict may refine ODE stages (new parameter objects, new piece lists) before it copies tensors; if
the copy then fails (a size mismatch further down, a missing key), the model must be exactly as it was, with the
same parameter objects (optimizers hold them) and the same values.

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(2, 2)
    >>> before = linear.weight.detach().clone()
    >>> try:
    ...     with restored_on_error(linear):
    ...         _ = linear.weight.data.zero_()
    ...         raise RuntimeError("the load failed")
    ... except RuntimeError:
    ...     pass
    >>> torch.equal(linear.weight, before)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: Plain attributes of a module that a change of resolution may replace (ODE stages).
_STATE_ATTRIBUTES = ("tableau", "n_steps", "T", "_plan")


@contextmanager
def restored_on_error(module: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, put ``module`` back as it was (structure, tensor objects and values) and re-raise.

    Costs one copy of the module's tensors while the block runs.
    """
    saved = [_snapshot(child) for child in module.modules()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for snapshot in saved:
                _restore(*snapshot)
        raise


def _snapshot(module: nn.Module) -> tuple[Any, ...]:
    tensors = {**module._parameters, **module._buffers}
    values = {name: tensor.detach().clone() for name, tensor in tensors.items() if tensor is not None}
    attributes = {name: module.__dict__[name] for name in _STATE_ATTRIBUTES if name in module.__dict__}
    return module, dict(module._parameters), dict(module._buffers), dict(module._modules), values, attributes


def _restore(
    module: nn.Module,
    parameters: dict[str, Any],
    buffers: dict[str, Any],
    modules: dict[str, Any],
    values: dict[str, torch.Tensor],
    attributes: dict[str, Any],
) -> None:
    for registry, saved in ((module._parameters, parameters), (module._buffers, buffers), (module._modules, modules)):
        registry.clear()
        registry.update(saved)
    for name, value in values.items():
        tensor = parameters.get(name, buffers.get(name))
        if tensor.shape == value.shape:
            tensor.copy_(value)
        else:
            tensor.data = value
    module.__dict__.update(attributes)
