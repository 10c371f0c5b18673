"""Residual units: the right-hand side ``R(x; theta(t))`` of an ODE stage.

A unit is an ``nn.Module`` built from the time-dependent layers of :mod:`lightning_cnet.layers`, all with the same
number of pieces ``n_basis``, whose ``forward(x, nodes, gain=None)`` computes ``R`` at the time given by the node
weights ``nodes`` and multiplies it by ``gain`` (the stage's skip-init gate ``s(t)``, a scalar, or ``None``).
Folding the gain into the unit's last linear map (scaling its kernel) is cheaper than scaling the output, which is
what :class:`ResidualUnit` does by default.

The ODE machinery (:class:`~lightning_cnet.ode_block.ODEBlock`) finds a unit's layers by type: refinement,
compression, per-piece BatchNorm, refinement noise, per-step recomputation, BatchNorm recalibration and checkpoint
loading work for every unit without naming its layers. A unit is chosen by name (:func:`register_unit`,
:func:`list_units`) or given as a class or factory ``factory(width, *, n_basis, **unit_kwargs)``.

Built-in units:

* ``"preact_basic"`` (:class:`PreActBasicUnit`): ``BN -> ReLU -> Conv3x3 -> BN -> ReLU -> Conv3x3``, the paper's
  unit. Euler with a piecewise-constant basis and ``n_basis = n_steps = T`` is a pre-activation ResNet stage.
* ``"bottleneck"`` (:class:`BottleneckUnit`): ``BN -> ReLU -> Conv1x1 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU ->
  Conv1x1``, the pre-activation bottleneck of ImageNet-style ResNets.
* ``"mlp"`` (:class:`MLPUnit`): time-dependent linear layers with an activation, for vector states ``[B, D]``.

Example:
    >>> import torch
    >>> unit = get_unit("bottleneck")(64, n_basis=2)
    >>> unit(torch.randn(2, 64, 8, 8), ((1, 1.0),)).shape
    torch.Size([2, 64, 8, 8])
    >>> list_units()
    ['bottleneck', 'mlp', 'preact_basic']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_cnet.bases import NodeWeights
from lightning_cnet.layers import TimeBatchNorm2d, TimeConv2d, TimeDependent, TimeLayerNorm, TimeLinear
from lightning_cnet.registry import Registry

UnitFactory = Callable[..., nn.Module]
"""``factory(width, *, n_basis, **unit_kwargs) -> unit``: a unit class or any callable building one."""

UNITS: Registry[UnitFactory] = Registry("unit")
"""The registered residual units."""

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "softplus": torch.nn.functional.softplus,
    "identity": lambda x: x,
}


class ResidualUnit(nn.Module):
    """Base class for residual units: subclasses implement :meth:`residual`, or ``forward`` to fold the gain.

    Example:
        >>> class Scaled(ResidualUnit):
        ...     def __init__(self, width: int, *, n_basis: int) -> None:
        ...         super().__init__()
        ...         self.linear = TimeLinear(width, width, n_basis=n_basis)
        ...     def residual(self, x, nodes):
        ...         return torch.tanh(self.linear(x, nodes))
        >>> Scaled(3, n_basis=1)(torch.zeros(2, 3), ((0, 1.0),), torch.tensor(0.0)).abs().sum().item()
        0.0
    """

    def residual(self, x: torch.Tensor, nodes: NodeWeights) -> torch.Tensor:
        """``R(x; theta(t))`` at the time of ``nodes``."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual() or forward()")

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        """``gain * R(x; theta(t))`` (``R`` alone when ``gain`` is ``None``)."""
        value = self.residual(x, nodes)
        return value if gain is None else value * gain


