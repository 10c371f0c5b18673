"""TorchScript for ContinuousNet models and ODE stages, through their ``torch.fx`` graph.

The integration loop is Python (a tableau, a plan of weight lookups, a step function handed to the integrator),
which TorchScript cannot compile; its ``torch.fx`` trace is a plain unrolled graph of tensor operations, which it
can. :func:`scriptable_graph` is what ``__prepare_scriptable__`` returns, so ``torch.jit.script(model)`` compiles the
traced graph at the model's current manifestation (scheme and step count baked in, like ``torch.export``).

:func:`evaluated_forward_annotations` gives a class's ``forward`` real types instead of the strings that
``from __future__ import annotations`` leaves: ``torch.fx`` copies the root's annotations into the code it generates,
and TorchScript cannot read a string there (it fails on ``Unknown type name '_torch_Tensor_'``).

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", scheme="rk4", n_steps=2).eval()
    >>> graph = scriptable_graph(model)
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.equal(graph(x), model(x))
    True
"""

from __future__ import annotations

import typing
from typing import TypeVar

import torch
from torch import nn

ModuleClass = TypeVar("ModuleClass", bound=type[nn.Module])


def evaluated_forward_annotations(cls: ModuleClass) -> ModuleClass:
    """Class decorator: replace the string annotations of ``cls.forward`` by the types they name.

    Example:
        >>> @evaluated_forward_annotations
        ... class Double(nn.Module):
        ...     def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        ...         return 2 * x
        >>> Double.forward.__annotations__["x"] is torch.Tensor
        True
    """
    cls.forward.__annotations__ = typing.get_type_hints(cls.forward)
    return cls


def scriptable_graph(module: nn.Module) -> torch.fx.GraphModule:
    """The ``torch.fx`` graph of ``module``'s forward at its current manifestation, which TorchScript compiles.

    It shares the module's parameters, buffers and normalisation layers (so ``train()``/``eval()`` act on the same
    BatchNorm statistics), and computes the same outputs in both modes. It is traced with gradients off, so a
    module set to recompute its steps in backward (``recompute_steps``, timm's gradient checkpointing) is traced
    without the recomputation, which TorchScript does not support; the gradients are the same.

    Args:
        module: a :class:`~lightning_cnet.models.ContinuousNet` or an :class:`~lightning_cnet.ode_block.ODEBlock`.
    """
    with torch.no_grad():
        return torch.fx.symbolic_trace(module)


__all__ = ["evaluated_forward_annotations", "scriptable_graph"]
