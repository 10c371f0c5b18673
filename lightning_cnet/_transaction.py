"""All-or-nothing changes of a module: restore every tensor, submodule and attribute if a change fails.

Loading a state dict may refine ODE stages (new parameter objects, new piece lists, a new resolution and plan)
before it copies tensors; if the copy then fails (a size mismatch further down, a missing key), the model must be
exactly as it was, with the same parameter objects (optimizers hold them) and the same values. Every attribute a
change rebinds is put back (an ODE stage's resolution is one immutable object, rebound by every change), so no list
of attributes has to be kept in step with the modules.

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


@contextmanager
def restored_on_error(module: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, put ``module`` back as it was (structure, tensor objects and values, attributes)
    and re-raise.

    Costs one copy of the module's tensors while the block runs. Attributes are restored as bound (an object changed in
    place stays changed): the package's modules rebind immutable state rather than mutate it.
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
    return module, dict(module._parameters), dict(module._buffers), dict(module._modules), values, dict(module.__dict__)


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
        tensor = parameters[name] if name in parameters else buffers[name]
        if tensor.shape == value.shape:
            tensor.copy_(value)
        else:
            tensor.data = value
    for name in module.__dict__.keys() - attributes.keys():
        del module.__dict__[name]
    module.__dict__.update(attributes)