class PreActBasicUnit(ResidualUnit):
    """The pre-activation basic unit ``Conv3x3(ReLU(BN(Conv3x3(ReLU(BN(x))))))`` of constant width.

    Args:
        channels: width of the stage.
        n_basis: number of pieces of every parameter.
        bias: give the convolutions time-dependent biases.
        bn_momentum: momentum of the BatchNorm running statistics.
    """

    def __init__(self, channels: int, *, n_basis: int, bias: bool = False, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.norm1 = TimeBatchNorm2d(channels, n_basis=n_basis, momentum=bn_momentum)
        self.conv1 = TimeConv2d(channels, channels, n_basis=n_basis, bias=bias)
        self.norm2 = TimeBatchNorm2d(channels, n_basis=n_basis, momentum=bn_momentum)
        self.conv2 = TimeConv2d(channels, channels, n_basis=n_basis, bias=bias)

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(torch.relu_(self.norm1(x, nodes)), nodes)
        out: torch.Tensor = self.conv2(torch.relu_(self.norm2(y, nodes)), nodes, gain)
        return out


class BottleneckUnit(ResidualUnit):
    """The pre-activation bottleneck unit ``1x1 -> 3x3 -> 1x1`` (each after BN and ReLU) of constant width.

    Args:
        channels: width of the stage (input and output).
        n_basis: number of pieces of every parameter.
        width_factor: the inner width is ``round(channels * width_factor)`` (ResNet-50: ``0.25``).
        bias: give the convolutions time-dependent biases.
        bn_momentum: momentum of the BatchNorm running statistics.
    """

    def __init__(
        self, channels: int, *, n_basis: int, width_factor: float = 0.25, bias: bool = False, bn_momentum: float = 0.1
    ) -> None:
        super().__init__()
        if not width_factor > 0:
            raise ValueError(f"width_factor={width_factor!r} must be positive")
        inner = max(1, round(channels * width_factor))
        self.norm1 = TimeBatchNorm2d(channels, n_basis=n_basis, momentum=bn_momentum)
        self.conv1 = TimeConv2d(channels, inner, n_basis=n_basis, kernel_size=1, bias=bias)
        self.norm2 = TimeBatchNorm2d(inner, n_basis=n_basis, momentum=bn_momentum)
        self.conv2 = TimeConv2d(inner, inner, n_basis=n_basis, kernel_size=3, bias=bias)
        self.norm3 = TimeBatchNorm2d(inner, n_basis=n_basis, momentum=bn_momentum)
        self.conv3 = TimeConv2d(inner, channels, n_basis=n_basis, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(torch.relu_(self.norm1(x, nodes)), nodes)
        y = self.conv2(torch.relu_(self.norm2(y, nodes)), nodes)
        out: torch.Tensor = self.conv3(torch.relu_(self.norm3(y, nodes)), nodes, gain)
        return out


class MLPUnit(ResidualUnit):
    """A multilayer perceptron ``Linear -> act -> ... -> Linear`` with time-dependent weights, for states ``[B, D]``.

    Args:
        features: size ``D`` of the state (input and output).
        n_basis: number of pieces of every parameter.
        hidden: width of the hidden layers (default: ``2 * features``).
        layers: number of linear layers (>= 1; 1 is a linear vector field ``W(t) x + b(t)``).
        activation: ``"tanh"``, ``"relu"``, ``"gelu"``, ``"silu"``, ``"softplus"``, ``"identity"`` or a callable.
        layer_norm: normalise the input with a time-dependent ``LayerNorm`` first.
        bias: give the linear layers time-dependent biases.

    Example:
        >>> import torch
        >>> field = MLPUnit(2, n_basis=1, hidden=50, activation="tanh")
        >>> field(torch.randn(5, 2), ((0, 1.0),)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        *,
        n_basis: int,
        hidden: int | None = None,
        layers: int = 2,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "tanh",
        layer_norm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers={layers!r} must be an integer >= 1")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation={activation!r} is not known: expected one of {sorted(ACTIVATIONS)}")
            activation = ACTIVATIONS[activation]
        self.activation = activation
        hidden = 2 * features if hidden is None else hidden
        sizes = [features] + [hidden] * (layers - 1) + [features]
        self.norm = TimeLayerNorm(features, n_basis=n_basis) if layer_norm else None
        self.linears = nn.ModuleList(
            TimeLinear(size_in, size_out, n_basis=n_basis, bias=bias) for size_in, size_out in zip(sizes, sizes[1:])
        )

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        y = x if self.norm is None else self.norm(x, nodes)
        *inner, last = self.linears
        for linear in inner:
            y = self.activation(linear(y, nodes))
        out: torch.Tensor = last(y, nodes, gain)
        return out


def register_unit(name: str, factory: UnitFactory, *, overwrite: bool = False) -> UnitFactory:
    """Register a residual unit under ``name``, so ``unit=name`` selects it.

    Args:
        name: the name later given as ``unit=``.
        factory: ``factory(width, *, n_basis, **unit_kwargs) -> nn.Module`` (a unit class works).
        overwrite: replace an existing unit of the same name.

    Example:
        >>> _ = register_unit("wide_mlp", lambda width, *, n_basis: MLPUnit(width, n_basis=n_basis, hidden=64))
        >>> "wide_mlp" in list_units()
        True
    """
    if not callable(factory):
        raise ValueError(f"a unit factory must be callable, got {type(factory).__name__}")
    return UNITS.register(name, factory, overwrite=overwrite)


def list_units() -> list[str]:
    """Names accepted as ``unit=``."""
    return UNITS.names()


def get_unit(unit: str | UnitFactory) -> UnitFactory:
    """The factory registered as ``unit`` (a class or callable is returned as is).

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    return unit if callable(unit) else UNITS.get(unit)


def build_unit(
    unit: str | UnitFactory, width: int, n_basis: int, unit_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Build a residual unit and check that it is made of time-dependent layers with ``n_basis`` pieces.

    Raises:
        ValueError: unknown unit, or a factory whose result is not such a module.
    """
    built = get_unit(unit)(width, n_basis=n_basis, **(unit_kwargs or {}))
    if not isinstance(built, nn.Module):
        raise ValueError(f"unit factory {unit!r} returned {type(built).__name__}, expected an nn.Module")
    counts = {layer.n_basis for layer in built.modules() if isinstance(layer, TimeDependent)}
    if counts != {n_basis}:
        raise ValueError(
            f"unit {unit!r} must be built from lightning_cnet.layers time-dependent layers with n_basis={n_basis}; "
            f"found piece counts {sorted(counts) or 'none'}"
        )
    return built


register_unit("preact_basic", PreActBasicUnit)
register_unit("bottleneck", BottleneckUnit)
register_unit("mlp", MLPUnit)
